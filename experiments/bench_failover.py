"""Paper 001's fault tolerance, measured: serving through a lost attention device and a lost expert
device, against restarting on the devices left, and the decode bound of each degraded layout.

    python -m experiments.bench_failover [--config tiny_moe] [--set K=V] [--split 12+4]
        [--steps 12] [--prompt 16] [--attention-device D --attention-step 3]
        [--expert-device D --expert-step 5] [--paper paper001] [--json PATH]
        [--platform P] [--devices N]

A greedy generation under ma_separation (`jaxmoe.separation.failover.Server`) loses an attention
device (default: the second device of replica group 1) before decode step `--attention-step`
and an expert device before `--expert-step`; its tokens are checked against one device's
generation without failures. Each recovery is timed from the failure to the next token twice:
cold (the degraded layouts' programs compiled as they are met) and warm (a second run of the
same server, whose degraded layouts were compiled by the first: a standby). The alternative,
restarting on the devices left from a checkpoint of the model (restored, every sequence
prefilled again), is timed the same way on the largest ma_separation layout they hold.

The decode bound (per token, on `--paper`'s hardware) of the full layout and of each degraded
one, for the config served and for the paper's full-size model (compiled on abstract inputs).
The paper claims 2.3 s from a GPU failure to recovery, against 8.7 s for its baseline.
A benchmark, not a test: these machines are shared and noisy.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments.configs import config as named
from experiments.configs import platform_flags
from jaxmoe import platform
from jaxmoe.config import ConfigError, ModelConfig, with_overrides
from jaxmoe.report import table

PAPER_S = {"attention": 2.3, "experts": 2.3, "restart": 8.7}


def restart_layout(cfg: ModelConfig, n: int):
    """The ma_separation layout a restart on `n` devices takes: the most devices, then the most
    expert devices (at least two where any layout has them), then replica groups."""
    from meshes import ma_separation

    found = []
    for x in range(1, n):
        for a in range(x, n - x + 1, x):
            for r in (2, 1):
                try:
                    sep = ma_separation.separation(a, x, r)
                    sep.check(cfg, n)
                except ConfigError:
                    continue
                found.append(((x >= 2, a + x, x, r), sep))
    if not found:
        raise ConfigError(f"no ma_separation layout of {cfg.name} fits {n} devices")
    return max(found, key=lambda f: f[0])[1]


def served(cfg, sep, devices, state, prompt, steps, failures) -> dict:
    from jaxmoe.inference import decoder, generate
    from jaxmoe.placement import init_params
    from jaxmoe.separation.failover import Server

    want = generate(decoder(cfg, init_params(cfg, 0)[0]), state, prompt, steps)
    server = Server(cfg, sep, devices, state)
    runs = [server.generate(prompt, steps, failures) for _ in ("cold", "warm")]
    return {"want": want.tokens, "runs": runs}


def restarts(cfg, sep, devices, state, prompt, tokens, failures) -> list[dict]:
    """Per failure: a restart on the devices left after it (and the failures before), cold and
    warm, from a checkpoint of the model."""
    from jaxmoe.placement import abstract_model
    from jaxmoe.separation import Separated
    from jaxmoe.separation.failover import restart, save_model

    path = Path(tempfile.mkdtemp(prefix="jaxmoe-failover-")) / "model"
    save_model(path, state)
    abstract = abstract_model(cfg)[1]
    lost: set = set()
    out = []
    for f in sorted(failures, key=lambda f: f.step):
        if f.device < sep.attention.n_devices:
            g = f.device // sep.group_size
            lost |= set(range(g * sep.group_size, (g + 1) * sep.group_size))
        else:
            lost.add(f.device)
        left = [d for i, d in enumerate(devices[: sep.n_devices]) if i not in lost]
        layout = restart_layout(cfg, len(left))
        so_far = np.concatenate([prompt, tokens[:, : f.step]], axis=1)
        t0 = time.perf_counter()
        run = Separated(cfg, layout, left)
        built = time.perf_counter() - t0
        cold, cold_s = restart(run, path, abstract, so_far)
        warm, warm_s = restart(run, path, abstract, so_far)
        same = bool(np.array_equal(cold, tokens[:, f.step]) and np.array_equal(warm, cold))
        out.append(
            {
                "layout": layout.name,
                "devices": len(left),
                "cold_s": built + cold_s,
                "warm_s": warm_s,
                "same_next_token": same,
            }
        )
    return out


def bounds(cfg, sep, devices, hw, failures) -> list[dict]:
    """Decode bound of the full layout and after each failure in turn (nothing run)."""
    from jaxmoe.separation.degraded import Shares, bound, laid, without_a_group

    a = sep.attention.n_devices
    attention, experts = list(devices[:a]), list(devices[a : sep.n_devices])
    alive, rows = list(experts), []
    for f in [None, *sorted(failures, key=lambda f: f.step)]:
        if f is not None and f.device < a:
            grid = np.asarray(attention, dtype=object).reshape(sep.replicas, -1)
            attention = list(np.delete(grid, f.device // sep.group_size, axis=0).flat)
            sep = without_a_group(sep)
        elif f is not None:
            alive = [d for d in alive if d != devices[f.device]]
        b = bound(laid(cfg, sep, attention, experts, alive), hw, "decode")
        name = sep.name + ("" if alive == experts else f", {Shares.even(cfg.n_experts, alive)}")
        rows.append({"layout": name, "decode_s": b.overlapped_s, "limit": b.limit})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.bench_failover", description=__doc__
    )
    parser.add_argument("--config", default="tiny_moe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--split", default="12+4")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--attention-device", type=int)
    parser.add_argument("--attention-step", type=int, default=3)
    parser.add_argument("--expert-device", type=int)
    parser.add_argument("--expert-step", type=int, default=5)
    parser.add_argument("--paper", default="paper001")
    parser.add_argument("--json", type=Path)
    platform_flags(parser, "devices in all (default: 16 virtual CPU devices, or every GPU)")
    args = parser.parse_args(argv)
    try:
        from experiments.papers.registry import get
        from jaxmoe.analysis import hardware
        from jaxmoe.compare import random_tokens
        from jaxmoe.placement import init_params
        from jaxmoe.separation.failover import Failure, check
        from meshes import ma_separation

        cfg = with_overrides(named(args.config), assignments=args.set)
        sep = ma_separation.parse(f"{ma_separation.NAME}:{args.split}")
        devices = platform.select(args.platform, args.devices).devices
        sep.check(cfg, len(devices))
        a = sep.attention.n_devices
        at = sep.group_size + 1 if args.attention_device is None else args.attention_device
        ex = a + 1 if args.expert_device is None else args.expert_device
        failures = [Failure(args.attention_step, at), Failure(args.expert_step, ex)]
        check(cfg, sep, len(devices), args.steps, failures)
        if args.prompt + args.steps > cfg.seq_len:
            raise ConfigError(
                f"--prompt {args.prompt} and --steps {args.steps} exceed seq_len={cfg.seq_len}; "
                f"choose fewer"
            )
        paper = get(args.paper)
        hw = hardware.get(paper.hardware)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    _, state = init_params(cfg, 0)
    prompt = np.asarray(random_tokens(cfg, 1))[:, : args.prompt]
    done = served(cfg, sep, devices, state, prompt, args.steps, failures)
    cold, warm = done["runs"]
    same = [bool(np.array_equal(r.tokens, done["want"])) for r in done["runs"]]
    alt = restarts(cfg, sep, devices, state, prompt, done["want"], failures)
    rows = []
    for c, w, r in zip(cold.recoveries, warm.recoveries, alt, strict=True):
        rows.append(
            {
                "failure": f"{c.side} device {c.failure.device} before step {c.failure.step}",
                "action": c.action,
                "layout": c.layout,
                "cold_s": c.seconds,
                "warm_s": w.seconds,
                "restart": r,
                "paper_s": PAPER_S[c.side],
            }
        )
    print(f"{cfg.name} under {sep.name}: {args.steps} greedy tokens from {args.prompt}-token "
          f"prompts, batch {cfg.batch}; the same tokens as one device without failures: "
          f"cold {'yes' if same[0] else 'NO'}, warm {'yes' if same[1] else 'NO'}; dropped "
          f"choices {cold.dropped_choices}\n")  # fmt: skip
    print(table(
        ["failure", "failover cold", "warm", "restart cold", "warm", "restart layout", "paper"],
        [(r["failure"], f"{r['cold_s']:.3f} s", f"{r['warm_s']:.3f} s",
          f"{r['restart']['cold_s']:.3f} s", f"{r['restart']['warm_s']:.3f} s",
          f"{r['restart']['layout']} ({r['restart']['devices']} devices)",
          f"{r['paper_s']} s vs {PAPER_S['restart']} s") for r in rows],
    ))  # fmt: skip
    for r in rows:
        print(f"  {r['failure']}: {r['action']}; serving {r['layout']}")
    doc = {"config": cfg.name, "split": sep.name, "same_tokens": same, "recoveries": rows}
    for label, c in (("served", cfg), (f"{args.paper} full size", paper.config("full"))):
        try:
            found = bounds(c, sep, devices, hw, failures)
        except ConfigError as err:
            print(f"\nno bound for {label}: {err}")
            continue
        first = found[0]["decode_s"]
        print(f"\ndecode bound per token, {label} ({c.name}) on {hw.name}:")
        print(table(
            ["layout", "bound", "vs full", "limit"],
            [(b["layout"], f"{b['decode_s'] * 1e3:.3f} ms", f"{b['decode_s'] / first:.2f}x",
              b["limit"]) for b in found],
        ))  # fmt: skip
        doc[f"decode_bound_{c.name}"] = found
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

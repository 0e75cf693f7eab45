"""ma_separation's balancer and ping-pong, measured here and bounded at paper scale.

    python -m experiments.bench_separation [--config bench_moe] [--splits 12+4,8+8,14+2]
        [--micro-batches 1,2,4] [--iters 5] [--paper paper001] [--json PATH]
        [--platform P] [--devices N]

Measured on this machine's devices (16 virtual CPU devices where there is no GPU), for every
device split and micro-batch count that fits the config:
- each side's piece alone (one micro-batch's attention, one's experts; at the config's sequence
  length and at half of it): the samples the paper's 3-layer MLP predictor is fitted on; its
  error on samples held out of the fit (every third one);
- the whole forward pass issued one program at a time (serial) and asynchronously (ping-pong),
  with the time both meshes were busy at once, from a timeline of each program's completion;
- the split the predictor chooses, against the split that measured fastest.

Bounded on the paper's hardware (`--paper`, nothing run): prefill and decode of its full-size
model for every split and micro-batch count, composed from the compiled pieces, to show how far
12:4 is from balanced and when ping-pong costs more than it hides.

A benchmark, not a test: these machines are shared and noisy, and on 2 CPU cores two programs
running at once share the cores, so overlap shows in the timeline rather than in the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np

from experiments.configs import config as named
from experiments.configs import platform_flags
from jaxmoe import platform
from jaxmoe.config import ConfigError, with_overrides
from jaxmoe.report import table


def _splits(text: str):
    from meshes import ma_separation

    return [ma_separation.parse(f"{ma_separation.NAME}:{s.strip()}") for s in text.split(",")]


def measured(cfg, splits, options, iters: int, devices: Sequence[jax.Device]) -> list[dict]:
    from jaxmoe.compare import random_tokens
    from jaxmoe.placement import init_params
    from jaxmoe.separation import Separated
    from jaxmoe.separation.balance import measure_pieces, overlap

    _, state = init_params(cfg, 0)
    half = cfg.replace(seq_len=cfg.seq_len // 2)
    _, half_state = init_params(half, 0)
    tokens = np.asarray(random_tokens(cfg, 1))
    rows = []
    for sep in splits:
        for m in options:
            sized = cfg.replace(micro_batches=m)
            try:
                run = Separated(sized, sep, devices)
            except ConfigError as err:
                print(f"skip {sep.name} x {m}: {err}", file=sys.stderr)
                continue
            params = run.put(state)
            sample = measure_pieces(run, params, iters=iters)
            # more samples for the predictor: the same pieces on sequences half as long
            shorter = Separated(half.replace(micro_batches=m), sep, devices)
            extra = measure_pieces(shorter, shorter.put(half_state), iters=iters)
            serial = overlap(run, params, tokens, serial=True)
            pingpong = overlap(run, params, tokens)
            rows.append(
                {
                    "split": sep.name,
                    "micro_batches": m,
                    "sample": sample,
                    "half_seq_sample": extra,
                    "serial": serial.summary(),
                    "pingpong": pingpong.summary(),
                }
            )
            print(f"measured {sep.name} x {m}", file=sys.stderr, flush=True)
    return rows


def fit(rows: list[dict], total_tokens: int, options) -> dict:
    """The predictor fitted on all but every third sample, its errors, and its choice."""
    from jaxmoe.balancer import StepTimeModel, choose_split

    samples = [s for r in rows for s in (r["sample"], r["half_seq_sample"])]
    held = samples[1::3]
    train = [s for i, s in enumerate(samples) if i % 3 != 1]
    model = StepTimeModel.fit(train)
    full = StepTimeModel.fit(samples)
    splits = sorted({(s.attn_devices, s.expert_devices) for s in samples})
    valid = sorted({r["micro_batches"] for r in rows})
    choice = choose_split(
        full, total_tokens, micro_batches_options=valid or options, device_splits=splits
    )
    fastest = min(rows, key=lambda r: r["pingpong"]["wall_s"])
    return {
        "train_samples": len(train),
        "held_out_samples": len(held),
        "error_in_sample": model.relative_error(train),
        "error_held_out": model.relative_error(held) if held else None,
        "choice": choice,
        "measured_fastest": (fastest["split"], fastest["micro_batches"]),
    }


def bounded(paper: str, splits, options, devices: Sequence[jax.Device]) -> list[dict]:
    from experiments.papers.registry import get
    from jaxmoe.analysis import hardware
    from jaxmoe.experiment import PREFILL_BATCH
    from jaxmoe.phases import phase_costs

    exp = get(paper)
    cfg, hw = exp.config("full"), hardware.get(exp.hardware)
    rows = []
    for sep in splits:
        for m in options:
            sized = cfg.replace(micro_batches=m)
            try:
                costs = phase_costs(
                    sized, sep, devices, hw, prefill_batch=min(cfg.batch, PREFILL_BATCH)
                )
            except ConfigError as err:
                print(f"skip {sep.name} x {m}: {err}", file=sys.stderr)
                continue
            for c in costs:
                rows.append(
                    {
                        "split": sep.name,
                        "micro_batches": m,
                        "phase": c.phase,
                        **c.rate(c.bound.overlapped_s),
                        "limit": c.bound.limit,
                        "attention_mesh_s": c.bound.summary()["attention_mesh_s"],
                        "expert_mesh_s": c.bound.summary()["expert_mesh_s"],
                        "memory_bytes_per_device": c.memory["total"],
                        "fits": c.memory["total"] <= hw.hbm_bytes,
                    }
                )
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_separation")
    parser.add_argument("--config", default="bench_moe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--splits", default="12+4,8+8,14+2")
    parser.add_argument("--micro-batches", default="1,2,4")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--paper", default="paper001", help="bound this paper's model ('' none)")
    parser.add_argument("--json", type=Path)
    platform_flags(parser, "devices in all (default: 16 virtual CPU devices, or every GPU)")
    args = parser.parse_args(argv)
    try:
        cfg = with_overrides(named(args.config), assignments=args.set)
        splits = _splits(args.splits)
        options = [int(m) for m in args.micro_batches.split(",")]
        devices = platform.select(args.platform, args.devices).devices
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    rows = measured(cfg, splits, options, args.iters, devices)
    if not rows:
        print("error: no split fits this config; change --splits or --micro-batches")
        return 2
    balance = fit(rows, cfg.batch * cfg.seq_len, options)
    print(f"{cfg.name}: B {cfg.batch} x S {cfg.seq_len}, D {cfg.d_model}, {cfg.n_experts} experts")
    print(_measured_table(rows), end="\n\n")
    print(_balance_text(balance), end="\n\n")
    doc = {"config": cfg.name, "measured": _jsonable(rows), "balancer": _jsonable(balance)}
    if args.paper:
        bounds = bounded(args.paper, splits + _splits("15+1"), sorted({1, *options, 8}), devices)
        print(_bound_table(args.paper, bounds))
        doc["bounds"] = bounds
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def _ms(s: float) -> str:
    return f"{s * 1e3:.1f}"


def _measured_table(rows) -> str:
    headers = ("split", "M", "attn piece ms", "expert piece ms", "serial ms", "ping-pong ms",
               "overlap ms", "overlapped share")  # fmt: skip
    body = [
        (
            r["split"],
            str(r["micro_batches"]),
            _ms(r["sample"].attn_s),
            _ms(r["sample"].expert_s),
            _ms(r["serial"]["wall_s"]),
            _ms(r["pingpong"]["wall_s"]),
            _ms(r["pingpong"]["overlap_s"]),
            f"{r['pingpong']['overlap_fraction']:.0%}",
        )
        for r in rows
    ]
    legend = (
        "pieces: one micro-batch's attention (first block) and experts, each alone; serial / "
        "ping-pong: a forward pass issued one program at a time / asynchronously; overlap: time "
        "both meshes were busy at once; overlapped share: of the less busy mesh's time"
    )
    return f"{table(headers, body)}\n\n{legend}"


def _balance_text(b: dict) -> str:
    c = b["choice"]
    held = b["error_held_out"]
    held_text = (
        f"held-out ({b['held_out_samples']} samples) median {held['attn_median']:.0%} / "
        f"{held['expert_median']:.0%}, max {held['attn_max']:.0%} / {held['expert_max']:.0%}"
        if held
        else "no held-out samples"
    )
    fit_err = b["error_in_sample"]
    return (
        f"predictor (3-layer MLP, {b['train_samples']} samples): relative error attention / "
        f"experts in-sample median {fit_err['attn_median']:.0%} / {fit_err['expert_median']:.0%}"
        f"; {held_text}\n"
        f"chosen: {c.attn_devices}+{c.expert_devices}, {c.micro_batches} micro-batches, "
        f"predicted step {_ms(c.step_s)} ms per layer (attention {_ms(c.attn_s)}, experts "
        f"{_ms(c.expert_s)} per micro-batch; imbalance {c.imbalance:.0%}; "
        f"{c.gain_vs_no_pingpong:.2f}x vs no ping-pong); measured fastest forward pass: "
        f"{b['measured_fastest'][0]} x {b['measured_fastest'][1]}"
    )


def _bound_table(paper: str, rows) -> str:
    headers = ("split", "M", "phase", "bound", "limited by", "attention mesh", "expert mesh",
               "memory/device", "fits")  # fmt: skip
    body = [
        (
            r["split"],
            str(r["micro_batches"]),
            r["phase"],
            f"{r['tps']:,.0f} tok/s" if r["phase"] == "prefill" else f"{r['tpot_ms']:.2f} ms",
            r["limit"],
            f"{_ms(r['attention_mesh_s'])} ms",
            f"{_ms(r['expert_mesh_s'])} ms",
            f"{r['memory_bytes_per_device'] / 2**30:.1f} GiB",
            "yes" if r["fits"] else "NO",
        )
        for r in rows
    ]
    best = []
    for phase in ("prefill", "decode"):
        fits = [r for r in rows if r["phase"] == phase and r["fits"]]
        if fits:
            key = "tps" if phase == "prefill" else "tpot_ms"
            top = max(fits, key=lambda r: r[key] if phase == "prefill" else -r[key])
            best.append(f"best {phase}: {top['split']} x {top['micro_batches']} micro-batches")
    title = f"{paper} full size, bound per split and micro-batch count"
    return f"{title}\n\n{table(headers, body)}\n\n" + "; ".join(best)


def _jsonable(obj):
    import dataclasses

    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


if __name__ == "__main__":
    raise SystemExit(main())

"""Training throughput and memory of every layout, and of one device, on this machine.

    python -m experiments.bench_train [--config bench_moe] [--steps 8] [--warmup 3] [--json PATH]
        [--strategies a,b] [--platform P] [--devices N]

Each layout (the registry's, ma_separation's two meshes and composed ones) runs in a fresh
process (so its peak resident memory is its own) on the platform at hand (16 virtual CPU devices
where there is no GPU) and the shipped C4 sample: `--warmup` steps (compiling included) then
`--steps` timed steps, each blocked on. Reports the median step time and its tokens/s, the
process's peak resident memory, the compiled program's memory per device (XLA's memory analysis,
times the devices for the whole mesh; none for ma_separation, whose step is many programs), and
each layout's step time against one device's, measured in the same run. A benchmark, not a test:
these machines are shared and noisy, so compare ratios within one run.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from experiments.configs import platform_flags
from jaxmoe import platform
from jaxmoe.report import human_bytes, table

# a layout that cannot split the config as it is runs an equivalent shape (same parameters and
# FLOPs), said in the table: tp16 cannot split bench_moe's 8 heads 16 ways
FALLBACK = {"tp16": ["n_heads=16", "head_dim=16"]}
DEFAULT_STRATEGIES = (
    "one_device",
    "tp16",
    "ep16",
    "heads_dims_4x4",
    "tp8_pp2",
    "tp8_pp2:experts_tp",
    "ma_separation",
    "dp2_ep8",
    "fsdp4_tp4",
    "dp2_tp4_pp2",
)


def measure(
    strategy_name: str,
    config: str,
    sets: list[str],
    steps: int,
    warmup: int,
    devices: Sequence[jax.Device],
) -> dict:
    """In this process: build, warm up and time one strategy's train step."""
    import meshes
    from experiments.configs import config as named
    from jaxmoe import data
    from jaxmoe.analysis.memory import memory_per_device
    from jaxmoe.config import ConfigError, with_overrides
    from jaxmoe.train.batches import RowStreams
    from jaxmoe.train.recipe import TrainConfig

    cfg = with_overrides(named(config).replace(expert_dropout=0.1), assignments=sets)
    strategy = meshes.get(strategy_name)
    changed = []
    try:
        strategy.check(cfg)
    except ConfigError:
        changed = FALLBACK.get(strategy.name, [])
        cfg = with_overrides(cfg, assignments=changed)
    trainer = strategy.lay_out(cfg, devices[: strategy.n_devices]).trainer(TrainConfig())
    stream = RowStreams(
        data.c4_files(data.DEFAULT_TRAIN),
        data.load_tokenizer(),
        seq_len=cfg.seq_len,
        batch=cfg.batch,
        seed=0,
        shuffle=True,
        repeat=True,
        rows=range(cfg.batch),
    )
    batches = [jax.device_put(next(stream), trainer.batch_sharding) for _ in range(warmup + steps)]
    params, opt_state = trainer.init()
    compiled, memory = trainer.step, None  # a separated layout's step is many programs
    if hasattr(trainer.step, "lower"):
        compiled = trainer.step.lower(params, opt_state, batches[0], 0).compile()
        memory = memory_per_device(compiled)["total"]
    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        params, opt_state, metrics = compiled(params, opt_state, batch, i)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    timed = times[warmup:]
    median = statistics.median(timed)
    return {
        "strategy": strategy.name,
        "changed": changed,
        "devices": strategy.n_devices,
        "tokens_per_step": cfg.tokens,
        "step_s_median": median,
        "step_s_all": timed,
        "tokens_per_s": cfg.tokens / median,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "compiled_bytes_per_device": memory,
        "compiled_bytes_all_devices": None if memory is None else memory * strategy.n_devices,
        "final_loss": float(metrics["loss"]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_train", description=__doc__)
    parser.add_argument("--config", default="bench_moe")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", type=Path)
    platform_flags(parser, "devices in all (default: 16 virtual CPU devices, or every GPU)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child process: one strategy
    args = parser.parse_args(argv)
    if args.one:
        devices = platform.select(args.platform, args.devices).devices
        result = measure(args.one, args.config, args.set, args.steps, args.warmup, devices)
        print(json.dumps(result))
        return 0
    where = [
        f"--{k}={v}"
        for k, v in (("platform", args.platform), ("devices", args.devices))
        if v is not None
    ]
    results = []
    for name in args.strategies.split(","):
        child = [sys.executable, "-m", "experiments.bench_train", "--one", name,
                 "--config", args.config, "--steps", str(args.steps),
                 "--warmup", str(args.warmup), *where,
                 *(f"--set={s}" for s in args.set)]  # fmt: skip
        proc = subprocess.run(child, capture_output=True, text=True)
        if proc.returncode:
            print(f"error: {name} failed: {proc.stderr.strip().splitlines()[-1]}", file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"{name}: {results[-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr, flush=True)
    base = next((r for r in results if r["devices"] == 1), None)
    rows = [
        (
            r["strategy"] + (f" ({', '.join(r['changed'])})" if r["changed"] else ""),
            str(r["devices"]),
            f"{r['step_s_median']:.2f} s",
            f"{r['tokens_per_s']:.0f}",
            f"{r['step_s_median'] / base['step_s_median']:.2f}x" if base else "-",
            human_bytes(r["peak_rss_bytes"]),
            "-"
            if r["compiled_bytes_all_devices"] is None
            else human_bytes(r["compiled_bytes_all_devices"]),
        )
        for r in results
    ]
    headers = ("strategy", "devices", "step (median)", "tokens/s", "vs 1 device",
               "peak RSS", "XLA memory, all devices")  # fmt: skip
    print(f"{args.config}: training step, median of {args.steps} after {args.warmup} warm-up\n")
    print(table(headers, rows))
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`experiment`: a paper's setup under each strategy it compares, with the hardware's bound beside
every measured and claimed figure.

At `--scale tiny` the model runs on 16 devices (virtual CPU devices where there is no GPU):
prefill and decode are timed, and each strategy's greedy tokens are checked against one device's.
At `--scale full` the paper's model is compiled for 16 devices on abstract inputs (no weights
allocated; on virtual CPU devices when the GPUs here are fewer): its bound and memory come from
the partitioned program, nothing is run.

`--devices 8,16,32` lays each paper out at each count (paper002 scales its layouts to 8 and 32
for its scaling claims; a paper that names no layouts for a count shows why its own cannot),
bounded on as many GPUs of its hardware, with the claims for that count and the bound's own
scaling efficiency; claims for counts not asked for are not shown.
"""

from __future__ import annotations

import argparse
import json

import jaxmoe
from experiments import plots
from experiments.configs import timing
from jaxmoe import catalogue, platform
from jaxmoe.analysis import hardware
from jaxmoe.config import ConfigError
from jaxmoe.experiment import hardware_at
from jaxmoe.paths import writable_dir, writable_file
from jaxmoe.phases import Measure


def run(args: argparse.Namespace) -> None:
    papers = catalogue.experiments()
    names = list(papers) if args.name == "all" else [catalogue.experiment(args.name).name]
    counts = device_counts(args.devices)  # None: each paper's own
    hw = hardware.get(args.hardware) if args.hardware else None
    for name in names:
        exp = papers[name]
        for n in counts or (exp.n_devices,):
            hardware_at(exp, hw or hardware.get(exp.hardware), n).check_devices(n, "--hardware")
    timing(args.warmup, args.iters)
    if args.json:
        writable_file(args.json, "--json")
    if args.plots:
        writable_dir(args.plots, "--plots")
    compile_only = args.scale == "full"
    most = max(counts or [papers[name].n_devices for name in names])
    devices = platform.select(args.platform, most, compile_only=compile_only).devices

    docs = []
    measure = Measure(args.warmup, args.iters) if args.scale == "tiny" else None
    for name in names:
        result = jaxmoe.experiment(
            name, args.scale, hw, measure=measure, devices=devices, device_counts=counts
        )
        doc = result.to_json()
        docs.append(doc)
        print(result.table(), end="\n\n", flush=True)
        if args.plots:
            path = plots.experiment_plot(_by_model(doc), args.plots / f"{name}_{args.scale}.png")
            print(f"wrote {path}\n")
    if args.json:
        args.json.write_text(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
        print(f"wrote {args.json}")


def device_counts(text: str | None) -> tuple[int, ...] | None:
    """`--devices 8,16,32`: distinct counts of 1 or more, ascending (None: each paper's own); a
    one-line ConfigError naming the fix otherwise."""
    if text is None:
        return None
    counts: list[int] = []
    for part in text.split(","):
        if not part.strip().isdigit():
            raise ConfigError(
                f"--devices {text}: {part.strip()!r} is not a device count; write counts "
                "separated by commas, e.g. --devices 8,16,32"
            )
        n = int(part)
        if n < 1 or n in counts:
            why = "must be at least 1" if n < 1 else "is given twice"
            raise ConfigError(
                f"--devices {text}: {n} {why}; give each count once, 1 or more, e.g. "
                "--devices 8,16,32 (or leave it out for the paper's own)"
            )
        counts.append(n)
    return tuple(sorted(counts))


def _by_model(doc: dict) -> dict:
    """The rows as the plot names them: a strategy on one of the paper's other models carries
    the model's name (`ma_separation S 512`), so its bars are told apart."""
    rows = [
        {**r, "strategy": f"{r['strategy']} {r['model']}" if r.get("model") else r["strategy"]}
        for r in doc["rows"]
    ]
    return {**doc, "rows": rows}

"""`experiment`: a paper's setup under each strategy it compares, with the hardware's bound beside
every measured and claimed figure.

At `--scale tiny` the model runs on 16 devices (virtual CPU devices where there is no GPU):
prefill and decode are timed, and each strategy's greedy tokens are checked against one device's.
At `--scale full` the paper's model is compiled for 16 devices on abstract inputs (no weights
allocated; on virtual CPU devices when the GPUs here are fewer): its bound and memory come from
the partitioned program, nothing is run.
"""

from __future__ import annotations

import argparse
import json

import jaxmoe
from experiments import plots
from experiments.configs import timing
from jaxmoe import catalogue, platform
from jaxmoe.analysis import hardware
from jaxmoe.paths import writable_dir, writable_file
from jaxmoe.phases import Measure


def run(args: argparse.Namespace) -> None:
    papers = catalogue.experiments()
    names = list(papers) if args.name == "all" else [catalogue.experiment(args.name).name]
    hw = hardware.get(args.hardware) if args.hardware else None
    for name in names:
        (hw or hardware.get(papers[name].hardware)).check_devices(args.devices, "--hardware")
    timing(args.warmup, args.iters)
    if args.json:
        writable_file(args.json, "--json")
    if args.plots:
        writable_dir(args.plots, "--plots")
    compile_only = args.scale == "full"
    devices = platform.select(args.platform, args.devices, compile_only=compile_only).devices

    docs = []
    measure = Measure(args.warmup, args.iters) if args.scale == "tiny" else None
    for name in names:
        result = jaxmoe.experiment(name, args.scale, hw, measure=measure, devices=devices)
        doc = result.to_json()
        docs.append(doc)
        print(result.table(), end="\n\n", flush=True)
        if args.plots:
            path = plots.experiment_plot(_by_model(doc), args.plots / f"{name}_{args.scale}.png")
            print(f"wrote {path}\n")
    if args.json:
        args.json.write_text(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
        print(f"wrote {args.json}")


def _by_model(doc: dict) -> dict:
    """The rows as the plot names them: a strategy on one of the paper's other models carries
    the model's name (`ma_separation S 512`), so its bars are told apart."""
    rows = [
        {**r, "strategy": f"{r['strategy']} {r['model']}" if r.get("model") else r["strategy"]}
        for r in doc["rows"]
    ]
    return {**doc, "rows": rows}

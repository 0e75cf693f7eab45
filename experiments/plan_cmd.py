"""`plan`: which placement to use for a model on a machine, ranked by the hardware's bound.

Every candidate layout (the registered strategies and ma_separation's device splits) is compiled
for the model on abstract inputs (no weights allocated, nothing run) and ranked by its roofline
bound: prefill by tokens per second, decode by time per output token. A layout that does not fit
in the GPU's memory is ranked after every one that fits; one that cannot split the model is
listed with the reason. Each row says what limits it (compute, memory bandwidth, or which
collective on which mesh axes).

A paper's name as `--config` plans its full-size model (a deployment question); a preset is
planned as it is. An ma_separation split runs with the most ping-pong micro-batches, up to the
config's `micro_batches`, that split its batches (named in the row when fewer).
"""

from __future__ import annotations

import argparse
import json

import jaxmoe
from experiments.configs import strategies
from jaxmoe import catalogue, platform
from jaxmoe.analysis import hardware
from jaxmoe.config import ConfigError, ModelConfig, with_overrides
from jaxmoe.paths import writable_file


def candidates(names: str | None) -> list[str] | None:
    """`--strategies a,b` (each known, named once; not empty), or None: every layout and split."""
    return None if names is None else [s.name for s in strategies(names)]


def plan_config(name: str, sets: list[str], batch: int | None, seq: int | None) -> ModelConfig:
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch {batch}: must be at least 1 sequence; use e.g. --batch 16")
    if seq is not None and seq < 2:
        raise ConfigError(f"--seq {seq}: must be at least 2 tokens; use e.g. --seq 2048")
    cfg = catalogue.config(name, "full")  # a paper's name plans its full-size model
    cfg = with_overrides(cfg, assignments=sets)
    changes = {k: v for k, v in (("batch", batch), ("seq_len", seq)) if v is not None}
    return cfg.replace(**changes) if changes else cfg


def run(args: argparse.Namespace) -> None:
    hw = hardware.get(args.hardware)
    hw.check_devices(args.devices, "--hardware")
    cfg = plan_config(args.config, args.set, args.batch, args.seq)
    names = candidates(args.strategies)  # unknown names fail here, before anything compiles
    if args.json:
        writable_file(args.json, "--json")
    chosen = platform.select(args.platform, args.devices, compile_only=True)
    result = jaxmoe.plan(cfg, hw, names, devices=chosen.devices)
    print(result.table())
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2))
        print(f"\nwrote {args.json}")

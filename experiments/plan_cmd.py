"""`plan`: which placement to use for a model on a machine, ranked by the hardware's bound
(`jaxmoe.plan`: every candidate compiled on abstract inputs, nothing run).

A paper's name as `--config` plans its full-size model (a deployment question); a preset is
planned as it is.
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
    """`--strategies a,b` (each known, named once; not empty), or None: every layout of the
    devices."""
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
    for flag, value in (("--top", args.top), ("--compile-top", args.compile_top)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1; e.g. {flag} 3")
    hw = hardware.get(args.hardware)
    n_devices = hw.count if args.devices is None else args.devices
    hw.check_devices(n_devices, "--hardware")
    cfg = plan_config(args.config, args.set, args.batch, args.seq)
    names = candidates(args.strategies)  # unknown names fail here, before anything compiles
    if args.json:
        writable_file(args.json, "--json")
    chosen = platform.select(args.platform, n_devices, compile_only=True)
    result = jaxmoe.plan(
        cfg,
        hw,
        names,
        devices=chosen.devices,
        compile_top=args.compile_top,
        phases=[p.strip() for p in args.phases.split(",") if p.strip()],
        progress=True,
    )
    print(result.table(args.top))
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2))
        print(f"\nwrote {args.json}")

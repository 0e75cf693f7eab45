"""`explain STRATEGY`: per parameter, per layer and per device, what a layout does to a model."""

from __future__ import annotations

import argparse
import json

import jaxmoe
import meshes
from experiments.configs import config
from jaxmoe import platform
from jaxmoe.config import with_overrides
from jaxmoe.paths import writable_file


def run(args: argparse.Namespace) -> None:
    cfg = with_overrides(config(args.config), assignments=args.set)
    layout = meshes.get(args.strategy)
    if args.json:
        writable_file(args.json, "--json")
    chosen = platform.select(args.platform, args.devices, compile_only=True)
    result = jaxmoe.explain(cfg, layout, phase=args.phase, devices=chosen.devices)
    print(result.text())
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2))
        print(f"\nwrote {args.json}")

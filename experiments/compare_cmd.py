"""`compare`: one model laid out under several strategies, against one device."""

import argparse

import jax

import meshes
from experiments import report
from experiments.configs import config
from jaxmoe.compare import compare_strategies
from jaxmoe.config import ConfigError, with_overrides
from jaxmoe.separation import Separation


def run(args: argparse.Namespace) -> None:
    cfg = with_overrides(config(args.config), assignments=args.set)
    strategies = [meshes.get(name.strip()) for name in args.strategies.split(",") if name.strip()]
    strategies = [
        s.with_options(transfer_bits=args.transfer_bits) if isinstance(s, Separation) else s
        for s in strategies
    ]
    if not strategies:
        raise ConfigError(
            "--strategies is empty; name at least one of " + ", ".join(meshes.LAYOUTS)
        )
    if args.devices < 1:
        raise ConfigError(f"--devices {args.devices}: must be at least 1")
    # Before JAX starts its backend: nothing above has touched a device.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)

    reports = compare_strategies(cfg, strategies, jax.devices(), seed=args.seed)
    print(report.compare_table(cfg, reports))
    if args.json:
        report.write_compare_json(args.json, cfg, reports)
        print(f"\nwrote {args.json}")

"""`compare`: one model laid out under several strategies, against one device."""

import argparse
import json

import jax

import jaxmoe
from experiments.configs import config, seed, strategies
from jaxmoe.config import ConfigError, with_overrides
from jaxmoe.memory_check import check_fits, host_memory_bytes
from jaxmoe.paths import writable_file


def check_devices(strategies: list, devices: int) -> None:
    """`--devices N` against what the strategies use, before JAX makes N devices."""
    if devices < 1:
        raise ConfigError(f"--devices {devices}: must be at least 1; run with --devices 16")
    for s in strategies:
        s.check_devices(devices)
    used = max(s.n_devices for s in strategies)
    if devices > used:
        raise ConfigError(
            f"--devices {devices}: the strategies use at most {used}; run with --devices {used}"
        )


def run(args: argparse.Namespace) -> None:
    cfg = with_overrides(config(args.config), assignments=args.set)
    layouts = strategies(args.strategies, args.transfer_bits)
    check_devices(layouts, args.devices)
    seed(args.seed, "--seed")
    if args.json:
        writable_file(args.json, "--json")
    check_fits(
        cfg,
        host_memory_bytes(),
        copies=2,
        copies_why="one device's reference and each layout's copy",
        where="on this machine",
    )
    # Before JAX starts its backend: nothing above has touched a device.
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", args.devices)

    result = jaxmoe.compare(cfg, layouts, phase=args.phase, devices=jax.devices(), seed=args.seed)
    print(result.table())
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    result.check_finite()  # after the table and the JSON: they show which layouts

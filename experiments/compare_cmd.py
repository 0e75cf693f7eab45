"""`compare`: one model laid out under several strategies, against one device."""

import argparse
import json

import jaxmoe
import meshes
from experiments.configs import config, enough_devices, seed, strategies
from jaxmoe import platform
from jaxmoe.compare import can_split
from jaxmoe.config import ConfigError, with_overrides
from jaxmoe.memory_check import check_fits, host_memory_bytes
from jaxmoe.paths import writable_file


def check_devices(strategies: list, devices: int) -> None:
    """`--devices N` against what the strategies use, before JAX makes N devices."""
    platform.check_count(devices)
    for s in strategies:
        s.check_devices(devices)
    used = max(s.n_devices for s in strategies)
    if devices > used:
        raise ConfigError(
            f"--devices {devices}: the strategies use at most {used}; run with --devices {used}"
        )


def run(args: argparse.Namespace) -> None:
    cfg = with_overrides(config(args.config), assignments=args.set)
    named = args.strategies is not None  # else every registered layout that can split the model
    layouts = strategies(args.strategies if named else ",".join(meshes.LAYOUTS), args.transfer_bits)
    if not named:
        layouts, _ = can_split(cfg, layouts)  # jaxmoe.compare lists the others
    if args.devices is not None:
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
    chosen = platform.select(args.platform, args.devices)
    devices = chosen.devices
    if args.devices is None:  # the first ones, as many as the strategies use
        used = max(s.n_devices for s in layouts)
        enough_devices(chosen, used, "the strategies")
        devices = devices[:used]
    result = jaxmoe.compare(
        cfg, layouts if named else None, phase=args.phase, devices=devices, seed=args.seed,
        transfer_bits=args.transfer_bits,
    )  # fmt: skip
    print(result.table())
    if args.json:
        args.json.write_text(json.dumps(result.to_json(), indent=2) + "\n")
        print(f"\nwrote {args.json}")
    result.check_finite()  # after the table and the JSON: they show which layouts

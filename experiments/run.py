"""`python -m experiments.run [compare] [options]`: the main job.

Lays one model over every registered strategy on 16 virtual CPU devices (the program sets the
device count itself), checks each against the one-device forward pass and prints one table.
"""

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import jax

import meshes
from experiments import report
from jaxmoe.compare import compare_strategies
from jaxmoe.config import DEFAULT_PRESET, ConfigError, preset, with_overrides


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    strategies = "\n".join(f"  {s.name:<16} {s.description}" for s in meshes.REGISTRY.values())
    parser = argparse.ArgumentParser(
        prog="python -m experiments.run",
        description=__doc__,
        epilog=f"strategies:\n{strategies}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", nargs="?", default="compare", choices=["compare"])
    parser.add_argument("--strategies", default=",".join(meshes.REGISTRY), help="comma-separated")
    parser.add_argument("--config", default=DEFAULT_PRESET, help="a named configuration")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (repeatable)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here as JSON")
    parser.add_argument("--devices", type=int, default=16, help="virtual CPU devices to use")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def compare(args: argparse.Namespace) -> None:
    cfg = with_overrides(preset(args.config), args.set)
    strategies = [meshes.get(name.strip()) for name in args.strategies.split(",") if name.strip()]
    if not strategies:
        raise ConfigError(
            "--strategies is empty; name at least one of " + ", ".join(meshes.REGISTRY)
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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        compare(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

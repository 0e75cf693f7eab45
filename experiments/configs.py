"""`--config NAME` for every command: a library preset, or a paper's experiment (its tiny model,
the one that runs on a CPU; `experiment NAME --scale full` compiles the full one); and the
flags several commands share, with their checks."""

import argparse

import meshes
from jaxmoe import catalogue
from jaxmoe.config import MAX_INT, ConfigError, ModelConfig
from jaxmoe.platform import PLATFORMS, Platform

DEVICES = 16  # the papers' machines: what experiment, plan and explain lay models over


def platform_flags(
    parser: argparse.ArgumentParser, devices_help: str, devices: int | None = None
) -> None:
    """`--platform` and `--devices` (default `devices`), for `jaxmoe.platform.select`."""
    parser.add_argument(
        "--platform",
        choices=PLATFORMS,
        help="run on this platform (default: what JAX finds: TPU or GPU where present, else CPU)",
    )
    parser.add_argument("--devices", type=int, default=devices, metavar="N", help=devices_help)


def enough_devices(chosen: Platform, n: int, who: str) -> None:
    """With no `--devices`, on a GPU or TPU: one line when `who` uses more devices than there are
    (on virtual CPU devices each layout's own check names the `--devices` it needs)."""
    if len(chosen.devices) < n and not chosen.virtual:
        raise ConfigError(
            f"{who} uses {n} devices, only {len(chosen.devices)} {chosen.name} devices here; "
            f"run with --platform cpu for {n} virtual CPU devices"
        )


def config(name: str) -> ModelConfig:
    return catalogue.config(name)


def seed(value: int, flag: str) -> int:
    if not 0 <= value < MAX_INT:  # seed + 1 is a seed too
        raise ConfigError(f"{flag} {value}: must be in 0..{MAX_INT - 1}; use e.g. {flag} 0")
    return value


def timing(warmup: int, iters: int) -> tuple[int, int]:
    """`--warmup N --iters N`: untimed calls (0 or more), timed calls (1 or more)."""
    if warmup < 0:
        raise ConfigError(f"--warmup {warmup}: must be 0 or more; use e.g. --warmup 3")
    if iters < 1:
        raise ConfigError(f"--iters {iters}: must be at least 1; use e.g. --iters 20")
    return warmup, iters


def strategies(text: str, transfer_bits: int = 0) -> list:
    """`--strategies a,b`: each name once, every one known (one line for the first that is not)."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise ConfigError(
            f"--strategies {text!r} is empty; name at least one of " + ", ".join(meshes.LAYOUTS)
        )
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"--strategies {text}: names {', '.join(twice)} twice; name each once")
    return [meshes.get(name, transfer_bits) for name in names]

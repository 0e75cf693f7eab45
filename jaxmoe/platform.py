"""Which devices a command runs on: the platform at hand (TPU or GPU where JAX finds one, else the
CPU), or the one asked for, and how many of its devices.

Every command calls `select` once, before anything starts a JAX backend. On the CPU it makes
virtual devices (16 by default: the papers' machines); on a GPU or TPU it takes every device
there, or the first `devices`. A command that only compiles for N devices on abstract inputs
(`compile_only`) compiles on N virtual CPU devices when the accelerator here has fewer, with one
note. `train` goes through `jaxmoe.runtime`, which calls select's two halves around JAX's
multi-controller runtime: `configure` before it starts, `attach` after.

    select(None, None)                      # 8 GPUs here: Platform("gpu", 8 devices)
    select("cpu", 16)                       # 16 virtual CPU devices, no GPU initialised
    select(None, 16, compile_only=True)     # 8 GPUs here: 16 virtual CPU devices and a note
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Mapping

import jax

from jaxmoe.config import ConfigError, ModelConfig

PLATFORMS = ("cpu", "gpu", "tpu")
CPU_DEVICES = 16  # virtual CPU devices unless --devices says otherwise
INSTALL = {  # the fix when a platform asked for is absent
    "gpu": 'JAX\'s CUDA build (pip install -e ".[cuda]", which brings jax[cuda12])',
    "tpu": 'JAX\'s TPU build (pip install "jax[tpu]")',
}

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Platform:
    """The devices a command runs on, all of one platform ("cpu", "gpu" or "tpu")."""

    name: str
    devices: tuple[jax.Device, ...]

    @property
    def virtual(self) -> bool:
        """CPU devices are made up by XLA, as many as asked, all sharing this machine's cores."""
        return self.name == "cpu"


@dataclasses.dataclass(frozen=True)
class Choice:
    """What `choose` decided: the platform, how many of its devices, and a note to log."""

    platform: str
    count: int
    note: str | None = None


def select(
    platform: str | None,
    devices: int | None,
    *,
    compile_only: bool = False,
    found: Mapping[str, int] | None = None,
) -> Platform:
    """The devices to run on: `platform` ("cpu", "gpu", "tpu"; None: TPU or GPU where present,
    else the CPU) and `devices` of it (None: 16 virtual CPU devices, or every GPU or TPU device).

    Call it before anything starts a JAX backend (it sets the CPU device count). `found` (platform
    -> device count) stands in for probing JAX. One-line `ConfigError` when the count is below 1,
    the platform asked for is absent, or it has fewer devices than asked; with `compile_only` and
    no platform asked for, fewer falls back to virtual CPU devices with a note instead.
    """
    check_count(devices)
    configure(platform, devices or CPU_DEVICES)
    return attach(platform, devices, compile_only=compile_only, found=found)


def check_count(devices: int | None) -> None:
    """`--devices N`: None (the command's default) or at least 1."""
    if devices is not None and devices < 1:
        raise ConfigError(
            f"--devices {devices}: must be at least 1; leave it out for the command's default"
        )


# XLA's CPU backend orders each program's instructions for concurrency by default, at a cost in
# memory: a training step copies the optimizer state long before its update reads the copies and
# holds them through the forward and backward passes. Virtual devices already share the cores, so
# the order that keeps the least memory live costs no time (bench_moe's dp2_tp4_pp2 step: 197 ->
# 173 MB of temporaries per device). XLA reads it when its CPU backend starts, from XLA_FLAGS
# (as a per-program compiler option it does not take effect).
CPU_FLAGS = {"--xla_cpu_enable_concurrency_optimized_scheduler": "false"}


def configure(platform: str | None, cpu_devices: int) -> None:
    """Before any backend starts: `cpu_devices` virtual CPU devices in this process, XLA's CPU
    flags (CPU_FLAGS, where XLA_FLAGS does not set them already), and nothing but the CPU when
    `platform` is "cpu" (a GPU is then never initialised). Where JAX has already started (a
    notebook, a test), its CPU devices and flags stay as they are: `attach` checks that there
    are enough devices."""
    flags = os.environ.get("XLA_FLAGS", "")
    given = {f.split("=")[0] for f in flags.split()}
    added = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in given]
    os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    with contextlib.suppress(RuntimeError):  # raised once backends are up: the count stays
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if platform == "cpu":
        jax.config.update("jax_platforms", "cpu")


def attach(
    platform: str | None,
    devices: int | None,
    *,
    compile_only: bool = False,
    found: Mapping[str, int] | None = None,
) -> Platform:
    """After `configure` (and JAX's multi-controller runtime, if any): `choose` among the
    platforms found, log its note, and return the chosen devices (of every process)."""
    choice = choose(
        platform, devices, available() if found is None else found, compile_only=compile_only
    )
    if choice.note:
        log.warning(choice.note)
    chosen = tuple(jax.devices(choice.platform)[: choice.count])
    if choice.platform != jax.default_backend():  # arrays made without a device go there too
        jax.config.update("jax_default_device", chosen[0])
    return Platform(choice.platform, chosen)


def available() -> dict[str, int]:
    """Device count of each platform JAX finds here (starts its backends)."""
    counts = {}
    for name in PLATFORMS:
        with contextlib.suppress(RuntimeError):  # JAX's answer for a platform not here
            counts[name] = len(jax.devices(name))
    return counts


def choose(
    platform: str | None,
    devices: int | None,
    found: Mapping[str, int],
    *,
    compile_only: bool = False,
) -> Choice:
    """The platform and device count for `platform` and `devices` (as `select`) among the
    platforms `found` (name -> device count); the decision alone, nothing started."""
    if platform is None:
        name = next((p for p in ("tpu", "gpu") if found.get(p)), "cpu")
    elif platform not in PLATFORMS:
        raise ConfigError(f"--platform {platform}: choose one of {', '.join(PLATFORMS)}")
    elif found.get(platform):
        name = platform
    else:
        raise ConfigError(
            f"--platform {platform}: JAX finds no {platform} device here; install "
            f"{INSTALL[platform]}, or run with --platform cpu"
        )
    here = found.get(name, 0)
    count = devices or here
    if count <= here:
        return Choice(name, count)
    if compile_only and platform is None and found.get("cpu", 0) >= count:
        return Choice(
            "cpu",
            count,
            f"{count} devices to compile for, {here} {name} devices here: compiling on {count} "
            "virtual CPU devices (nothing runs)",
        )
    fix = "" if name == "cpu" else f", or --platform cpu for {count} virtual CPU devices"
    raise ConfigError(
        f"--devices {count}: only {here} {name} devices here; run with --devices {here}{fix}"
    )


__all__ = [
    "CPU_DEVICES",
    "PLATFORMS",
    "Choice",
    "Platform",
    "attach",
    "available",
    "check_count",
    "choose",
    "compile_program",
    "configure",
    "read_only_config",
    "select",
]


# XLA's CPU backend has no half-precision matmul of its own. It runs each one in float32, and
# converts the stacked weights to float32 whole, ahead of the loop over layers (loop-invariant code
# motion): buffers of twice the weights that an accelerator never holds. A program compiled
# without that motion converts one layer's weights at a time.
CPU_HALF_PRECISION_PASSES = ("while-loop-invariant-code-motion",)
# A program compiled only to be read (memory per device, collectives, FLOPs), never run, goes
# further. Its bfloat16 is compiled as float16, which has the same width and which the CPU's
# matmul takes natively when XLA does not convert it (change-op-data-type), so no float32 copy of
# a weight is made at all. Run, such a program would accumulate in float16; it is never run.
CPU_READ_ONLY_PASSES = (*CPU_HALF_PRECISION_PASSES, "change-op-data-type")


def compile_program(
    lowered: jax.stages.Lowered, dtype: str, *, read_only: bool = False
) -> jax.stages.Compiled:
    """`lowered.compile()`, for a model computing in `dtype`; `read_only`: the program is only
    read, never run, and was traced from `read_only_config` (see CPU_READ_ONLY_PASSES)."""
    options = None
    if dtype in ("bfloat16", "float16") and jax.default_backend() == "cpu":
        passes = CPU_READ_ONLY_PASSES if read_only else CPU_HALF_PRECISION_PASSES
        options = {"xla_disable_hlo_passes": ",".join(passes)}
    return lowered.compile(compiler_options=options)


def read_only_config(cfg: ModelConfig) -> ModelConfig:
    """The config whose program, compiled here to be read and never run, has the memory per
    device, collectives and FLOPs that `cfg`'s has on an accelerator: on the CPU its bfloat16 as
    float16 (the same widths; see CPU_READ_ONLY_PASSES), elsewhere `cfg` itself."""
    if jax.default_backend() != "cpu":
        return cfg

    def same_width(dtype: str) -> str:
        return "float16" if dtype == "bfloat16" else dtype

    return cfg.replace(dtype=same_width(cfg.dtype), param_dtype=same_width(cfg.param_dtype))

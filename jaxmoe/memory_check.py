"""Will a model fit? Checked from its config before anything is allocated, so a model too big
for the machine gets one line (a `ConfigError`) instead of an allocator's abort mid-run."""

from __future__ import annotations

import os
from pathlib import Path

import jax

from jaxmoe.config import ConfigError, ModelConfig

CGROUP_LIMITS = (  # cgroup v2, v1: a container's limit
    Path("/sys/fs/cgroup/memory.max"),
    Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"),
)


def param_bytes(cfg: ModelConfig) -> int:
    """Bytes of the model's parameters, from their abstract shapes (nothing allocated)."""
    from jaxmoe.placement import abstract_model, param_bytes_total

    return param_bytes_total(abstract_model(cfg)[1])


def cache_token_bytes(cfg: ModelConfig) -> int:
    """Cache bytes per token per layer, in the compute dtype: keys and values of every key-value
    head (2 J K), or latent attention's latent and rotary key (R + K_rope)."""
    width = cfg.kv_lora_rank + cfg.rope_head_dim if cfg.is_mla else 2 * cfg.kv_heads * cfg.head_dim
    return width * cfg.compute_dtype.itemsize


def cache_bytes(cfg: ModelConfig) -> int:
    """Bytes of the KV cache of the whole batch at `seq_len` positions, every layer."""
    return cfg.batch * cfg.seq_len * cfg.n_layers * cache_token_bytes(cfg)


def host_memory_bytes() -> int | None:
    """This machine's memory, or its container's limit where that is lower (None: unknown)."""
    try:
        found = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        found = None
    for path in CGROUP_LIMITS:
        try:
            limit = int(path.read_text().split()[0])
        except (OSError, ValueError, IndexError):  # absent, or "max": no limit
            continue
        found = limit if found is None else min(found, limit)
    return found


def device_memory_bytes(device: jax.Device) -> int | None:
    """The memory one device may use: its allocator's limit where the backend reports one (GPUs),
    else the host's (a CPU device's arrays live in host memory)."""
    try:
        stats = device.memory_stats()
    except Exception:  # backends without statistics raise various errors
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return host_memory_bytes()


def check_fits(
    cfg: ModelConfig,
    available: int | None,
    *,
    copies: int = 1,
    copies_why: str = "",
    cache: bool = False,
    where: str = "here",
) -> None:
    """One line before anything is allocated when `copies` of the parameters (and the KV cache,
    with `cache`) exceed `available` bytes (None: unknown, no check). Only what must be held is
    counted, so a model refused here cannot run; one that passes may still be too big for its
    activations."""
    if available is None:
        return
    params = param_bytes(cfg)
    need = copies * params
    held = f"parameters {_gib(params)}" + (f" x {copies} ({copies_why})" if copies > 1 else "")
    if cache:
        need += cache_bytes(cfg)
        held += f" + KV cache {_gib(cache_bytes(cfg))}"
    if need > available:
        raise ConfigError(
            f"config {cfg.name} (d_model={cfg.d_model}, d_ff={cfg.d_ff}, n_layers={cfg.n_layers},"
            f" vocab_size={cfg.vocab_size}): {held} = {_gib(need)}, more than the "
            f"{_gib(available)} of memory {where}; choose a smaller model with --set, or use "
            f"plan or explain, which allocate nothing"
        )


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"

"""A layout's cost from its rule table alone, nothing compiled: what `plan` prunes by before it
compiles the most promising layouts.

For one mesh of rules (a `Strategy`) and one phase:
- memory per device, a floor: the weights the rules leave each device (with gradients, and
  Adam's two moments as `Strategy.state_spec` splits them, when training) and its share of the
  KV cache when decoding; activations are left out, so a layout pruned for memory cannot fit
  whatever they take;
- compute: the model's matmul FLOPs (2 per weight a token meets: its experts' share of the expert
  weights; attention's scores and values) spread evenly over the devices, idled by a pipeline's
  bubble;
- memory traffic: the weights each device reads where it uses them (all its layer's weights for
  FSDP) and, decoding, its share of the KV cache;
- communication: the layout's least bytes per layer (x2 and the gradient sums when training;
  a pipeline's idle iterations sending as the busy ones do),
  over NVLink when the devices that exchange them share a node, the network otherwise.

The estimate is the largest of the three times, and compute-or-memory plus communication, as the
roofline bound's two figures.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
from jax.sharding import PartitionSpec

from jaxmoe.analysis.hardware import Hardware
from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.inference import layout_cache
from jaxmoe.layout import minimum_per_layer
from jaxmoe.model.transformer import cache_logical
from jaxmoe.placement import abstract_model
from jaxmoe.sharding import BATCH_AXES, Strategy, logical_specs, part_axes


@dataclasses.dataclass(frozen=True)
class Estimate:
    """Seconds per call (floors, as the bound's: everything overlapped, and communication
    exposed) and bytes per device."""

    seconds: float
    serial_seconds: float
    memory_bytes: float

    def fits(self, hw: Hardware) -> bool:
        return self.memory_bytes <= hw.hbm_bytes


@functools.cache
def _weights(cfg: ModelConfig) -> tuple[tuple[tuple, int, bool], ...]:
    """Each parameter's logical axes, shape, bytes, and whether it is an expert weight."""
    state = abstract_model(cfg)[1]
    specs = jax.tree.leaves(logical_specs(state), is_leaf=lambda x: isinstance(x, PartitionSpec))
    return tuple(
        (tuple(spec), a.shape, a.size * a.dtype.itemsize, Axis.EXPERT in tuple(spec))
        for spec, a in zip(specs, jax.tree.leaves(state), strict=True)
    )


def _split(strategy: Strategy, logical: tuple, shape: tuple, *, param: bool) -> int:
    return _parts(strategy, strategy.spec(logical, param=param, shape=shape))


def _parts(strategy: Strategy, spec: PartitionSpec) -> int:
    """The blocks an array of this spec is split into."""
    sizes = strategy.axis_sizes
    return math.prod(sizes[a] for part in spec for a in part_axes(part))


def _cache_per_device(strategy: Strategy, cfg: ModelConfig) -> float:
    """The decoding cache's bytes per device, from its arrays' shapes and layout."""
    cache = jax.eval_shape(lambda: layout_cache(cfg, strategy))
    specs = jax.tree.leaves(cache_logical(cache), is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(
        a.size * a.dtype.itemsize / _split(strategy, tuple(spec), a.shape, param=False)
        for spec, a in zip(specs, jax.tree.leaves(cache), strict=True)
    )


def estimate(strategy: Strategy, cfg: ModelConfig, hw: Hardware, phase: str) -> Estimate:
    """`phase`: "prefill" (cfg's batch of whole sequences), "decode" (one token per sequence of
    the batch, a full cache of seq_len) or "train" (a step on cfg's batch)."""
    n = strategy.n_devices
    weights = _weights(cfg)
    held = sum(size / _split(strategy, axes, shape, param=True) for axes, shape, size, _ in weights)
    moments = sum(
        size / _parts(strategy, strategy.state_spec(axes, shape))
        for axes, shape, size, _ in weights
    )
    read = sum(
        size / _split(strategy, axes, shape, param=False) for axes, shape, size, _ in weights
    )
    total = sum(size for _, _, size, _ in weights)
    expert = sum(size for *_, size, is_expert in weights if is_expert)
    item = cfg.weight_dtype.itemsize
    active = (total - expert + expert * cfg.top_k * cfg.capacity_factor / cfg.n_experts) / item
    # FLOPs per token-position pair: scores over q.k dims, then values
    attention = cfg.n_layers * cfg.n_heads * (cfg.qk_head_dim + cfg.value_head_dim)
    if phase == "decode":
        tokens, pairs = cfg.batch, cfg.batch * cfg.seq_len
    else:
        tokens, pairs = cfg.tokens, cfg.batch * cfg.seq_len * (cfg.seq_len + 1) // 2
    flops = (2 * active * tokens + 2 * attention * pairs) * (3 if phase == "train" else 1)
    busy = 1 - strategy.bubble_fraction(cfg)
    compute = flops / n / hw.peak_flops(cfg.dtype) / busy
    cached = _cache_per_device(strategy, cfg) if phase == "decode" else 0.0
    memory = (read * (3 if phase == "train" else 1) + cached) / hw.hbm_bandwidth
    copies = n * held / total  # mean devices holding each weight
    sync = 2 * held * (1 - 1 / copies) if phase == "train" else 0.0
    # a pipeline's idle iterations send as its busy ones do
    sent = minimum_per_layer(cfg, strategy, phase, sync) * cfg.n_layers / busy
    comm = sent / _link(strategy, hw)
    kept = (2 * held + 2 * moments if phase == "train" else held) + cached
    return Estimate(max(compute, memory, comm), max(compute, memory) + comm, kept)


def _link(strategy: Strategy, hw: Hardware) -> float:
    """NVLink when the mesh axes that move a layer's data span one node at most (tensor and
    experts innermost), the network otherwise."""
    moving = strategy.axes_splitting((*BATCH_AXES, Axis.LAYERS))
    span = 1
    for name, size in reversed(strategy.mesh_shape):  # innermost first
        span *= size
        if name in moving and span > hw.per_node:
            return hw.network_bandwidth
    return hw.nvlink_bandwidth

"""What a layout does to one model, read from its compiled programs: the view a user debugging a
sharding reads instead of HLO.

Per parameter: its logical axes, the partition spec the compiled program gives it, and the bytes
one device holds. Per layer: the collectives inside the layer loop with the mesh axes they span
and the bytes one device sends (and those outside it: embeddings, LM head). Per device: memory
by part. `phase` picks the program: the forward pass (memory: parameters, the optimizer state
training would hold, the forward pass's activations, the KV cache), the training step
(parameters, gradients, optimizer state, activations), prefill or decode. Each layout builds
its own explanation (`LaidOut.explain`) from the helpers here.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence

import jax
from flax import nnx

from jaxmoe import report
from jaxmoe.analysis.collectives import Inventory
from jaxmoe.config import ModelConfig
from jaxmoe.layout import Layout, Phase
from jaxmoe.model.counts import param_counts
from jaxmoe.placement import path_name


def _spec(sharding) -> list:
    return [list(p) if isinstance(p, tuple) else p for p in sharding.spec]


def collectives_by_place(
    inv: Inventory, n_layers: int, in_layers: bool | None = None
) -> list[dict]:
    """Collectives grouped by kind, mesh axes and place: in the layer loop (or, `in_layers`,
    all of them) per layer, the rest per call."""
    groups: dict[tuple, list] = defaultdict(lambda: [0, 0])
    for c in inv.collectives:
        inside = c.loop_depth > 0 if in_layers is None else in_layers
        where = "per layer" if inside else "outside the layers"
        key = (c.kind, "x".join(c.axes) if c.axes else "devices", where)
        groups[key][0] += c.executions
        groups[key][1] += c.executions * c.bytes_sent
    return [
        {
            "kind": kind,
            "axes": axes,
            "where": where,
            "count": count / (n_layers if where == "per layer" else 1),
            "bytes_per_device": sent / (n_layers if where == "per layer" else 1),
        }
        for (kind, axes, where), (count, sent) in sorted(groups.items())
    ]


def parameters(abstract: nnx.State, shardings: dict) -> list[dict]:
    """Each parameter: path, shape, logical axes, partition spec and bytes per device."""
    logical = nnx.get_partition_spec(abstract)
    axes = {
        name: [str(a) if a else None for a in spec]
        for name, spec in named(logical, lambda x: isinstance(x, jax.sharding.PartitionSpec))
    }
    return [
        {
            "path": path,
            "shape": list(leaf.shape),
            "logical_axes": axes[path],
            "spec": _spec(sharding),
            "bytes_per_device": math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize,
        }
        for path, (leaf, sharding) in sorted(shardings.items())
    ]


def named(tree, is_leaf) -> list[tuple[str, object]]:
    return [
        (path_name(path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    ]


@dataclasses.dataclass(frozen=True)
class Explanation:
    """What a layout does to a model in one phase: per parameter, per layer, per device."""

    strategy: str
    phase: Phase
    mesh: dict
    parameters: tuple[dict, ...]  # path, shape, logical axes, partition spec, bytes per device
    collectives: tuple[dict, ...]  # kind, mesh axes, where, count, bytes sent per device
    memory_per_device: dict[str, int]
    params_total: int  # the model's parameters
    params_active: int  # those one token uses (top_k of each MoE layer's experts)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {
            "parameters": list(self.parameters),
            "collectives": list(self.collectives),
        }

    def text(self) -> str:
        return report.explain_text(self.to_json())


def explain(
    cfg: ModelConfig, layout: Layout, devices: Sequence[jax.Device], phase: Phase = "forward"
) -> Explanation:
    """The explanation of `layout` for `cfg` and `phase` (see the module docstring)."""
    doc = layout.lay_out(cfg, devices).explain(phase)
    counts = param_counts(cfg)
    return Explanation(
        doc["strategy"],
        doc["phase"],
        doc["mesh"],
        tuple(doc["parameters"]),
        tuple(doc["collectives"]),
        doc["memory_per_device"],
        counts.total,
        counts.active,
    )

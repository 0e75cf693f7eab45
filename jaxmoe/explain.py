"""What a layout does to one model, read from its compiled programs: the view a user debugging a
sharding reads instead of HLO.

Per parameter: its logical axes, the partition spec the compiled program gives it, and the bytes
one device holds. Per layer: the collectives inside the layer loop with the mesh axes they span
and the bytes one device sends (and those outside it: embeddings, LM head). Per device: memory
for parameters, optimizer state (Adam's two moments, split like the parameters), activations
(the compiled training step's temporaries) and the KV cache of `batch` sequences of `seq_len`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence

import jax
from flax import nnx

from jaxmoe.analysis.collectives import Inventory, inventory
from jaxmoe.analysis.memory import memory_per_device
from jaxmoe.compare import compile_forward
from jaxmoe.config import ModelConfig
from jaxmoe.inference import cache_sharding
from jaxmoe.model import init_cache
from jaxmoe.placement import compiled_param_shardings, path_name, place
from jaxmoe.separation import Separated, Separation, cost
from jaxmoe.sharding import Strategy
from jaxmoe.train.recipe import TrainConfig
from jaxmoe.train.steps import make_trainer


def _spec(sharding) -> list:
    return [list(p) if isinstance(p, tuple) else p for p in sharding.spec]


def _collectives(inv: Inventory, n_layers: int, in_layers: bool | None = None) -> list[dict]:
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


def _parameters(abstract: nnx.State, shardings: dict) -> list[dict]:
    logical = nnx.get_partition_spec(abstract)
    axes = {
        name: [str(a) if a else None for a in spec]
        for name, spec in _named(logical, lambda x: isinstance(x, jax.sharding.PartitionSpec))
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


def _named(tree, is_leaf) -> list[tuple[str, object]]:
    return [
        (path_name(path), leaf)
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=is_leaf)
    ]


def explain(cfg: ModelConfig, layout: Strategy | Separation, devices: Sequence[jax.Device]):
    """The explanation of `layout` for `cfg`, as plain data (see the module docstring)."""
    if isinstance(layout, Separation):
        return _explain_separated(cfg, layout, devices)
    placement = place(cfg, layout, devices[: layout.n_devices])
    forward = compile_forward(placement)
    shardings = compiled_param_shardings(forward, placement.abstract)
    params = _parameters(placement.abstract, shardings)
    held = sum(p["bytes_per_device"] for p in params)
    trainer = make_trainer(cfg, layout, devices[: layout.n_devices], TrainConfig())
    step = trainer.step.lower(
        *trainer.abstract_state,
        jax.ShapeDtypeStruct(
            (cfg.batch, cfg.seq_len + 1), "int32", sharding=trainer.batch_sharding
        ),
        0,
    ).compile()
    opt_held = sum(
        math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
        for a in jax.tree.leaves(trainer.abstract_state[1])
    )
    cache = jax.eval_shape(lambda: init_cache(cfg, cfg.batch))
    kv = cache_sharding(placement)
    cache_bytes = sum(
        math.prod(kv.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(cache)
    )
    return {
        "strategy": layout.name,
        "mesh": layout.axis_sizes,
        "parameters": params,
        "collectives": _collectives(inventory(forward.as_text(), layout.axis_sizes), cfg.n_layers),
        "memory_per_device": {
            "parameters": held,
            "optimizer_state": opt_held,
            "activations": memory_per_device(step)["temporaries"],
            "kv_cache": cache_bytes,
        },
    }


def _explain_separated(cfg: ModelConfig, sep: Separation, devices: Sequence[jax.Device]):
    run = Separated(cfg, sep, devices)
    forward = cost.compile_pieces(run, "forward")
    params, collectives = [], []
    placed = run.abstract_params()  # every piece's program takes these as they are
    for mesh, prefix, abstract in (
        ("attention", "", placed.outer),
        ("attention", "blocks/<each>/", placed.attention[0]),
        ("experts", "blocks/<each>/moe/moe/", placed.experts[0]),
    ):
        shardings = {name: (leaf, leaf.sharding) for name, leaf in _named(abstract, None)}
        params += [
            {**p, "path": f"{prefix}{p['path']}", "mesh": mesh}
            for p in _parameters(abstract, shardings)
        ]
    for mesh, inv in cost.mesh_inventories(run, forward).items():
        collectives += [c | {"mesh": mesh} for c in _collectives(inv, cfg.n_layers, True)]
    memory = cost.memory(run, forward, "forward")
    return {
        "strategy": sep.name,
        "mesh": {"attention": sep.attention.axis_sizes, "experts": sep.experts.axis_sizes},
        "parameters": params,
        "collectives": collectives,
        "memory_per_device": {
            f"{mesh}_{part}": memory[f"{mesh}_{part}"]
            for mesh in ("attention", "experts")
            for part in ("parameters", "states", "temporaries")
        }
        | {"attention_kv_cache": cost.cache_bytes(run)},
    }

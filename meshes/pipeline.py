"""A GPipe schedule inside one jitted program, for XLA's SPMD partitioner (GSPMD paper, sec. 3.3).

The stacked blocks [L, ...] are viewed as [P, L/P, ...] (stage-major, so stage p holds the
contiguous blocks a `pipe`-split layers axis gives it). A state buffer [P, B/M, S, D] holds the
micro-batch each stage works on; every iteration all stages run at once (`vmap` over P with
`spmd_axis_name`, so each stage runs on its own devices), then the buffer rotates by one stage,
which XLA lowers to a collective-permute over `pipe`. M micro-batches take M + P - 1 iterations;
the bubble is (P - 1) / (M + P - 1).

Step outputs (the MoE routing sums) are summed over the micro-batches each stage really worked
on, so they equal the unpipelined ones; each step is told which rows of the batch it has, so
expert dropout draws the same masks as an unpipelined run.
"""

import functools
import itertools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from jaxmoe.axes import Axis
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model.attention import RESIDUAL
from jaxmoe.model.transformer import cache_axes
from jaxmoe.sharding import (
    BATCH_AXES,
    Strategy,
    activation_layout,
    active_layout,
    constrain,
    logical_specs,
    manual_region,
    pipeline_stage,
    scan_layers,
)

STAGES = (Axis.LAYERS, *RESIDUAL)  # [P, B/M, S, D]: each stage's micro-batch on its devices
OUTPUTS = (Axis.LAYERS, None, *RESIDUAL)  # [P, M, B/M, S, D]: every micro-batch, by stage
# a block weight's dimension whose gradient the replicas reduce-scatter, and its layout over the
# other mesh axes (`_state_dims`); None: its gradient summed whole
StateDim = tuple[int, PartitionSpec] | None


def bubble_fraction(stages: int, micro_batches: int) -> float:
    return (stages - 1) / (micro_batches + stages - 1)


def check(cfg: ModelConfig, stages: int) -> None:
    if cfg.n_blocks % stages:
        raise ConfigError(
            f"n_layers={cfg.n_layers} gives {cfg.n_blocks} scanned blocks, not divisible into "
            f"{stages} pipeline stages; choose n_layers as a multiple of "
            f"{stages * cfg.layers_per_block}"
        )
    if cfg.batch % cfg.micro_batches:
        raise ConfigError(
            f"micro_batches={cfg.micro_batches} does not divide batch={cfg.batch}; "
            f"choose a divisor of the batch (--set micro_batches=...)"
        )


def gpipe(stage_axis: str) -> Callable:
    """A layer runner (see `jaxmoe.sharding.LayerRunner`) pipelining over mesh axis `stage_axis`
    (the one the layers are split over) with `cfg.micro_batches` micro-batches. Each micro-batch
    and its cache rows are split as the layout splits the batch, so picking one moves nothing.

    Where mesh axes split the batch and nothing else (data parallel replicas of the pipeline),
    a training or evaluation run (no cache) runs the schedule in a region manual over them: each
    replica accumulates its weights' gradient over the iterations and the replicas sum it once,
    where the region begins. (Left to XLA's partitioner, the gradient of weights whole on every
    replica is summed over them in every iteration of the schedule.)"""

    def run(
        step: Callable,
        x: jax.Array,
        per_block: Any,
        cache: Any,
        mesh: Mesh,
        cfg: ModelConfig,
        *,
        last_only: bool = False,
    ) -> tuple[jax.Array, Any, Any]:
        stages = mesh.shape[stage_axis]
        m = cfg.micro_batches
        n_blocks = jax.tree.leaves(per_block)[0].shape[0]

        def by_stage(a):  # [L, ...] -> [P, L/P, ...]
            return a.reshape(stages, n_blocks // stages, *a.shape[1:])

        blocks = jax.tree.map(by_stage, per_block)
        # a stage's cache by micro-batch: [L, B, ...] -> [P, L/P, M, B/M, ...]
        cache = jax.tree.map(
            lambda a: constrain(
                by_stage(a).reshape(*by_stage(a).shape[:2], m, -1, *a.shape[2:]),
                (Axis.LAYERS, None, None, *cache_axes(a)[1:]),
            ),
            cache,
        )
        micro = constrain(x.reshape(m, x.shape[0] // m, *x.shape[1:]), (None, *RESIDUAL))
        schedule = _schedule(step, stage_axis, mesh, stages, micro.shape[1], last_only)
        _, strategy = active_layout()
        replicas = _replica_axes(strategy) if cache is None else ()
        if replicas:
            dims = _state_dims(per_block, strategy, replicas)
            result, stats = _per_replica(schedule, micro, blocks, dims, mesh, strategy, replicas)
        else:
            result, stats, cache = schedule(micro, blocks, cache, 0)
        stats = jax.tree.map(lambda a: a.reshape(n_blocks, *a.shape[2:]), stats)
        cache = jax.tree.map(lambda a: a.reshape(n_blocks, -1, *a.shape[4:]), cache)
        return result.reshape(x.shape[0], *result.shape[2:]), stats, cache

    return run


def _schedule(
    step: Callable, stage_axis: str, mesh: Mesh, stages: int, rows: int, last_only: bool
) -> Callable:
    """The schedule: (micro [M, B/M, S, D], blocks [P, L/P, ...], cache, offset) -> (the last
    stage's results [M, B/M, S, D], step outputs [P, L/P, ...], cache), `micro` holding rows
    offset.. of each micro-batch of `rows` rows."""

    def schedule(micro, blocks, cache, offset):
        m = micro.shape[0]
        # every stage's own copy of the micro-batches [P, M, B/M, S, D], which the first stage
        # reads: the input's gradient then builds up where it arises and is summed over the
        # stages once, after the schedule (read from the shared copy, it would be summed over
        # `stage_axis` in every iteration)
        inputs = constrain(jnp.broadcast_to(micro, (stages, *micro.shape)), OUTPUTS)

        def stage(h, stage_blocks, stage_cache, index, busy):
            """One stage's blocks on micro-batch `index`; its cache rows change only if busy."""
            with pipeline_stage(stage_axis):
                return scan_layers(
                    step,
                    h,
                    stage_blocks,
                    stage_cache,
                    first_row=index * rows + offset,
                    indexed=True,
                    micro_batch=index,
                    busy=busy,
                )

        run_stages = jax.vmap(stage, spmd_axis_name=stage_axis)
        stage_ids = jnp.arange(stages)
        empty = jnp.zeros((stages, *micro.shape[1:]), micro.dtype)
        idle = (stage_ids, stage_ids < 0)
        _, stats_shape, _ = jax.eval_shape(run_stages, empty, blocks, cache, *idle)

        def iteration(carry, t):
            state, outputs, stats, cache = carry
            first = jax.lax.dynamic_index_in_dim(inputs, jnp.minimum(t, m - 1), 1, False)
            state = jnp.where((stage_ids == 0).reshape(-1, 1, 1, 1), first, state)
            busy = (t - stage_ids >= 0) & (t - stage_ids < m)  # [P]
            index = jnp.clip(t - stage_ids, 0, m - 1)  # [P] the micro-batch each stage has
            with jax.named_scope("pipeline_stages"):
                state = constrain(state, STAGES)
                out, step_stats, cache = run_stages(state, blocks, cache, index, busy)
            stats = jax.tree.map(
                lambda acc, new: (
                    acc + jnp.where(busy.reshape((-1,) + (1,) * (new.ndim - 1)), new, 0)
                ),
                stats,
                step_stats,
            )
            # every stage files its result under the micro-batch the last stage just finished;
            # only the last stage's row is read, once, after the loop (no traffic per iteration)
            done = jnp.maximum(t - (stages - 1), 0)
            kept = out[:, :, -1:] if last_only else out
            outputs = constrain(outputs.at[:, done].set(kept), OUTPUTS)
            with jax.named_scope("pipeline_shift"):
                state = constrain(_shift(out, mesh, stage_axis), STAGES)
            return (state, outputs, stats, cache), None

        kept_shape = (stages, *micro.shape[:2], 1 if last_only else micro.shape[2], micro.shape[3])
        init = (
            empty,
            jnp.zeros(kept_shape, micro.dtype),  # [P, M, B/M, S, D] (S = 1 with last_only)
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape),
            cache,
        )
        (_, outputs, stats, cache), _ = jax.lax.scan(iteration, init, jnp.arange(m + stages - 1))
        return _from_last_stage(outputs, mesh, stage_axis), stats, cache

    return schedule


def _replica_axes(strategy: Strategy) -> tuple[str, ...]:
    """The mesh axes, leading the batch's, that split the batch and nothing else (data
    parallel replicas: every weight whole on each; the stage axis splits the layers)."""
    elsewhere = strategy.axes_splitting(BATCH_AXES)
    return tuple(
        itertools.takewhile(lambda a: a not in elsewhere, strategy.rules.get(Axis.BATCH, ()))
    )


def _state_dims(per_block: Any, strategy: Strategy, axes) -> list[StateDim]:
    """For each leaf of the stacked blocks [L, ...], the dimension of its [P, L/P, ...] view
    whose gradient is reduce-scattered over the replicas `axes` (`Strategy.state_spec`: where
    its optimizer state is split) and the view's layout over the other mesh axes, or None:
    summed whole."""
    if tuple(strategy.state_axes) != tuple(axes):
        return [None] * len(jax.tree.leaves(per_block))
    names = jax.tree.leaves(
        logical_specs(per_block), is_leaf=lambda x: isinstance(x, PartitionSpec)
    )
    inside = strategy.without(axes)
    dims = []
    for logical, leaf in zip(names, jax.tree.leaves(per_block), strict=True):
        dim = None
        if isinstance(logical, PartitionSpec):
            dim = strategy.state_dim(tuple(logical), leaf.shape)
        if dim is None:
            dims.append(None)
            continue
        stage, *rest = inside.spec(tuple(logical), param=True, shape=leaf.shape)
        dims.append((dim + 1, PartitionSpec(stage, None, *rest)))
    return dims


def _per_replica(
    schedule: Callable,
    micro: jax.Array,
    blocks: Any,
    dims: list[StateDim],
    mesh: Mesh,
    strategy: Strategy,
    axes,
) -> tuple[jax.Array, Any]:
    """The schedule run by each replica (the devices of mesh axes `axes`) on its rows of every
    micro-batch, in a region manual over `axes`. Each replica builds up its blocks' gradient
    over the schedule; after it, a leaf with a dimension in `dims` has its gradient
    reduce-scattered over the replicas along it (ZeRO-1: each replica's shard is what its share
    of the optimizer state needs), the others summed whole where the region begins. The step
    outputs (sums) are summed over the replicas."""
    rows = PartitionSpec(None, axes)  # [M, B/M, ...]: each replica's rows of every micro-batch
    leaves, tree = jax.tree.flatten(blocks)
    shards = [leaf for leaf, dim in zip(leaves, dims, strict=True) if dim is not None]
    shard_specs = [PartitionSpec(*(None,) * d[0], axes) for d in dims if d is not None]

    def local(micro, blocks, shards):
        shards = iter(shards)
        blocks = tree.unflatten(
            leaf if d is None else _reduce_scattered(leaf, next(shards), mesh, axes, *d)
            for leaf, d in zip(jax.tree.leaves(blocks), dims, strict=True)
        )
        offset = jax.lax.axis_index(axes) * micro.shape[1]
        with activation_layout(mesh, strategy.without(axes)):
            result, stats, _ = schedule(micro, blocks, None, offset)
        return result, jax.tree.map(lambda s: jax.lax.psum(s, axes), stats)

    region = manual_region(
        local, mesh, (rows, PartitionSpec(), shard_specs), (rows, PartitionSpec()),
        axis_names=axes, check_vma=False,
    )  # fmt: skip
    return region(micro, blocks, shards)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _reduce_scattered(
    whole: jax.Array, shard: jax.Array, mesh: Mesh, axes, dim: int, spec: PartitionSpec
) -> jax.Array:
    """`whole`, a weight whole on every replica, whose gradient goes to `shard` (this replica's
    block of it along `dim`) reduce-scattered over `axes`, and none to `whole`. The replicas
    send half what an all-reduce does (the update's all-gather of the new weights, the other
    half), and nothing gathers the weight for the forward pass. `spec`: the weight's layout over
    the other mesh axes, which its gradient keeps."""
    return whole


def _whole_forward(whole, shard, mesh, axes, dim, spec):
    return whole, None


def _shard_gradient(mesh, axes, dim, spec, _, gradient):
    # manual over the other axes too (`manual_region`'s default: every axis the replicas'
    # region leaves): the partitioner gathers a reduce-scatter's operand whole over the axes it
    # leaves to XLA
    def scatter(g):
        return jax.lax.psum_scatter(g, axes, scatter_dimension=dim, tiled=True)

    return None, manual_region(scatter, mesh, (spec,), spec, check_vma=False)(gradient)


_reduce_scattered.defvjp(_whole_forward, _shard_gradient)


def _from_last_stage(outputs: jax.Array, mesh: Mesh, stage_axis: str) -> jax.Array:
    """The last stage's results [M, B/M, S, D] from every stage's [P, M, B/M, S, D]: where the
    batch is whole on each stage and the stages divide the micro-batches, reduce-scattered
    over `stage_axis` (the last stage sends each stage its share of the micro-batches, which
    the LM head then works on), else all-reduced (x + 0 = x) to every stage."""
    stages, m = mesh.shape[stage_axis], outputs.shape[1]
    _, strategy = active_layout()
    spec = strategy.spec(OUTPUTS, shape=outputs.shape)
    if spec[2] is not None or m % stages:
        last = (jnp.arange(stages) == stages - 1).reshape((-1,) + (1,) * (outputs.ndim - 1))
        return jnp.sum(jnp.where(last, outputs, 0), axis=0)

    def local(o):
        mine = jnp.where(jax.lax.axis_index(stage_axis) == stages - 1, o[0], 0)
        return jax.lax.psum_scatter(mine, stage_axis, scatter_dimension=0, tiled=True)

    out_spec = PartitionSpec(stage_axis, *spec[2:])
    return manual_region(local, mesh, (spec,), out_spec)(outputs)


def _shift(x: jax.Array, mesh: Mesh, stage_axis: str) -> jax.Array:
    """Each stage's output to the next stage ([P, ...] rolled by one along `stage_axis`): one
    collective-permute each way (the partitioner lowers a roll to all-to-alls inside a region
    manual over other axes)."""
    stages = mesh.shape[stage_axis]
    to_next = [(i, (i + 1) % stages) for i in range(stages)]
    spec = PartitionSpec(stage_axis)
    return manual_region(
        lambda x: jax.lax.ppermute(x, stage_axis, to_next), mesh, (spec,), spec,
        axis_names={stage_axis},
    )(x)  # fmt: skip

"""Logical axes -> mesh axes: the strategy value, partition specs, and activation constraints.

A `Strategy` is handed to the library as a value (the library never imports `meshes/`). Model
code calls `constrain(x, axes)` with logical axes only; inside `activation_layout(...)` that
becomes a sharding constraint for XLA's SPMD partitioner, outside it does nothing.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxmoe.axes import Axis
from jaxmoe.config import ConfigError, ModelConfig

MeshAxes = tuple[str, ...]
BATCH_AXES = (Axis.BATCH, Axis.ATTN_BATCH, Axis.LM_BATCH, Axis.GROUP)  # the tokens' B or G
Rules = Mapping[Axis, MeshAxes]
# (step, x, per_block, cache, mesh, cfg) -> (x, stacked step outputs, cache): run `step` over
# the stacked blocks. `step(x, block, block_cache, first_row) -> (x, outputs, block_cache)`, x
# being rows first_row.. of the batch; `cache` (None when not decoding) is stacked like the
# blocks with the batch on its second axis. With `last_only=True` the caller reads only the last
# position of x, and the runner may return just that ([B, 1, D]).
LayerRunner = Callable[
    [Callable, jax.Array, Any, Any, Mesh, ModelConfig], tuple[jax.Array, Any, Any]
]


def scan_layers(
    step: Callable,
    x: jax.Array,
    per_block: Any,
    cache: Any,
    *_,
    first_row=0,
    indexed=False,
    last_only=False,
    micro_batch=None,
    busy=None,
) -> tuple[jax.Array, Any, Any]:
    """The default layer runner: one `lax.scan` over the stacked blocks.

    A cache rides in the loop's carry, each block's slice read and written back at its index,
    so XLA updates it in place; scanned over as an input it would be stacked anew as an output
    (a copy of the whole cache, and more, in every decode step).

    `indexed`: the blocks too are read at their index, not scanned over. A pipeline stage runs
    under `vmap` over the stages; scanned over, its blocks [P, L/P, ...] would be transposed to
    put the layers first, a copy of the stage's weights in every iteration.

    `last_only` changes nothing here: every position is at hand and the caller slices.

    `micro_batch` (a pipeline stage's): the cache is [blocks, M, rows, ...] and each block reads
    and writes micro-batch `micro_batch`'s rows alone, written only where `busy` (an idle stage
    runs on an empty micro-batch), so no more than one block's rows of it are ever copied.
    """

    def read(c, index):
        here = jax.lax.dynamic_index_in_dim(c, index, 0, False)
        return (
            here
            if micro_batch is None
            else jax.lax.dynamic_index_in_dim(here, micro_batch, 0, False)
        )

    def write(c, new, old, index):
        if micro_batch is None:
            return jax.lax.dynamic_update_index_in_dim(c, new, index, 0)
        new = jnp.where(busy, new, old)[None, None]
        start = (index, micro_batch) + (0,) * (c.ndim - 2)
        return jax.lax.dynamic_update_slice(c, new.astype(c.dtype), start)

    def body(carry, block):
        x, cache, index = carry
        if indexed:
            block = jax.tree.map(
                lambda b: jax.lax.dynamic_index_in_dim(b, index, 0, False), per_block
            )
        old = jax.tree.map(lambda c: read(c, index), cache)
        x, outputs, here = step(x, block, old, first_row)
        cache = jax.tree.map(lambda c, h, o: write(c, h, o, index), cache, here, old)
        return (x, cache, index + 1), outputs

    blocks = None if indexed else per_block
    length = jax.tree.leaves(per_block)[0].shape[0]
    (x, cache, _), outputs = jax.lax.scan(body, (x, cache, 0), blocks, length=length)
    return x, outputs, cache


@dataclasses.dataclass(frozen=True)
class Strategy:
    """A placement: a mesh shape, logical-to-mesh rules and the least traffic of the layout.

    `param_rules` are the rules of parameters where they differ from the activations' (FSDP
    splits each weight's model width over the devices that split the batch, and gathers it for
    use); `gathered_axes` are the mesh axes they add.

    `minimum_bytes(cfg)` gives the least bytes one device must send per layer in the forward
    pass, as `{"dense": ..., "moe": ...}` (and what a training step adds: `Layout.minimum_bytes`),
    from the ring formulas of strategies.md. Where rules
    cannot say it, `run_layers` replaces the scan over the blocks (a pipeline schedule),
    `extra_checks(cfg)` adds the strategy's own checks, raising ConfigError, and
    `bubble_fraction(cfg)` is the share of a pipeline schedule's iterations a stage spends idle
    (0 without one). `state_axes` are mesh axes over which the stacked blocks' optimizer state
    is split although the blocks are whole on each of their devices (ZeRO-1: `state_spec`), the
    layer runner reduce-scattering the blocks' gradient over them. A strategy is a
    `jaxmoe.layout.Layout` over one mesh.
    """

    name: str
    mesh_shape: tuple[tuple[str, int], ...]
    rules: Rules
    description: str
    minimum_bytes: Callable[[ModelConfig], dict[str, float]]
    run_layers: LayerRunner = scan_layers
    extra_checks: Callable[[ModelConfig], None] = lambda cfg: None
    bubble_fraction: Callable[[ModelConfig], float] = lambda cfg: 0.0
    param_rules: Rules = dataclasses.field(default_factory=dict)
    state_axes: MeshAxes = ()

    def __post_init__(self) -> None:
        names = {axis for axis, _ in self.mesh_shape}
        for logical, mesh_axes in (*self.rules.items(), *self.param_rules.items()):
            if not isinstance(logical, Axis):
                raise TypeError(f"{self.name}: rule key {logical!r} is not an Axis")
            unknown = set(mesh_axes) - names
            if unknown or len(set(mesh_axes)) != len(mesh_axes):
                raise ValueError(f"{self.name}: rule {logical} -> {mesh_axes} is not over {names}")
        if set(self.state_axes) - names:
            raise ValueError(f"{self.name}: state axes {self.state_axes} are not over {names}")

    @property
    def n_devices(self) -> int:
        return math.prod(size for _, size in self.mesh_shape)

    @property
    def axis_sizes(self) -> dict[str, int]:
        return dict(self.mesh_shape)

    # ---- the Layout interface (jaxmoe.layout) ------------------------------------------------
    @property
    def mesh(self) -> dict[str, int]:
        return self.axis_sizes

    @property
    def strategies(self) -> dict[str, Strategy]:
        return {"mesh": self}

    def check(self, cfg: ModelConfig, n_devices: int | None = None) -> None:
        if n_devices is not None:
            self.check_devices(n_devices)
        check_divisible(cfg, self)

    def check_devices(self, n_devices: int) -> None:
        if n_devices != self.n_devices:
            raise ConfigError(
                f"strategy {self.name} needs {self.n_devices} devices, {n_devices} given; "
                f"run with --devices {self.n_devices}"
            )

    def variants(self, cfg: ModelConfig) -> list[tuple[ModelConfig, str]]:
        return [(cfg, self.name)]

    def estimate(self, cfg: ModelConfig, hw, phase: str):
        from jaxmoe.estimate import estimate  # it reads this module's strategies

        return estimate(self, cfg, hw, phase)

    def lay_out(self, cfg: ModelConfig, devices: Sequence[jax.Device]):
        from jaxmoe.spmd import SpmdRun  # it builds on this module

        return SpmdRun(cfg, self, devices)

    def make_mesh(self, devices: Sequence[jax.Device]) -> Mesh:
        self.check_devices(len(devices))
        shape = tuple(size for _, size in self.mesh_shape)
        names = tuple(name for name, _ in self.mesh_shape)
        grid = np.asarray(devices, dtype=object).reshape(shape)
        return Mesh(grid, names, axis_types=(AxisType.Auto,) * len(names))

    def without(self, mesh_axes: Collection[str]) -> Strategy:
        """This strategy as code sees it in a region manual over `mesh_axes`: nothing split
        over them (each device of the region holds its share as a whole array)."""

        def drop(rules: Rules) -> dict[Axis, MeshAxes]:
            return {k: tuple(a for a in v if a not in mesh_axes) for k, v in rules.items()}

        return dataclasses.replace(
            self,
            rules=drop(self.rules),
            param_rules=drop(self.param_rules),
            state_axes=tuple(a for a in self.state_axes if a not in mesh_axes),
        )

    def axes_splitting(self, skip: Collection[Axis]) -> set[str]:
        """The mesh axes that split some parameter or activation axis other than `skip`."""
        rules = self.weight_rules
        return {a for logical, axes in rules.items() if logical not in skip for a in axes}

    @property
    def weight_rules(self) -> Rules:
        """The rules of parameters: the activations' with `param_rules` over them."""
        return {**self.rules, **self.param_rules}

    @property
    def gathered_axes(self) -> MeshAxes:
        """Mesh axes that split parameters but not the activations of the same logical axis: a
        parameter split over them is gathered for use and its gradient reduce-scattered."""
        found = {
            a for axis, axes in self.param_rules.items() for a in axes
            if a not in self.rules.get(axis, ())
        }  # fmt: skip
        return tuple(name for name, _ in self.mesh_shape if name in found)

    def spec(
        self,
        logical: Sequence[Axis | None],
        *,
        param: bool = False,
        shape: Sequence[int] | None = None,
    ) -> PartitionSpec:
        """The partition spec of an array whose dimensions have these logical names (a
        parameter's with `param`).

        A mesh axis serves the first dimension that asks for it: later dimensions whose rule names
        an axis already used stay unsplit over it (so `[E, G, ...]` is split by experts and
        `[G, E, ...]` by groups when both map to the same mesh axis). Key-value heads are split as
        query heads where their count (from `shape`) divides, else replicated: a device then
        holds the key-value head of its query heads' group (Megatron's rule). Routing groups
        are split over as many of their mesh axes, in order, as divide their count (a decode
        step's few groups), the rest of those axes left to later dimensions.
        """
        rules = self.weight_rules if param else self.rules
        used: set[str] = set()
        parts = []
        for i, name in enumerate(logical):
            axes = tuple(a for a in self._rule(rules, name) if a not in used) if name else ()
            if name == Axis.KV_HEADS and shape is not None and shape[i] % self._size(axes):
                axes = ()
            if name == Axis.GROUP and shape is not None:
                while axes and shape[i] % self._size(axes):
                    axes = axes[:-1]
            used.update(axes)
            parts.append(None if not axes else axes[0] if len(axes) == 1 else axes)
        return PartitionSpec(*parts)

    def state_spec(self, logical: Sequence[Axis | None], shape: Sequence[int]) -> PartitionSpec:
        """The partition spec of a parameter's optimizer state and reduced gradient: the
        parameter's, and for a stacked block's, `state_axes` on the first dimension it leaves
        whole that they divide (none such: the parameter's spec)."""
        spec = self.spec(logical, param=True, shape=shape)
        dim = self.state_dim(logical, shape)
        if dim is None:
            return spec
        parts = [*spec, *(None,) * (len(shape) - len(spec))]
        parts[dim] = self.state_axes[0] if len(self.state_axes) == 1 else self.state_axes
        return PartitionSpec(*parts)

    def state_dim(self, logical: Sequence[Axis | None], shape: Sequence[int]) -> int | None:
        """The dimension `state_spec` splits over `state_axes` (None: none)."""
        if not self.state_axes or Axis.LAYERS not in logical:
            return None
        spec = self.spec(logical, param=True, shape=shape)
        n = self._size(self.state_axes)
        whole = [i for i in range(len(shape)) if i >= len(spec) or spec[i] is None]
        return next((i for i in whole if shape[i] % n == 0), None)

    def split_factor(self, logical: Axis, *, param: bool = False) -> int:
        return self._size(self._rule(self.weight_rules if param else self.rules, logical))

    def _size(self, mesh_axes: Sequence[str]) -> int:
        sizes = self.axis_sizes
        return math.prod(sizes[a] for a in mesh_axes)

    @staticmethod
    def _rule(rules: Rules, logical: Axis) -> MeshAxes:
        if logical == Axis.KV_HEADS and logical not in rules:
            return tuple(rules.get(Axis.HEADS, ()))
        return tuple(rules.get(logical, ()))


def part_axes(part: str | Sequence[str] | None) -> MeshAxes:
    """The mesh axes one entry of a PartitionSpec names: none, one, or a tuple of them."""
    return () if part is None else (part,) if isinstance(part, str) else tuple(part)


# ---- activation constraints -----------------------------------------------------------------
_LAYOUT: contextvars.ContextVar[tuple[Mesh, Strategy] | None] = contextvars.ContextVar(
    "jaxmoe_layout", default=None
)


@contextlib.contextmanager
def activation_layout(mesh: Mesh, strategy: Strategy) -> Iterator[None]:
    """Within this context, `constrain` pins activations to `strategy`'s layout on `mesh`."""
    token = _LAYOUT.set((mesh, strategy))
    try:
        yield
    finally:
        _LAYOUT.reset(token)


def active_layout() -> tuple[Mesh, Strategy] | None:
    """The mesh and strategy of the enclosing `activation_layout` (None outside one)."""
    return _LAYOUT.get()


_STAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("jaxmoe_stage", default=None)


@contextlib.contextmanager
def pipeline_stage(stage_axis: str) -> Iterator[None]:
    """Within this context code is traced for one pipeline stage, run by `vmap` over the mesh
    axis `stage_axis` (a manual region inside must be manual over it too)."""
    token = _STAGE.set(stage_axis)
    try:
        yield
    finally:
        _STAGE.reset(token)


def active_stage_axis() -> str | None:
    return _STAGE.get()


def manual_region(
    fn: Callable,
    mesh: Mesh,
    in_specs,
    out_specs,
    *,
    axis_names: Collection[str] | None = None,
    check_vma: bool = True,
) -> Callable:
    """`jax.shard_map` of fn manual over mesh axes `axis_names` (every axis by default) less
    those an enclosing region holds manual already (a pipeline's batch replicas)."""
    held = set(jax.sharding.get_abstract_mesh().manual_axes)
    names = frozenset(mesh.axis_names if axis_names is None else axis_names) - held
    return jax.shard_map(
        fn, mesh=in_region(mesh), in_specs=in_specs, out_specs=out_specs, axis_names=names,
        check_vma=check_vma,
    )  # fmt: skip


def in_region(mesh: Mesh) -> Mesh | jax.sharding.AbstractMesh:
    """The mesh to name in shardings and regions: inside a region manual over some of `mesh`'s
    axes, the region's (abstract) mesh, which marks them manual, as JAX requires."""
    outer = jax.sharding.get_abstract_mesh()
    return outer if outer.manual_axes else mesh


def laid_out_jit(mesh: Mesh, strategy: Strategy, fn: Callable, **kwargs) -> Callable:
    """`jax.jit` of `fn`, traced with `strategy`'s activation constraints on `mesh` in force."""

    def laid_out(*args):
        with activation_layout(mesh, strategy):
            return fn(*args)

    return jax.jit(laid_out, **kwargs)


def run_layers(
    step: Callable, x: jax.Array, per_block: Any, cache: Any, cfg: ModelConfig, *, last_only=False
) -> tuple[jax.Array, Any, Any]:
    """Run `step` over the stacked blocks as the active strategy says (a scan by default);
    `last_only`: the caller reads only the last position of the result."""
    layout = _LAYOUT.get()
    if layout is None:
        return scan_layers(step, x, per_block, cache)
    mesh, strategy = layout
    return strategy.run_layers(step, x, per_block, cache, mesh, cfg, last_only=last_only)


def constrain(x: jax.Array, logical: Sequence[Axis | None]) -> jax.Array:
    """Pin `x` to the sharding its logical axes get under the active layout (if any)."""
    layout = _LAYOUT.get()
    if layout is None:
        return x
    mesh, strategy = layout
    spec = strategy.spec(logical, shape=x.shape)
    return jax.lax.with_sharding_constraint(x, NamedSharding(in_region(mesh), spec))


SENT = "sent"


def sent(x: jax.Array) -> jax.Array:
    """x, named as a value that crossed devices on its way here (an all-to-all the partitioner
    places at a constraint): a backward pass that recomputes the forward pass's values holds
    it, rather than sending it again."""
    return checkpoint_name(x, SENT)


# ---- parameters ---------------------------------------------------------------------------
def with_shardings(abstract: Any, shardings: Any) -> Any:
    """Abstract arrays (shapes and dtypes) given these shardings (same tree), for lowering."""
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )


def logical_specs(state: nnx.State) -> nnx.State:
    """The logical axes of every parameter, as a State of PartitionSpecs of `Axis` names."""
    return nnx.get_partition_spec(state)


def param_shardings(
    state: nnx.State, mesh: Mesh, strategy: Strategy, *, optimizer: bool = False
) -> nnx.State:
    """NamedSharding of every parameter under `strategy`, from its logical axis names (with
    `optimizer`: of its optimizer state, `Strategy.state_spec`)."""

    def to_sharding(spec: PartitionSpec, value) -> NamedSharding:
        if optimizer:
            return NamedSharding(mesh, strategy.state_spec(tuple(spec), value.shape))
        return NamedSharding(mesh, strategy.spec(tuple(spec), param=True, shape=value.shape))

    return jax.tree.map(
        to_sharding, logical_specs(state), state, is_leaf=lambda x: isinstance(x, PartitionSpec)
    )


# ---- divisibility, checked before anything is compiled --------------------------------------
def split_sizes(cfg: ModelConfig) -> dict[Axis, tuple[int, str]]:
    """Each logical axis's size in this config and the field (or fields) that set it (where
    several sizes share an axis, their greatest common divisor)."""
    head_dims = [(cfg.head_dim, "head_dim")]
    if cfg.is_mla:
        head_dims += [(cfg.rope_head_dim, "rope_head_dim"), (cfg.value_head_dim, "v_head_dim")]
    widths = [(cfg.d_ff, "d_ff")] if cfg.n_dense_layers else []
    if cfg.is_moe and cfg.n_shared_experts:
        widths.append((cfg.shared_hidden, "the shared experts' width"))
    sizes = {
        Axis.BATCH: (cfg.batch, "batch"),
        Axis.ATTN_BATCH: (cfg.batch, "batch"),
        Axis.LM_BATCH: (cfg.batch, "batch"),
        Axis.SEQ: (cfg.seq_len, "seq_len"),
        Axis.EMBED: (cfg.d_model, "d_model"),
        Axis.HEADS: (cfg.n_heads, "n_heads"),
        Axis.HEAD_DIM: _common(head_dims),
        Axis.VOCAB: (cfg.padded_vocab, "vocab_size (padded to a multiple of 128)"),
        Axis.LAYERS: (cfg.n_blocks, "(n_layers - first_dense) / moe_every"),
    }
    if widths:
        sizes[Axis.MLP] = _common(widths)
    if cfg.is_moe:
        sizes |= {
            Axis.EXPERT: (cfg.n_experts, "n_experts"),
            Axis.EXPERT_MLP: (cfg.expert_hidden, "expert_d_ff" if cfg.expert_d_ff else "d_ff"),
            Axis.GROUP: (cfg.n_groups, "batch * seq_len / moe_group_size"),
            Axis.CAPACITY: (cfg.capacity, "capacity_factor"),
        }
    return sizes


def _common(sizes: list[tuple[int, str]]) -> tuple[int, str]:
    return math.gcd(*(n for n, _ in sizes)), " and ".join(field for _, field in sizes)


def check_kv_heads(cfg: ModelConfig, strategy: Strategy) -> None:
    """Key-value heads split over the devices that split query heads, or each replicated over a
    whole number of them: one line when neither holds."""
    split, kv = strategy.split_factor(Axis.HEADS), cfg.kv_heads
    if cfg.is_mla or kv % split == 0 or split % kv == 0:
        return
    raise ConfigError(
        f"strategy {strategy.name} splits heads over {split} devices, and n_kv_heads={kv} neither "
        f"divides among them nor repeats evenly over them; choose n_kv_heads as a multiple or a "
        f"divisor of {split}"
    )


def check_divisible(cfg: ModelConfig, strategy: Strategy) -> None:
    """Raise a one-line ConfigError for any size this strategy splits unevenly."""
    strategy.extra_checks(cfg)
    for (logical, (size, field)), param in itertools.product(split_sizes(cfg).items(), (0, 1)):
        factor = strategy.split_factor(logical, param=bool(param))
        if size % factor:
            rules = strategy.weight_rules if param else strategy.rules
            mesh_axes = "x".join(rules[logical])
            raise ConfigError(
                f"strategy {strategy.name} splits {field}={size} over mesh axes {mesh_axes} "
                f"({factor} devices), which does not divide it; "
                f"choose {field} as a multiple of {factor}"
            )
    check_kv_heads(cfg, strategy)

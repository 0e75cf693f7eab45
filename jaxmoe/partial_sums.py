"""Weight gradients summed over the split batch once, where each device's share is ready.

A weight's gradient is a contraction over the batch (and sequence). Where a layout splits the
batch, every device holds a partial sum and the devices must add them. XLA's partitioner does
this with an all-reduce of the whole gradient and, where the weight itself is split over the same
devices (FSDP), a slice of the result: twice the bytes of the reduce-scatter the layout needs.
(GPU compilers rewrite that pair into a reduce-scatter; XLA's CPU backend has no such pass.) And
a gradient accumulated over a loop (the LM head's over loss chunks) is summed once per iteration.

Here the local contraction runs in a region manual over the mesh axes that split the batch, so
the partial sums are explicit: `partial_sums` keeps them apart as a leading axis [N, ...] split
over those devices (nothing crosses them; a loop can accumulate them), and `sum_parts` adds them
once, reduce-scattering over the axes that split the weight and all-reducing over the others.
`project` is an einsum with a weight whose backward pass does both; it changes the program only
under a layout that gathers its parameters (`Strategy.gathered_axes`).

`local_then_sum` is the forward pass's counterpart: a computation whose partial results are
linear in what each device holds (Megatron's row-parallel projection followed by more linear
work) runs on each device's share and its result is summed once, where XLA's partitioner would
sum at the first contraction over a split dimension.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmoe.axes import Axis
from jaxmoe.sharding import (
    MeshAxes,
    Strategy,
    active_layout,
    active_stage_axis,
    in_region,
    manual_region,
    part_axes,
)

Logical = Sequence[Axis | None]


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """The mesh axes `axes` that split the dimensions a gradient sums over, under `strategy` on
    `mesh`; `stage_axis` is a pipeline's (the region is also manual over it inside a stage)."""

    mesh: Mesh
    strategy: Strategy
    axes: MeshAxes
    stage_axis: str | None

    @property
    def parts(self) -> int:
        return math.prod(self.mesh.shape[a] for a in self.axes)

    def region(self, fn, in_specs, out_specs, *, every_axis: bool = False):
        """`fn` manual over this split's axes (and the stage axis), or over every mesh axis."""
        names = frozenset(self.axes) | ({self.stage_axis} if self.stage_axis else set())
        if every_axis:
            names = frozenset(self.mesh.axis_names)
        return manual_region(fn, self.mesh, in_specs, out_specs, axis_names=names, check_vma=False)


def mesh_axes_of(
    logical: Sequence[Logical], dims: Sequence[Axis], shapes: Sequence[Sequence[int]]
) -> MeshAxes:
    """The mesh axes that split, under the active layout, any dimension named by one of `dims`
    in arrays with these logical axes and shapes (in mesh order; none outside a layout), a
    pipeline's stage axis aside."""
    layout = active_layout()
    if layout is None:
        return ()
    mesh, strategy = layout
    used = {
        a
        for axes, shape in zip(logical, shapes, strict=True)
        for name, part in zip(axes, strategy.spec(axes, shape=shape), strict=True)
        if name in dims
        for a in part_axes(part)
    } - {active_stage_axis()}
    return tuple(name for name in mesh.axis_names if name in used)


def local_then_sum(
    fn: Callable,
    args: Sequence[jax.Array],
    args_axes: Sequence[Logical],
    out: tuple[Logical, Sequence[int]],
    axes: MeshAxes,
    *,
    vary: Sequence[int] = (),
) -> jax.Array:
    """fn(*args), run on each device's share of `args` and summed once over mesh axes `axes`
    (an all-reduce of fn's result, whose logical axes and shape are `out`). fn must be linear
    in what it sums: applied to the shares, its results add up to fn of the whole arrays.

    The region is manual over every mesh axis (a bfloat16 all-reduce in a region manual over
    some of them crashes XLA's CPU compiler), so the args come as the layout places them and
    fn sees plain local arrays. `vary`: the args, whole on every device of `axes`, whose
    gradient is summed over `axes` where it enters (else at its first use, maybe larger)."""
    mesh, strategy = active_layout()
    in_specs = tuple(
        strategy.spec(logical, shape=a.shape) for a, logical in zip(args, args_axes, strict=True)
    )
    out_spec = _only(strategy.spec(out[0], shape=out[1]), lambda a: a not in axes)

    def local(*shares):
        shares = [_vary(a, axes) if i in vary else a for i, a in enumerate(shares)]
        return jax.lax.psum(fn(*shares), axes)

    return manual_region(local, mesh, in_specs, out_spec)(*args)


def _vary(a: jax.Array, axes: MeshAxes) -> jax.Array:
    """`a` marked as varying over those of `axes` it is whole on."""
    whole = tuple(ax for ax in axes if ax not in jax.typeof(a).manual_axis_type.varying)
    return jax.lax.pcast(a, whole, to="varying") if whole else a


def _only(spec: PartitionSpec, keep: Callable[[str], bool]) -> PartitionSpec:
    """`spec` with only the mesh axes that `keep` accepts."""
    return PartitionSpec(*(tuple(filter(keep, part_axes(part))) or None for part in spec))


def split_over(logical: Logical, summed: Sequence[int]) -> Split | None:
    """The split of dimensions `summed` of an array with these logical axes, under the active
    layout (None outside one, or where no mesh axis splits them)."""
    layout = active_layout()
    if layout is None:
        return None
    mesh, strategy = layout
    stage = active_stage_axis()
    spec = strategy.spec(logical)
    used = {a for i, part in enumerate(spec) if i in summed for a in part_axes(part)} - {stage}
    axes = tuple(name for name in mesh.axis_names if name in used)
    return Split(mesh, strategy, axes, stage) if axes else None


def _operands(equation: str) -> tuple[str, str, str]:
    ins, out = equation.split("->")
    a, b = ins.split(",")
    return a, b, out


def _of_result(equation: str, a_dims: Sequence, b_dims: Sequence) -> tuple:
    """Per dimension of einsum(equation, a, b), what `a_dims` and `b_dims` say of its letter in
    the operand that has it (a's where both do): its logical axis, or its size."""
    a, b, out = _operands(equation)
    letters = dict(zip(b, b_dims, strict=True)) | dict(zip(a, a_dims, strict=True))
    return tuple(letters[c] for c in out)


def partial_sums(
    equation: str, a: jax.Array, a_axes: Logical, b: jax.Array, b_axes: Logical, split: Split | None
) -> jax.Array:
    """einsum(equation, a, b) as [N, ...out]: the N devices' partial sums over the dimensions
    `split` splits, each kept on its devices (N = 1 and the whole sum without a split)."""

    def local(a, b):
        return jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)[None]

    if split is None:
        return local(a, b)
    spec = split.strategy.spec

    def manual(axis: str) -> bool:
        return axis in split.axes

    in_specs = (
        _only(spec(a_axes, shape=a.shape), manual),
        _only(spec(b_axes, shape=b.shape), manual),
    )
    parts = split.region(local, in_specs, PartitionSpec(split.axes))(a, b)
    if split.stage_axis:  # inside a pipeline stage the partitioner places the stage dim itself
        return parts
    # placed where the sum's dims are, so a loop that accumulates the parts keeps them there
    result_axes = _of_result(equation, a_axes, b_axes)
    result = spec(result_axes, shape=_of_result(equation, a.shape, b.shape))
    rest = _only(result, lambda a: not manual(a))
    sharding = NamedSharding(in_region(split.mesh), PartitionSpec(split.axes, *rest))
    return jax.lax.with_sharding_constraint(parts, sharding)


def sum_parts(
    parts: jax.Array,
    out_axes: Logical,
    split: Split | None,
    *,
    spec: PartitionSpec | None = None,
) -> jax.Array:
    """Add the partial sums [N, ...] once: a reduce-scatter over the mesh axes that split the
    parameter with logical axes `out_axes` (or the result's `spec`, where given: an
    activation's), an all-reduce over the rest of `split`'s axes.

    The region is manual over every mesh axis: XLA's partitioner replicates the operand of a
    reduce-scatter over the axes it still places itself."""
    if split is None:
        return parts[0]
    spec = spec or split.strategy.spec(out_axes, param=True, shape=parts.shape[1:])
    held = {a for part in spec for a in part_axes(part)}

    def local(p):
        p = p[0]
        for dim, part in enumerate(spec):
            scattered = tuple(a for a in part_axes(part) if a in split.axes)
            if scattered:
                p = jax.lax.psum_scatter(p, scattered, scatter_dimension=dim, tiled=True)
        summed = tuple(a for a in split.axes if a not in held)
        return jax.lax.psum(p, summed) if summed else p

    in_spec = PartitionSpec(split.axes, *_only(spec, lambda a: a not in split.axes))
    return split.region(local, (in_spec,), spec, every_axis=True)(parts)


def project(equation: str, x: jax.Array, x_axes: Logical, w: jax.Array, w_axes: Logical):
    """einsum(equation, x, w) for activations x (logical axes `x_axes`) and a parameter w
    (`w_axes`). Under a layout that gathers parameters, w's gradient is each device's partial
    sum, reduce-scattered to w's shards (all-reduced over other axes that split the batch)."""
    xs, ws, out = _operands(equation)
    split = split_over(x_axes, [i for i, letter in enumerate(xs) if letter not in ws])
    if split is None or not split.strategy.gathered_axes:
        return jnp.einsum(equation, x, w)
    out_axes = _of_result(equation, x_axes, w_axes)

    @jax.custom_vjp
    def run(x, w):
        return jnp.einsum(equation, x, w)

    def forward(x, w):
        return run(x, w), (x, w)

    def backward(residuals, dy):
        x, w = residuals
        dx = jnp.einsum(f"{out},{ws}->{xs}", dy, w)
        parts = partial_sums(f"{xs},{out}->{ws}", x, x_axes, dy, out_axes, split)
        return dx.astype(x.dtype), sum_parts(parts, w_axes, split).astype(w.dtype)

    run.defvjp(forward, backward)
    return run(x, w)


def project_once(equation: str, x: jax.Array, x_axes: Logical, w: jax.Array, w_axes: Logical):
    """`project`, its partial sums over contracted dimensions split over several mesh axes
    added in one all-reduce over all of them (XLA's partitioner reduces over each axis in turn:
    heads x dims' output projection all-reduced over dims, then over heads)."""
    xs, ws, out = _operands(equation)
    layout = active_layout()
    if layout is None or layout[1].gathered_axes:
        return project(equation, x, x_axes, w, w_axes)
    logical, shapes = (x_axes, w_axes), (x.shape, w.shape)
    summed = [a for letter, a in zip(xs, x_axes, strict=True) if letter not in out]
    kept = [a for letters, axes in zip((xs, ws), logical, strict=True)
            for letter, a in zip(letters, axes, strict=True) if letter in out]  # fmt: skip
    axes = mesh_axes_of(logical, summed, shapes)
    if len(axes) < 2 or set(axes) & set(mesh_axes_of(logical, kept, shapes)):
        return project(equation, x, x_axes, w, w_axes)
    result = (_of_result(equation, x_axes, w_axes), _of_result(equation, x.shape, w.shape))
    return local_then_sum(lambda x, w: jnp.einsum(equation, x, w), (x, w), logical, result, axes)


def project_together(
    x: jax.Array, x_axes: Logical, projections: Sequence[tuple[str, jax.Array, Logical]]
) -> list[jax.Array]:
    """`project` of one activation x by several weights (equation, weight, its logical axes),
    x's gradient summed once. Where a layout splits the projections' outputs over mesh axes that
    leave x whole (Megatron's column-parallel q, k, v), each device's share of x's gradient is a
    sum of one partial per projection; XLA's partitioner all-reduces each apart. Here they run
    in one region where x is marked as varying, so the backward pass adds them and all-reduces
    once. Outside such a layout (or where an output is not split alike: key-value heads
    repeated over devices), plain `project`s."""
    layout = active_layout()

    def plain() -> list[jax.Array]:
        return [project(eq, x, x_axes, w, w_axes) for eq, w, w_axes in projections]

    if layout is None or layout[1].gathered_axes:
        return plain()
    mesh, strategy = layout
    outs = [
        (_of_result(eq, x_axes, w_axes), _of_result(eq, x.shape, w.shape))
        for eq, w, w_axes in projections
    ]
    x_split = {a for part in strategy.spec(x_axes, shape=x.shape) for a in part_axes(part)}
    split = [
        {a for part in strategy.spec(axes, shape=shape) for a in part_axes(part)} - x_split
        for axes, shape in outs
    ]
    if not split[0] or any(s != split[0] for s in split):
        return plain()
    axes = tuple(name for name in mesh.axis_names if name in split[0])

    def local(x, *weights):
        x = _vary(x, axes)
        return [jnp.einsum(eq, x, w) for (eq, _, _), w in zip(projections, weights, strict=True)]

    in_specs = (
        strategy.spec(x_axes, shape=x.shape),
        *(strategy.spec(w_axes, shape=w.shape) for _, w, w_axes in projections),
    )
    out_specs = [strategy.spec(axes, shape=shape) for axes, shape in outs]
    weights = [w for _, w, _ in projections]
    return manual_region(local, mesh, in_specs, out_specs)(x, *weights)


def lookup(table: jax.Array, table_axes: Logical, ids: jax.Array, out_axes: Logical, dtype):
    """table[ids] in `dtype` ([B, S] ids -> [B, S, D], logical axes `out_axes`) from a table
    [V, D] whose rows the layout splits (a vocabulary-parallel embedding). Each device looks up
    the ids its rows hold (zeros for the others) for every token of its batch group, and the
    partial results are summed once: reduce-scattered over the mesh axes that split both the
    rows and the batch, all-reduced over the rest (XLA's partitioner all-reduces the whole
    [B, S, D] and slices it). The backward pass all-gathers the gradient over the first and
    adds each device's rows locally. A plain take outside such a layout."""
    layout = active_layout()

    def plain() -> jax.Array:
        return jnp.take(table, ids, axis=0).astype(dtype)

    if layout is None or layout[1].gathered_axes:
        return plain()
    mesh, strategy = layout
    table_spec = strategy.spec(table_axes, param=True, shape=table.shape)
    out_shape = (*ids.shape, table.shape[1])
    out_spec = strategy.spec(out_axes, shape=out_shape)
    rows = part_axes(table_spec[0])
    if not rows or table_spec[1] != out_spec[2] or set(rows) & set(part_axes(out_spec[1])):
        return plain()
    batch = part_axes(out_spec[0])
    scattered = tuple(a for a in batch if a in rows)
    if batch[len(batch) - len(scattered) :] != scattered:  # scattered slices must be innermost
        return plain()
    summed = tuple(a for a in rows if a not in scattered)
    ids_spec = PartitionSpec(tuple(a for a in batch if a not in scattered) or None, out_spec[1])

    def local(table, ids):
        first = jax.lax.axis_index(rows) * table.shape[0]
        mine = (ids >= first) & (ids < first + table.shape[0])
        x = jnp.take(table, jnp.where(mine, ids - first, 0), axis=0)
        x = jnp.where(mine[..., None], x, 0).astype(dtype)
        if scattered:
            x = jax.lax.psum_scatter(x, scattered, scatter_dimension=0, tiled=True)
        return jax.lax.psum(x, summed) if summed else x

    region = manual_region(local, mesh, (table_spec, ids_spec), out_spec)
    return region(table, ids)

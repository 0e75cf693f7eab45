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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmoe.axes import Axis
from jaxmoe.sharding import MeshAxes, Strategy, active_layout, active_stage_axis, part_axes

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
        return jax.shard_map(
            fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, axis_names=names,
            check_vma=False,
        )  # fmt: skip


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
    sharding = NamedSharding(split.mesh, PartitionSpec(split.axes, *rest))
    return jax.lax.with_sharding_constraint(parts, sharding)


def sum_parts(parts: jax.Array, out_axes: Logical, split: Split | None) -> jax.Array:
    """Add the partial sums [N, ...] once: a reduce-scatter over the mesh axes that split the
    parameter with logical axes `out_axes`, an all-reduce over the rest of `split`'s axes.

    The region is manual over every mesh axis: XLA's partitioner replicates the operand of a
    reduce-scatter over the axes it still places itself."""
    if split is None:
        return parts[0]
    spec = split.strategy.spec(out_axes, param=True, shape=parts.shape[1:])
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

"""Tests of the collective inventory read from compiled HLO text, and of per-device memory."""

from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmoe.analysis.collectives import (
    KINDS,
    Collective,
    KindTotal,
    group_axes,
    inventory,
    parse_collectives,
)
from jaxmoe.analysis.memory import memory_per_device

HLO = Path(__file__).parent / "hlo"
MESH_4X4 = {"a": 4, "b": 4}
MESH_2X8 = {"a": 2, "b": 8}
ROWS_4X4 = ((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15))
COLUMNS_4X4 = ((0, 4, 8, 12), (1, 5, 9, 13), (2, 6, 10, 14), (3, 7, 11, 15))


def _one_all_reduce(groups: str, num_partitions: int = 16) -> str:
    """A module whose ENTRY holds one f32[4] all-reduce with the given replica_groups text."""
    return f"""HloModule m, num_partitions={num_partitions}

%add (a: f32[], b: f32[]) -> f32[] {{
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %c = f32[] add(%a, %b)
}}

ENTRY %main (p: f32[4]) -> f32[4] {{
  %p = f32[4]{{0}} parameter(0)
  ROOT %all-reduce.1 = f32[4]{{0}} all-reduce(%p), channel_id=1, replica_groups={groups}, \
use_global_device_ids=true, to_apply=%add
}}
"""


def _only(hlo_text: str) -> Collective:
    (collective,) = parse_collectives(hlo_text)
    return collective


def _by_name(collectives: list[Collective]) -> dict[str, Collective]:
    return {c.name: c for c in collectives}


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        ("{{0,1,2,3},{4,5,6,7},{8,9,10,11},{12,13,14,15}}", ROWS_4X4),
        ("[4,4]<=[16]", ROWS_4X4),
        ("[4,4]<=[4,4]T(1,0)", COLUMNS_4X4),
        ("[2,8]<=[2,4,2]T(1,0,2)", ((0, 1, 8, 9, 2, 3, 10, 11), (4, 5, 12, 13, 6, 7, 14, 15))),
        ("mesh['axis_0'=1,'axis_1'=1,'axis_2'=16,'axis_3'=1] {'axis_2'}", (tuple(range(16)),)),
        ("mesh['axis_0'=4,'axis_1'=4] {'axis_0'}", COLUMNS_4X4),
        ("mesh['axis_0'=4,'axis_1'=1,'axis_2'=4] {'axis_2'}", ROWS_4X4),
        ("mesh['axis_0'=4,'axis_1'=4], device_ids=([4,4]T(1,0)) {'axis_0'}", ROWS_4X4),
        ("mesh['x'=4,'y'=4] {'y','x'}", (sum(COLUMNS_4X4, ()),)),
        ("mesh['axis_0'=1,'axis_1'=16] {'axis_0','axis_1'}", (tuple(range(16)),)),
        (
            "mesh['x'=16] {'x':(2)2}",
            tuple((i, i + 4) for j in (0, 8) for i in (j, j + 1, j + 2, j + 3)),
        ),
        (
            "mesh['x'=2,'y'=8], device_ids=(15,14,13,12,11,10,9,8,7,6,5,4,3,2,1,0) {'x'}",
            tuple((15 - i, 7 - i) for i in range(8)),
        ),
        ("{}", (tuple(range(16)),)),
    ],
)
def test_replica_group_formats(groups: str, expected: tuple[tuple[int, ...], ...]) -> None:
    assert _only(_one_all_reduce(groups)).groups == expected


def test_straight_line_all_reduce_fields() -> None:
    collective = _only(_one_all_reduce("[4,4]<=[16]"))
    assert (collective.kind, collective.name, collective.computation) == (
        "all-reduce",
        "all-reduce.1",
        "main",
    )
    assert (collective.executions, collective.loop_depth, collective.axes) == (1, 0, None)
    assert (collective.operand_bytes, collective.bytes_sent) == (16, 24)  # 2 * 16 * 3/4


def test_operand_shapes_printed_inline_with_index_comments() -> None:
    text = _one_all_reduce("{{0,1}}", num_partitions=2).replace(
        "ROOT %all-reduce.1 = f32[4]{0} all-reduce(%p)",
        "%q = bf16[2,2]{1,0} parameter(1)\n  %r = s8[5]{0} parameter(2)\n  ROOT %all-reduce.1 = "
        "(f32[4]{0}, f32[4]{0}, f32[4]{0}, f32[4]{0}, bf16[2,2]{1,0}, /*index=5*/s8[5]{0}) "
        "all-reduce(f32[4]{0} %p, f32[4]{0} %p, f32[4]{0} %p, f32[4]{0} %p, bf16[2,2]{1,0} %q, "
        "/*index=5*/s8[5]{0} %r)",
    )
    collective = _only(text)
    assert collective.operand_bytes == 4 * 16 + 8 + 5
    assert collective.bytes_sent == 4 * 16 + 8 + 5  # 2 * bytes * 1/2


def test_tuple_all_to_all_sums_operands() -> None:
    collective = _only((HLO / "tuple_all_to_all.hlo").read_text())
    assert collective.kind == "all-to-all"
    assert collective.groups == ROWS_4X4
    assert (collective.operand_bytes, collective.bytes_sent) == (64, 48)


def test_async_forms_count_once_each() -> None:
    found = _by_name(parse_collectives((HLO / "async.hlo").read_text()))
    kinds = {name: c.kind for name, c in found.items()}
    assert kinds == {
        "all-reduce-start": "all-reduce",
        "all-gather-start": "all-gather",
        "collective-permute-start": "collective-permute",
        "all-to-all.2": "all-to-all",
        "reduce-scatter-start": "reduce-scatter",
        "reduce-scatter.1": "reduce-scatter",
    }
    sent = {name: c.bytes_sent for name, c in found.items()}
    assert sent == {
        "all-reduce-start": 128,  # 2 * 128 * 1/2
        "all-gather-start": 384,  # result 512 * 3/4
        "collective-permute-start": 128,
        "all-to-all.2": 96,
        "reduce-scatter-start": 24,  # bf16[16] = 32 bytes * 3/4
        "reduce-scatter.1": 24,  # replica_groups={} spans the 4 partitions
    }
    assert found["all-to-all.2"].computation == "wrapped_all_to_all"
    assert all(c.executions == 1 for c in found.values())


def test_nested_while_multiplies_trip_counts() -> None:
    found = _by_name(parse_collectives((HLO / "nested_while.hlo").read_text()))
    runs = {name: (c.executions, c.loop_depth) for name, c in found.items()}
    assert runs == {"all-reduce.3": (12, 2), "all-gather.2": (3, 1), "collective-permute.1": (1, 0)}
    assert found["all-gather.2"].groups == COLUMNS_4X4


def test_nested_while_totals() -> None:
    inv = inventory((HLO / "nested_while.hlo").read_text(), MESH_4X4)
    assert inv.by_kind(in_loop=True)["all-reduce"] == KindTotal(count=12, bytes=12 * 48)
    assert inv.by_kind(in_loop=True)["all-gather"] == KindTotal(count=3, bytes=3 * 96)
    assert inv.by_kind(in_loop=False) == {
        **{kind: KindTotal(0, 0) for kind in KINDS},
        "collective-permute": KindTotal(1, 32),
    }
    assert inv.total_bytes() == 12 * 48 + 3 * 96 + 32
    assert inv.total_bytes(in_loop=True) == 12 * 48 + 3 * 96
    assert inv.over_axes() == {
        ("b",): KindTotal(12, 12 * 48),
        ("a",): KindTotal(4, 3 * 96 + 32),
    }


def test_collectives_in_conditional_and_calls() -> None:
    found = _by_name(parse_collectives((HLO / "conditional.hlo").read_text()))
    psum, permute = found["psum.6"], found["ppermute.1"]
    assert (psum.computation, psum.executions, psum.loop_depth) == ("branch_0", 1, 0)
    assert psum.groups == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert (psum.operand_bytes, psum.bytes_sent) == (24, 36)
    assert (permute.computation, permute.operand_bytes, permute.bytes_sent) == ("called", 24, 0)
    assert permute.executions == 2  # called from two call sites


def test_module_without_collectives() -> None:
    inv = inventory((HLO / "no_collectives.hlo").read_text(), MESH_4X4)
    assert inv.collectives == ()
    assert inv.by_kind() == {kind: KindTotal(0, 0) for kind in KINDS}
    assert inv.total_bytes() == 0
    assert inv.over_axes() == {}


@pytest.mark.parametrize(
    ("groups", "mesh", "permute", "expected"),
    [
        (COLUMNS_4X4, MESH_4X4, False, ("a",)),
        (ROWS_4X4, MESH_4X4, False, ("b",)),
        ((tuple(range(16)),), MESH_4X4, False, ("a", "b")),
        ((sum(COLUMNS_4X4, ()),), MESH_4X4, False, ("a", "b")),
        (((0, 1), (2, 3)), MESH_4X4, False, None),
        (((0, 5, 10, 15),), MESH_4X4, False, None),
        (((0,), (1,)), MESH_4X4, False, ()),
        ((), MESH_4X4, False, ()),
        (((0, 16),), MESH_4X4, False, None),
        (((0, 4), (4, 8), (8, 12), (12, 0)), MESH_4X4, True, ("a",)),
        (((0, 5),), MESH_4X4, True, ("a", "b")),
        (((0, 0), (5, 5)), MESH_4X4, True, ()),
        ((tuple(range(8)), tuple(range(8, 16))), MESH_2X8, False, ("b",)),
        (tuple((i, i + 8) for i in range(8)), MESH_2X8, False, ("a",)),
        (((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15)), MESH_2X8, False, None),
        (tuple((i, (i + 1) % 8) for i in range(8)), MESH_2X8, True, ("b",)),
    ],
)
def test_group_axes(
    groups: tuple[tuple[int, ...], ...], mesh: dict[str, int], permute: bool, expected: object
) -> None:
    assert group_axes(groups, mesh, permute=permute) == expected


# Real programs, compiled for 16 CPU devices on a 4x4 mesh.


@pytest.fixture(scope="module")
def mesh() -> jax.sharding.Mesh:
    return jax.make_mesh((4, 4), ("a", "b"), axis_types=(AxisType.Auto,) * 2)


def _compiled_inventory(mesh: jax.sharding.Mesh, fn: Callable, *args: jax.Array):
    return inventory(jax.jit(fn).lower(*args).compile().as_text(), dict(mesh.shape))


def _shard_map(mesh: jax.sharding.Mesh, fn: Callable, out_specs: P) -> Callable:
    return jax.shard_map(fn, mesh=mesh, in_specs=P("a", "b"), out_specs=out_specs, check_vma=False)


def test_compiled_scan_and_all_to_all(mesh: jax.sharding.Mesh) -> None:
    """psum over 'a' in a 3-step scan, then all_to_all over 'b' and psum over both axes."""

    def local(x: jax.Array) -> jax.Array:
        x, _ = lax.scan(lambda c, _: (lax.psum(c, "a") * 0.5, None), x, None, length=3)
        x = lax.all_to_all(x, "b", 0, 1, tiled=True)
        return lax.psum(x, ("a", "b"))

    inv = _compiled_inventory(mesh, _shard_map(mesh, local, P()), jnp.ones((16, 16)))
    summary = sorted((c.kind, c.axes, c.executions, c.loop_depth) for c in inv.collectives)
    assert summary == [
        ("all-reduce", ("a",), 3, 1),
        ("all-reduce", ("a", "b"), 1, 0),
        ("all-to-all", ("b",), 1, 0),
    ]
    block = 4 * 4 * 4  # f32[4,4] per device
    assert inv.by_kind(in_loop=True)["all-reduce"] == KindTotal(3, 3 * round(2 * block * 3 / 4))
    assert inv.by_kind(in_loop=False)["all-reduce"] == KindTotal(1, round(2 * block * 15 / 16))
    assert inv.by_kind()["all-to-all"] == KindTotal(1, block * 3 // 4)


def test_compiled_gather_scatter_permute(mesh: jax.sharding.Mesh) -> None:
    """all_gather over 'a', psum_scatter over 'b', ppermute along 'b'."""

    def local(x: jax.Array) -> jax.Array:
        x = lax.all_gather(x, "a", tiled=True)  # f32[4,4] -> f32[16,4]
        x = lax.psum_scatter(x, "b", tiled=True)  # f32[16,4] -> f32[4,4]
        return lax.ppermute(x, "b", [(i, (i + 1) % 4) for i in range(4)])

    inv = _compiled_inventory(mesh, _shard_map(mesh, local, P("a", "b")), jnp.ones((16, 16)))
    found = {c.kind: c for c in inv.collectives}
    assert sorted(found) == ["all-gather", "collective-permute", "reduce-scatter"]
    assert (found["all-gather"].axes, found["all-gather"].bytes_sent) == (("a",), 64 * 3)
    assert (found["reduce-scatter"].axes, found["reduce-scatter"].bytes_sent) == (("b",), 192)
    assert (found["collective-permute"].axes, found["collective-permute"].bytes_sent) == (
        ("b",),
        64,
    )


def test_compiled_resharding_reduction(mesh: jax.sharding.Mesh) -> None:
    """Summing rows of a (a, b)-sharded matrix: all-reduce over 'a', then all-gather over 'b'."""

    def reduce_rows(x: jax.Array) -> jax.Array:
        x = lax.with_sharding_constraint(x, NamedSharding(mesh, P("a", "b")))
        return lax.with_sharding_constraint(x.sum(0), NamedSharding(mesh, P()))

    inv = _compiled_inventory(mesh, reduce_rows, jnp.ones((16, 16)))
    assert inv.over_axes() == {
        ("a",): KindTotal(1, round(2 * 16 * 3 / 4)),  # f32[4] per device
        ("b",): KindTotal(1, 16 * 3),
    }


def test_memory_per_device(mesh: jax.sharding.Mesh) -> None:
    x = jax.device_put(jnp.ones((16, 16)), NamedSharding(mesh, P("a", "b")))
    sizes = memory_per_device(jax.jit(lambda x: x * 2, donate_argnums=0).lower(x).compile())
    assert (sizes["arguments"], sizes["outputs"], sizes["aliased"]) == (64, 64, 64)
    assert sizes["total"] == (
        sizes["arguments"]
        + sizes["outputs"]
        + sizes["temporaries"]
        - sizes["aliased"]
        + sizes["generated_code"]
    )

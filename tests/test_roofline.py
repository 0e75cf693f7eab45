"""The roofline estimator against hand arithmetic: FLOPs read from compiled programs (loops
included), collective times on the hardware profiles, and the bound of a dense layer."""

import jax
import jax.numpy as jnp
import pytest

from jaxmoe.analysis import hardware
from jaxmoe.analysis.collectives import Collective
from jaxmoe.analysis.flops import matmul_flops
from jaxmoe.analysis.roofline import bound, program_bound
from jaxmoe.config import ConfigError

H100 = hardware.get("h100x16")


def test_flops_count_every_loop_iteration():
    def layers(x, w):  # 10 matmuls under scan: XLA's cost analysis counts one
        return jax.lax.scan(lambda c, wi: (jnp.einsum("bsd,de->bse", c, wi), None), x, w)[0]

    x, w = jnp.ones((4, 32, 128)), jnp.ones((10, 128, 128))
    compiled = jax.jit(layers).lower(x, w).compile()
    assert matmul_flops(compiled.as_text()) == 10 * 2 * 4 * 32 * 128 * 128
    assert compiled.cost_analysis()["flops"] < 2 * 2 * 4 * 32 * 128 * 128  # the undercount


def test_dense_layer_bound_by_hand():
    b, s, d, f = 8, 128, 256, 1024

    def mlp(x, w_in, w_out):
        return jnp.einsum("bsf,fd->bsd", jax.nn.gelu(jnp.einsum("bsd,df->bsf", x, w_in)), w_out)

    args = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in ((b, s, d), (d, f), (f, d))]
    compiled = jax.jit(mlp).lower(*args).compile()
    flops = 2 * b * s * d * f * 2  # two matmuls
    assert matmul_flops(compiled.as_text()) == flops
    got = program_bound(compiled, {}, H100, "bfloat16")
    assert got.compute_s == pytest.approx(flops / 989e12)
    moved = 2 * (b * s * d + d * f + f * d + b * s * d)  # bf16 inputs read, output written
    assert got.memory_s == pytest.approx(moved / 3.35e12)
    # 1.07 GFLOP per 2.1 MB = 512 FLOP/byte, above the H100's ridge of 989 / 3.35 = 295
    assert got.comm_s == 0 and got.limit == "compute"


def collective(kind, size, groups):
    return Collective(kind, "c", "main", 1, 0, size, size, tuple(map(tuple, groups)))


def test_collective_times_inside_and_across_nodes():
    gb = 1e9
    node = [list(range(8))]  # one node of 8: NVLink
    assert H100.collective_seconds(collective("all-reduce", gb, node)) == pytest.approx(
        2 * 7 / 8 * gb / 450e9
    )
    everyone = [list(range(16))]  # 2 nodes: the network carries half of an all-to-all
    assert H100.collective_seconds(collective("all-to-all", gb, everyone)) == pytest.approx(
        gb * 8 / 16 / 50e9
    )
    # hierarchical all-reduce: in-node reduce-scatter and all-gather, 1/8 of it between nodes
    assert H100.collective_seconds(collective("all-reduce", gb, everyone)) == pytest.approx(
        2 * (7 / 8 * gb / 450e9 + 1 / 2 * gb / 8 / 50e9)
    )
    pipe = [(i, i + 8) for i in range(8)]  # stage to stage: across nodes
    assert H100.collective_seconds(collective("collective-permute", gb, pipe)) == gb / 50e9


def test_overlapped_and_serial_bounds():
    got = bound(989e12, 3.35e12 / 2, [collective("all-to-all", 1e9, [range(16)])], H100, "bfloat16")
    assert (got.compute_s, got.memory_s, got.comm_s) == pytest.approx((1.0, 0.5, 0.01))
    assert got.overlapped_s == pytest.approx(1.0) and got.serial_s == pytest.approx(1.01)
    assert got.limit == "compute"


def test_unknown_profile_and_dtype_are_refused():
    with pytest.raises(ConfigError, match="h100x16"):
        hardware.get("tpu")
    with pytest.raises(ConfigError, match="float64"):
        H100.peak_flops("float64")

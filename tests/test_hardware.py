"""Hardware profiles: the file's fixed profiles as they were, clusters of any size named
<gpu>x<count>[n<per_node>] with the figures of the file's GPU tables, the nodes their collectives
span, and one-line refusals of bad names."""

import tomllib

import pytest

from jaxmoe.analysis import hardware
from jaxmoe.analysis.collectives import Collective
from jaxmoe.config import ConfigError

GPUS = tomllib.loads(hardware.PROFILES.read_text())["gpus"]
FIGURES = ("hbm_bytes", "hbm_bandwidth", "nvlink_bandwidth", "network_bandwidth")


def all_reduce(size, n):
    return Collective("all-reduce", "c", "main", 1, 0, size, size, (tuple(range(n)),))


@pytest.mark.parametrize(
    ("name", "gpu", "count", "per_node"),
    [
        ("h100x64", "h100", 64, 8),
        ("h100x64n4", "h100", 64, 4),
        ("a100x8", "a100", 8, 8),
        ("a100x4", "a100", 4, 4),  # fewer than 8: one node
        ("h200x16", "h200", 16, 8),
        ("b200x72n72", "b200", 72, 72),
    ],
)
def test_cluster_names_give_the_gpu_table_figures(name, gpu, count, per_node):
    hw, table = hardware.get(name), GPUS[gpu]
    assert (hw.name, hw.gpu, hw.count, hw.per_node) == (name, gpu, count, per_node)
    assert hw.description == table["description"]
    assert hw.matmul_flops == {k: float(v) for k, v in table["matmul_flops"].items()}
    assert {k: getattr(hw, k) for k in FIGURES} == {k: float(table[k]) for k in FIGURES}


def test_fixed_profiles_are_unchanged():
    h100 = ({"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}, 80e9, 3.35e12, 450e9, 50e9)
    a100 = ({"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}, 80e9, 2.039e12, 300e9, 25e9)
    expected = {
        "h100x16": (16, 8, h100),
        "h100x16n4": (16, 4, h100),
        "a100x16": (16, 8, a100),
        "a100x16n4": (16, 4, a100),
        "h100x1": (1, 1, h100),
    }
    assert set(hardware.profiles()) == set(expected)
    for name, (count, per_node, figures) in expected.items():
        hw = hardware.get(name)
        got = (hw.matmul_flops, *(getattr(hw, k) for k in FIGURES))
        assert (hw.count, hw.per_node, got) == (count, per_node, figures), name


def test_one_nvlink_domain_of_72_times_an_all_reduce_on_nvlink_alone():
    hw, gb = hardware.get("b200x72n72"), 1e9
    nvlink = GPUS["b200"]["nvlink_bandwidth"]
    assert hw.collective_seconds(all_reduce(gb, 72)) == pytest.approx(2 * 71 / 72 * gb / nvlink)


def test_a_cluster_of_8_nodes_times_an_all_reduce_over_the_network():
    hw, gb = hardware.get("h100x64"), 1e9
    nvlink, net = GPUS["h100"]["nvlink_bandwidth"], GPUS["h100"]["network_bandwidth"]
    across = hw.collective_seconds(all_reduce(gb, 64))
    assert across == pytest.approx(2 * (7 / 8 * gb / nvlink + 7 / 8 * gb / 8 / net))
    assert (
        across > hw.collective_seconds(all_reduce(gb, 8)) == pytest.approx(2 * 7 / 8 * gb / nvlink)
    )


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tpu", "unknown hardware profile 'tpu'; choose one of ['a100x16', "),
        ("h100x", "or name a cluster <gpu>x<count>[n<per_node>], e.g. h100x64"),
        ("tpux8", "unknown GPU 'tpu'; choose one of a100, b200, h100, h200 or add it to [gpus]"),
        ("h100x0", "'h100x0': 0 GPUs; name at least 1, e.g. h100x8"),
        ("h100x12", "nodes of 8 do not divide 12 GPUs; choose e.g. h100x12n6"),
        ("h100x16n3", "nodes of 3 do not divide 16 GPUs; choose e.g. h100x16"),
        ("h100x4n8", "nodes of 8 do not divide 4 GPUs; choose e.g. h100x4"),
        ("h100x8n0", "nodes of 0 do not divide 8 GPUs"),
    ],
)
def test_bad_names_get_one_line(name, message):
    with pytest.raises(ConfigError) as err:
        hardware.get(name)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_too_few_gpus_names_the_cluster_to_choose():
    with pytest.raises(ConfigError) as err:
        hardware.get("h100x16").check_devices(64)
    assert str(err.value) == (
        "--hardware h100x16: the profile has 16 GPU(s), the layouts span 64; "
        "choose a profile of 64 or more, e.g. h100x64"
    )
    hardware.get("h100x64").check_devices(64)

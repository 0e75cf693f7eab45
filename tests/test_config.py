"""Configuration: validation names the field and the fix; overrides are typed; the architecture
and the workload are configs of their own."""

import dataclasses

import pytest
from tiny import tiny

import meshes
from jaxmoe.config import (
    PRESETS,
    WORKLOAD_FIELDS,
    Architecture,
    ConfigError,
    ModelConfig,
    Workload,
    preset,
    with_overrides,
)
from jaxmoe.sharding import check_divisible


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"top_k": 17}, "top_k"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"capacity_factor": -1.0}, "capacity_factor"),
        ({"moe_every": 3}, "moe_every"),
        ({"n_heads": 0}, "n_heads"),
        ({"dtype": "float8"}, "dtype"),
        ({"expert_form": "relu"}, "expert_form"),
        ({"moe_group_size": 7}, "moe_group_size"),
        ({"expert_dropout": 1.0}, "expert_dropout"),
        ({"seq_len": 1}, "seq_len"),
        ({"decode_group_size": -1}, "decode_group_size"),
        ({"moe_chunks": 0}, "moe_chunks"),
        ({"recompute": "some"}, "recompute"),
    ],
)
def test_invalid_fields_are_named(changes, field):
    with pytest.raises(ConfigError, match=f"^{field}="):
        tiny(True, **changes)


def test_derived_sizes():
    cfg = ModelConfig(vocab_size=50257, seq_len=64, batch=16, n_experts=16, top_k=2)
    assert cfg.padded_vocab == 50304
    assert cfg.capacity == 10  # ceil(2 * 64 * 1.25 / 16)
    assert cfg.n_groups == 16
    mixed = cfg.replace(n_layers=4, moe_every=2)
    assert (mixed.n_blocks, mixed.n_moe_layers, mixed.n_dense_layers) == (2, 2, 2)
    assert cfg.replace(moe_group_size=16).n_groups == 64


@pytest.mark.parametrize(
    ("batch", "micro_batches", "size", "group"),
    [
        (16, 4, 0, 4),  # a micro-batch's new tokens
        (16, 1, 0, 16),  # the whole batch
        (6, 4, 0, 6),  # micro-batches do not divide the batch: the whole batch
        (16, 1, 8, 8),
        (16, 4, 8, 4),  # at most a micro-batch
        (16, 1, 6, 2),  # the largest that divides the rows
    ],
)
def test_decode_routing_groups(batch, micro_batches, size, group):
    cfg = tiny(True, batch=batch, micro_batches=micro_batches, decode_group_size=size)
    assert cfg.decode_group == group == cfg.group_for(1)
    assert cfg.group_for(cfg.seq_len) == cfg.seq_len  # whole sequences as before


def test_overrides_parse_types_and_reject_unknowns():
    cfg = with_overrides(
        preset("tiny_moe"), assignments=["n_layers=4", "capacity_factor=1.5", "dtype=bfloat16"]
    )
    assert (cfg.n_layers, cfg.capacity_factor, cfg.dtype) == (4, 1.5, "bfloat16")
    with pytest.raises(ConfigError, match="unknown field"):
        with_overrides(cfg, assignments=["n_layer=4"])
    with pytest.raises(ConfigError, match="expected int"):
        with_overrides(cfg, assignments=["n_layers=four"])
    with pytest.raises(ConfigError, match="key=value"):
        with_overrides(cfg, assignments=["n_layers"])
    with pytest.raises(ConfigError, match="unknown config"):
        preset("paper999")


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("strategy", list(meshes.REGISTRY.values()), ids=list(meshes.REGISTRY))
def test_every_preset_fits_every_strategy(name, strategy):
    if (name, strategy.name) == ("bench_moe", "tp16"):  # its 8 heads do not split 16 ways
        with pytest.raises(ConfigError, match="n_heads=8"):
            check_divisible(preset(name), strategy)
    else:
        check_divisible(preset(name), strategy)


@pytest.mark.parametrize(
    ("strategy", "changes", "field"),
    [
        ("ep16", {"n_experts": 12}, "n_experts"),
        ("ep16", {"batch": 8}, "batch"),
        ("tp16", {"n_heads": 12}, "n_heads"),
        ("tp16", {"d_ff": 120}, "d_ff"),
        ("heads_dims_4x4", {"head_dim": 6}, "head_dim"),
        ("heads_dims_4x4", {"batch": 6}, "batch"),
    ],
)
def test_uneven_splits_name_the_field(strategy, changes, field):
    with pytest.raises(ConfigError, match=f"splits {field}="):
        check_divisible(tiny(True, **changes), meshes.get(strategy))


def test_architecture_and_workload_are_configs_of_their_own():
    """A config is an architecture under a workload: each apart is a frozen config of its own
    (checked on its own), they combine back into the same config, and no parameter's shape
    follows the workload (the architecture resolves the learned position table's rows)."""
    cfg = ModelConfig(seq_len=32, batch=4, micro_batches=2)
    arch, work = cfg.architecture, cfg.workload
    assert isinstance(arch, Architecture) and not isinstance(arch, Workload)
    assert work == Workload(batch=4, seq_len=32, micro_batches=2)
    assert not {f.name for f in dataclasses.fields(arch)} & set(WORKLOAD_FIELDS)
    assert arch.max_positions == 32  # resolved: the table keeps its rows under another workload
    again = ModelConfig.of(arch, work.replace(batch=8, seq_len=16))
    assert again.architecture == arch and again.tokens == 8 * 16
    with pytest.raises(ConfigError, match="micro_batches=0: must be a positive integer"):
        Workload(micro_batches=0)
    with pytest.raises(ConfigError, match="seq_len=64: is longer than the learned position"):
        ModelConfig.of(arch, Workload(seq_len=64))
    rope = ModelConfig(positions="rope", seq_len=32).architecture
    assert rope.max_positions == 0  # rotary positions have no table: any sequence length
    assert ModelConfig.of(rope, Workload(seq_len=4096)).seq_len == 4096

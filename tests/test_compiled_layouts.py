"""What each strategy's compiled program does, read from the program itself (HLO, shardings)."""

import json
import math
import os
import re
from pathlib import Path

import jax
import pytest
from tiny import forward_hlo, tiny

import meshes
from jaxmoe.analysis.collectives import inventory
from jaxmoe.axes import Axis
from jaxmoe.config import preset
from jaxmoe.layout import minimum_per_layer, per_layer
from jaxmoe.placement import compiled_param_shardings, param_specs

GOLDEN = Path(__file__).parent / "golden"
STRATEGIES = list(meshes.REGISTRY.values())
IDS = [s.name for s in STRATEGIES]
COLLECTIVE_LINE = re.compile(
    r"= .*\b(all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)"
)
SHAPE = re.compile(r"[a-z]+\d*\[([\d,]*)\]")


def layer_counts(cfg, strategy):
    placement, compiled = forward_hlo(cfg, strategy)
    inv = inventory(compiled.as_text(), strategy.axis_sizes)
    return placement, compiled, inv, {k: c for k, (c, _) in per_layer(inv, cfg.n_layers).items()}


def shard_fraction(placement, compiled, predicate) -> float:
    """Bytes one device holds of the parameters whose path matches, over their full size."""
    chosen = [
        (math.prod(s.shard_shape(a.shape)), math.prod(a.shape))
        for path, (a, s) in compiled_param_shardings(compiled, placement.abstract).items()
        if predicate(path)
    ]
    assert chosen, "no parameter matched"
    return sum(held for held, _ in chosen) / sum(full for _, full in chosen)


def test_ep16_two_all_to_alls_per_moe_layer_and_no_weight_gathered():
    cfg = tiny(True, moe_every=2, n_layers=4)  # 2 dense + 2 MoE layers
    placement, compiled, inv, _ = layer_counts(cfg, meshes.get("ep16"))
    total = inv.by_kind()
    assert total["all-to-all"].count == 2 * cfg.n_moe_layers
    # the vocab-parallel embeddings gather activations, never a table: outside the layers, at
    # most the token ids and the LM head's [B, S, D] inputs (each device's 1/16 of them sent)
    gathers = [c for c in inv.collectives if c.kind == "all-gather"]
    assert all(c.loop_depth == 0 for c in gathers)
    activations = cfg.batch * cfg.seq_len * (cfg.d_model + 1) * 4
    assert sum(c.operand_bytes * 16 for c in gathers) <= activations
    assert all(c.axes == ("expert",) for c in inv.collectives if c.kind == "all-to-all")
    is_expert = re.compile(r"moe/moe/w_(in|out)$").search
    assert shard_fraction(placement, compiled, is_expert) == 1 / 16


def test_ep16_dense_layers_move_nothing():
    _, _, inv, _ = layer_counts(tiny(False), meshes.get("ep16"))
    assert inv.total_bytes(in_loop=True) == 0


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_tp16_megatron_all_reduces(moe):
    cfg = tiny(moe)
    _, compiled, inv, counts = layer_counts(cfg, meshes.get("tp16"))
    reductions = counts["all-reduce"] + counts["reduce-scatter"]
    assert reductions == 2
    assert counts["all-gather"] == counts["reduce-scatter"]  # a split all-reduce comes in pairs
    assert counts["all-to-all"] == 0
    assert all(c.axes == ("tensor",) for c in inv.collectives if c.loop_depth)
    if moe:  # the routing reaches the experts as indices: no one-hot mask [G, S, E, C]
        group = math.gcd(cfg.group_for(cfg.seq_len), cfg.batch * cfg.seq_len)
        mask = (cfg.batch * cfg.seq_len // group, group, cfg.n_experts, cfg.capacity_for(group))
        shapes = set(SHAPE.findall(compiled.as_text()))
        assert ",".join(map(str, mask)) not in shapes


def test_heads_dims_attention_is_sliced_16_ways_and_moves_no_scores():
    s = 40  # a sequence length no other dimension shares
    cfg = tiny(True, seq_len=s)
    placement, compiled, _, _ = layer_counts(cfg, meshes.get("heads_dims_4x4"))
    is_attention = re.compile(r"attn/w[qkvo]$").search
    assert shard_fraction(placement, compiled, is_attention) == 1 / 16
    hlo = compiled.as_text()
    for line in hlo.splitlines():
        if COLLECTIVE_LINE.search(line):
            for dims in SHAPE.findall(line.split(" all-")[0]):
                assert [int(d) for d in dims.split(",") if d].count(s) < 2, line
    # No head's scores are computed twice: a device's [., S, S] tensors cover 1/16 of B x H.
    share = cfg.batch * cfg.n_heads // 16
    for dims in SHAPE.findall(hlo):
        shape = [int(d) for d in dims.split(",") if d]
        if len(shape) >= 3 and shape[-2:] == [s, s]:
            assert math.prod(shape[:-2]) <= share, shape


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_bytes_sent_are_the_minimum(strategy, moe):
    """The forward pass sends what the layout must (a pipeline's idle iterations aside, which
    send as its busy ones do)."""
    cfg = tiny(moe)
    _, _, inv, _ = layer_counts(cfg, strategy)
    measured = inv.total_bytes(in_loop=True) / cfg.n_layers
    least = minimum_per_layer(cfg, strategy) / (1 - strategy.bubble_fraction(cfg))
    if least == 0:
        assert measured == 0
    else:
        assert 0.95 <= measured / least <= 1.05, (measured, least)


@pytest.mark.parametrize("model", ["tiny_moe", "tiny_dense"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_prefill_and_decode_send_the_minimum(strategy, model):
    """Compiled on abstract inputs, prefill and a decode step send at most 5% over what the
    layout must (a pipeline's idle iterations aside), a decode step routing the rows each
    device holds together (a routing group spread over devices must gather its tokens)."""
    cfg = preset(model)
    cfg = cfg.replace(decode_group_size=cfg.batch // strategy.split_factor(Axis.BATCH))
    run = strategy.lay_out(cfg, jax.devices()[: strategy.n_devices])
    for phase in ("prefill", "decode"):
        cost = run.cost(phase)
        sent = sum(b for _, b in cost.per_layer.values())
        least = cost.minimum_bytes_per_layer / (1 - cost.bubble_fraction)
        assert sent == least == 0 or 0.95 <= sent / least <= 1.05, (phase, sent, least)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_parameter_specs_match_golden_snapshot(strategy):
    """Set JAXMOE_UPDATE_GOLDEN=1 to rewrite the snapshots after an intended change."""
    placement, compiled = forward_hlo(tiny(True, moe_every=2, n_layers=4), strategy)
    specs = {
        path: [list(p) if isinstance(p, tuple) else p for p in spec]
        for path, spec in param_specs(compiled, placement.abstract).items()
    }
    path = GOLDEN / f"{strategy.name.replace(':', '-')}.json"
    if os.environ.get("JAXMOE_UPDATE_GOLDEN"):
        lines = (f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(specs.items()))
        path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    assert specs == json.loads(path.read_text())

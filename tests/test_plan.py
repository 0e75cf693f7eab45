"""`plan` searches the layouts of the devices: every candidate is accounted for (cannot split the
model, pruned by memory or estimate, compiled and ranked, or not rankable), and pruning by
memory follows the weights each layout leaves a device."""

import dataclasses

import jax
import pytest
from tiny import tiny

import meshes
from jaxmoe.analysis import hardware
from jaxmoe.config import ConfigError, preset
from jaxmoe.estimate import estimate
from jaxmoe.memory_check import param_bytes
from jaxmoe.plan import plan
from meshes import compose


def test_search_accounts_for_every_layout_of_8_devices():
    cfg = preset("tiny_moe").replace(n_layers=4, batch=16)
    weights = param_bytes(cfg)
    # room for weights, gradients and Adam's moments split 8 ways, not for a whole copy
    hw = dataclasses.replace(hardware.get("h100x8"), hbm_bytes=4 * weights / 8 * 1.5)
    result = plan(cfg, hw, None, jax.devices()[:8], compile_top=2, phases=("train",))
    names = meshes.candidates(8)
    assert result.considered == len(names) and result.n_devices == 8
    ranked = [r.strategy for r in result.ranking("train")]
    parts = [set(result.cannot_split), set(result.pruned["train"]), set(ranked)]
    # the separations (named with the micro-batches they run with): no training-step bound
    parts.append({name.split(" (")[0] for name in result.cannot_rank["train"]})
    assert sum(len(p) for p in parts) == len(names) and set().union(*parts) == set(names)
    assert 2 <= len(ranked) <= 6 and result.compiled == len(ranked)  # at most 3 x 2 compiled
    assert all(n.startswith("ma_separation") for n in result.cannot_rank["train"])
    assert "alone take" in result.pruned["train"]["dp8"]  # a whole copy per device: pruned
    assert any("behind the 2 best compiled" in why for why in result.pruned["train"].values())
    for name in ranked:  # the compiled are the best estimates
        e = estimate(meshes.get(name), cfg, hw, "train")
        assert e.fits(hw)  # a whole copy per device comes after every layout split enough
        for other in result.pruned["train"]:
            e_other = estimate(meshes.get(other), cfg, hw, "train")
            assert not e_other.fits(hw) or e_other.seconds >= e.seconds, (name, other)
    seconds = [r.seconds for r in result.ranking("train") if r.fits]
    assert seconds == sorted(seconds)
    assert "programs compiled" in result.table() and "training step" in result.table()


def test_plan_tries_the_device_orders_that_matter_and_names_the_best():
    """On 2 nodes of 8, ep4_tp4 keeps tensor's 4 inside a node by default; expert innermost
    (`@tp-ep`) keeps the all-to-alls there instead, which an MoE model's prefill prefers: the
    compiled bounds, not the estimates (which see both orders alike), decide."""
    assert [c.name for c in compose.orders(compose.parse("ep4_tp4"), 8)] == [
        "ep4_tp4",
        "ep4_tp4@tp-ep",
    ]
    assert compose.orders(compose.parse("ep4_tp4"), 16) == [compose.parse("ep4_tp4")]
    on_two_nodes = meshes.candidates(16, 8)
    assert {"heads_dims_4x4@dims-heads", "ep4_tp4@tp-ep"} <= set(on_two_nodes)
    assert not any("@" in name for name in meshes.candidates(16))  # one node: no order matters
    assert meshes.get("ep4_tp4@tp-ep").mesh_shape[-1] == ("expert", 4)
    with pytest.raises(ConfigError, match="must name each of its axes ep, tp once"):
        meshes.get("ep4_tp4@tp")

    cfg = tiny(True)
    hw = hardware.get("h100x16")
    result = plan(cfg, hw, ["ep4_tp4", "ep4_tp4@tp-ep"], jax.devices()[:16], phases=("prefill",))
    ((best, others),) = result.device_orders("prefill")
    assert (best, others) == ("ep4_tp4@tp-ep", ("ep4_tp4",))
    bounds = {r.strategy: r.seconds for r in result.ranking("prefill")}
    assert bounds["ep4_tp4@tp-ep"] < bounds["ep4_tp4"]
    assert "device order for prefill: ep4_tp4@tp-ep ranks above ep4_tp4" in result.table()
    assert result.to_json()["device_orders"]["prefill"] == [
        {"best": "ep4_tp4@tp-ep", "others": ["ep4_tp4"]}
    ]

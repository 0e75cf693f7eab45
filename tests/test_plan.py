"""`plan` searches the layouts of the devices: every candidate is accounted for (cannot split the
model, pruned by memory or estimate, compiled and ranked, or not rankable), and pruning by
memory follows the weights each layout leaves a device."""

import dataclasses

import jax

import meshes
from jaxmoe.analysis import hardware
from jaxmoe.config import preset
from jaxmoe.estimate import estimate
from jaxmoe.memory_check import param_bytes
from jaxmoe.plan import plan


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

"""Every strategy computes the same model as one device: logits, loss and gradients."""

import jax
import numpy as np
import pytest
from tiny import loss_grads, tiny

import meshes
from jaxmoe.compare import compare_strategies

STRATEGIES = list(meshes.REGISTRY.values())
IDS = [s.name for s in STRATEGIES]


def assert_close_logits(cfg, strategies, tol):
    reports = compare_strategies(cfg, strategies, jax.devices())
    for r in reports:
        assert r.max_abs_err <= tol * r.logits_scale, (r.strategy, r.max_abs_err, r.logits_scale)
    return reports


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_logits_match_one_device(moe):
    assert_close_logits(tiny(moe), STRATEGIES, 1e-4)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("strategy", STRATEGIES, ids=IDS)
def test_loss_and_grads_match_one_device(strategy, moe):
    cfg = tiny(moe)
    ref_loss, ref_grads = loss_grads(cfg, None)
    loss, grads = loss_grads(cfg, strategy)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert len(grads) == len(ref_grads)
    scale = max(float(np.max(np.abs(g))) for g in ref_grads)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-4 * scale, rtol=1e-3)


@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("heads_dims_4x4", {"n_heads": 24, "head_dim": 12, "d_model": 96, "d_ff": 80}),
        ("ep16", {"n_experts": 48, "d_model": 48, "d_ff": 72, "n_heads": 6, "head_dim": 8}),
        ("tp16", {"n_heads": 48, "head_dim": 6, "d_model": 72, "d_ff": 144}),
    ],
)
def test_sizes_that_are_not_powers_of_two(name, changes):
    cfg = tiny(True, **changes)
    assert_close_logits(cfg, [meshes.get(name)], 1e-4)


def test_bfloat16_agreement():
    """bf16 compute with fp32 parameters: what the layouts reach against one device."""
    cfg = tiny(True, dtype="bfloat16")
    reports = compare_strategies(cfg, STRATEGIES, jax.devices())
    for r in reports:
        assert r.max_abs_err <= 5e-2 * r.logits_scale, (r.strategy, r.max_abs_err)

"""The tp8_pp2 baseline's GPipe schedule (in progress, not yet registered): same model as one
device for 2, 4 and 8 micro-batches, both MoE placements; its checks and bubble fraction."""

import jax
import numpy as np
import pytest
from tiny import loss_grads, placed, tiny

from jaxmoe.compare import compare_strategies
from jaxmoe.config import ConfigError
from meshes import pipeline, tp8_pp2

PLACEMENTS = [tp8_pp2.STRATEGY, tp8_pp2.EXPERTS_TP]


@pytest.mark.parametrize("micro_batches", [2, 4, 8])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_logits_match_one_device(moe, micro_batches):
    cfg = tiny(moe, n_layers=4, micro_batches=micro_batches)
    strategies = PLACEMENTS if moe else PLACEMENTS[:1]
    for r in compare_strategies(cfg, strategies, jax.devices()):
        assert r.max_abs_err <= 1e-4 * r.logits_scale, (r.strategy, r.max_abs_err)


@pytest.mark.parametrize("micro_batches", [2, 8])
@pytest.mark.parametrize("strategy", PLACEMENTS, ids=[s.name for s in PLACEMENTS])
def test_loss_and_grads_match_one_device(strategy, micro_batches):
    cfg = tiny(True, micro_batches=micro_batches)
    ref_loss, ref_grads = loss_grads(cfg, None)
    loss, grads = loss_grads(cfg, strategy)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    scale = max(float(np.max(np.abs(g))) for g in ref_grads)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-4 * scale, rtol=1e-3)


def test_bubble_fraction():
    assert pipeline.bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert pipeline.bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert pipeline.bubble_fraction(1, 4) == 0


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"n_layers": 3, "moe_every": 0}, "n_layers=3"),
        ({"n_layers": 2, "moe_every": 2}, "n_layers=2"),
        ({"micro_batches": 3}, "micro_batches=3"),
    ],
)
def test_uneven_pipeline_is_refused_before_compiling(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        placed(tiny(True, **changes), tp8_pp2.STRATEGY)

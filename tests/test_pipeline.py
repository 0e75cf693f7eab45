"""The tp8_pp2 baseline's GPipe schedule: the same model as one device for 2, 4 and 8
micro-batches, both MoE placements; what its compiled program moves; its checks and bubble."""

import functools
import math
import re

import jax
import numpy as np
import pytest
from tiny import forward_hlo, loss_grads, placed, tiny

from jaxmoe.analysis.collectives import inventory
from jaxmoe.compare import compare_strategies
from jaxmoe.config import ConfigError
from jaxmoe.placement import compiled_param_shardings
from meshes import MeshAxis, pipeline, tp8_pp2

PLACEMENTS = [tp8_pp2.STRATEGY, tp8_pp2.EXPERTS_TP]
CASES = [(False, tp8_pp2.STRATEGY), *((True, s) for s in PLACEMENTS)]
CASE_IDS = ["dense", *(f"moe-{s.name}" for s in PLACEMENTS)]


@pytest.mark.parametrize("micro_batches", [2, 4, 8])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_logits_match_one_device(moe, micro_batches):
    cfg = tiny(moe, n_layers=4, micro_batches=micro_batches)
    strategies = PLACEMENTS if moe else PLACEMENTS[:1]
    for r in compare_strategies(cfg, strategies, jax.devices()):
        assert r.max_abs_err <= 1e-4 * r.logits_scale, (r.strategy, r.max_abs_err)


@functools.cache
def reference(moe: bool):
    return loss_grads(tiny(moe), None)


@pytest.mark.parametrize("micro_batches", [2, 4, 8])
@pytest.mark.parametrize(("moe", "strategy"), CASES, ids=CASE_IDS)
def test_loss_and_grads_match_one_device(moe, strategy, micro_batches):
    ref_loss, ref_grads = reference(moe)
    loss, grads = loss_grads(tiny(moe, micro_batches=micro_batches), strategy)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    scale = max(float(np.max(np.abs(g))) for g in ref_grads)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-4 * scale, rtol=1e-3)


@pytest.mark.parametrize(("moe", "strategy"), CASES, ids=CASE_IDS)
def test_compiled_schedule_moves_micro_batches_between_stages(moe, strategy):
    m, stages = 4, tp8_pp2.STRATEGY.mesh[MeshAxis.PIPE]
    cfg = tiny(moe, n_layers=4, micro_batches=m)
    _, compiled = forward_hlo(cfg, strategy)
    inv = inventory(compiled.as_text(), strategy.axis_sizes)
    micro_batch = cfg.batch // m * cfg.seq_len * cfg.d_model * cfg.compute_dtype.itemsize

    shifts = [c for c in inv.collectives if c.kind == "collective-permute"]
    assert len(shifts) == 1, shifts
    (shift,) = shifts
    assert shift.axes == (MeshAxis.PIPE,)
    assert shift.executions == m + stages - 1
    assert shift.operand_bytes == micro_batch

    in_layers = [c for c in inv.collectives if c.loop_depth and c.kind != "collective-permute"]
    assert in_layers and all(c.axes == (MeshAxis.TENSOR,) for c in in_layers)
    # two Megatron reductions per layer of a stage, per iteration, each on one micro-batch
    layers_per_stage = cfg.n_layers // stages
    assert sum(c.executions for c in in_layers) == 2 * layers_per_stage * (m + stages - 1)
    assert min(c.operand_bytes for c in in_layers) == micro_batch
    # nothing spans both axes; one reduce-scatter over `pipe` hands each stage its share of
    # the last stage's results (the LM head's rows), half of what an all-reduce would send
    assert all(c.axes in {(MeshAxis.TENSOR,), (MeshAxis.PIPE,)} for c in inv.collectives)
    collect = [c for c in inv.collectives if not c.loop_depth and c.axes == (MeshAxis.PIPE,)]
    assert [(c.kind, c.executions, c.operand_bytes) for c in collect] == [
        ("reduce-scatter", 1, m * micro_batch)
    ]
    assert collect[0].bytes_sent == m * micro_batch * (stages - 1) / stages


@pytest.mark.parametrize("strategy", PLACEMENTS, ids=[s.name for s in PLACEMENTS])
def test_each_device_holds_a_sixteenth_of_the_layers(strategy):
    placement, compiled = forward_hlo(tiny(True, moe_every=2, n_layers=4), strategy)
    small = re.compile(r"norm_\w+/scale$|moe/router$").search  # replicated over `tensor`
    held = full = 0
    for path, (a, s) in compiled_param_shardings(compiled, placement.abstract).items():
        if not path.startswith("blocks/"):
            continue
        fraction = math.prod(s.shard_shape(a.shape)) / math.prod(a.shape)
        if small(path):
            assert fraction in {1 / 2, 1 / 16}, path  # split by stage at least
        else:
            held, full = held + fraction * math.prod(a.shape), full + math.prod(a.shape)
    assert held / full == 1 / 16


def test_bubble_fraction():
    assert pipeline.bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert pipeline.bubble_fraction(2, 8) == pytest.approx(1 / 9)
    assert pipeline.bubble_fraction(1, 4) == 0
    assert tp8_pp2.STRATEGY.bubble_fraction(tiny(micro_batches=2)) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"n_layers": 3, "moe_every": 0}, "n_layers=3"),
        ({"n_layers": 2, "moe_every": 2}, "n_layers=2"),
        ({"micro_batches": 3}, "micro_batches=3"),
        ({"batch": 8, "micro_batches": 16}, "micro_batches=16"),
    ],
)
def test_uneven_pipeline_is_refused_before_compiling(changes, needle):
    with pytest.raises(ConfigError, match=needle):
        placed(tiny(True, **changes), tp8_pp2.STRATEGY)

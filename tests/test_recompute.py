"""`recompute`: what a training step's backward pass computes again instead of holding. Read
from the compiled step (compiled on abstract inputs): "dots" holds less than "none" for the same
matrix FLOPs and the same collectives; "full" holds less again for more FLOPs. All three give the
same loss and gradients."""

import functools

import jax
import numpy as np
import pytest
from tiny import loss_grads, tiny

import meshes
from jaxmoe.analysis.collectives import inventory
from jaxmoe.analysis.flops import matmul_flops
from jaxmoe.config import RECOMPUTE


@functools.cache
def compiled_step(name: str, recompute: str) -> tuple[int, float, int]:
    """(temporaries per device, matmul FLOPs per device, bytes sent per device) of the step."""
    cfg = tiny(True, n_layers=4, recompute=recompute)
    layout = meshes.get(name)
    _, step = layout.lay_out(cfg, jax.devices()[: layout.n_devices]).compile_train_step()
    text = step.as_text()
    sent = inventory(text, dict(layout.mesh_shape)).total_bytes()
    return step.memory_analysis().temp_size_in_bytes, matmul_flops(text), sent


@pytest.mark.parametrize(("name", "held"), [("tp16", True), ("tp8_pp2", True), ("ep16", False)])
def test_recomputing_holds_less_for_the_same_work(name, held):
    """`held`: whether the memory is read too (ep16's tiny blocks hold little beside the loss's
    temporaries; its case is there for its all-to-alls, which must not run twice)."""
    none, dots, full = (compiled_step(name, r) for r in RECOMPUTE)
    assert dots[1] == pytest.approx(none[1], rel=0.01)  # no matmul runs twice
    assert dots[2] == pytest.approx(none[2], rel=0.01)  # nothing is sent twice
    assert full[1] > 1.1 * none[1]  # the blocks' forward matmuls again
    if held:
        assert dots[0] <= 0.8 * none[0], (dots, none)
        assert full[0] <= dots[0]


@pytest.mark.parametrize("name", ["tp16", "tp8_pp2"])
def test_every_choice_gives_the_same_loss_and_gradients(name):
    layout = meshes.get(name)
    (loss, grads), *others = (
        loss_grads(tiny(True, recompute=r), layout, dropout=True) for r in RECOMPUTE
    )
    scale = max(float(np.max(np.abs(g))) for g in grads)
    for other_loss, other_grads in others:
        assert other_loss == pytest.approx(loss, rel=1e-6)
        for g, ref in zip(other_grads, grads, strict=True):
            np.testing.assert_allclose(g, ref, atol=1e-5 * scale, rtol=1e-4)

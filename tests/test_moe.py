"""The MoE layer's routing semantics: priority, capacity, dropping, losses, dropout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import forward_hlo, loss_grads, tiny

import meshes
from jaxmoe.analysis import hardware
from jaxmoe.analysis.dependence import overlap_chunks
from jaxmoe.analysis.roofline import program_bound
from jaxmoe.compare import compare_strategies
from jaxmoe.config import ModelConfig
from jaxmoe.model.moe import Moe, choose, masks, router_metrics


def routing(n_experts: int, top_k: int, **fields) -> ModelConfig:
    return ModelConfig(n_experts=n_experts, top_k=top_k, **fields)


def logits_choosing(experts: list[list[int]], n_experts: int) -> jax.Array:
    """Router logits [1, S, E] whose ranking per token is the given list of experts."""
    out = np.zeros((1, len(experts), n_experts), np.float32)
    for s, ranking in enumerate(experts):
        for rank, e in enumerate(ranking):
            out[0, s, e] = 10.0 - rank
    return jnp.asarray(out)


def test_first_choices_fill_capacity_before_second_choices():
    # 4 tokens, 3 experts, top-2, capacity 2: expert 0 is everyone's first choice.
    logits = logits_choosing([[0, 1], [0, 2], [0, 1], [1, 2]], 3)
    choices, sums = choose(logits, routing(3, 2), capacity=2)
    dispatch, combine = masks(choices, n_experts=3, capacity=2)
    stats = router_metrics(sums)
    d = np.asarray(dispatch[0])  # [S, E, C]
    assert d[0, 0, 0] == 1 and d[1, 0, 1] == 1  # tokens 0, 1 take expert 0's two slots
    assert d[2, 0].sum() == 0  # token 2's first choice is full: dropped
    # second choices come after all first choices: token 3 (first choice) took expert 1 slot 0
    assert d[3, 1, 0] == 1 and d[0, 1, 1] == 1 and d[2, 1].sum() == 0
    assert d[1, 2, 0] == 1 and d[3, 2, 1] == 1  # expert 2's slots, in sequence order
    assert d.sum(axis=(1, 2)).tolist() == [2, 2, 0, 2]  # token 2 lost both choices
    assert float(stats["dropped_fraction"]) == pytest.approx(2 / 8)
    # gates of a token's kept choices are its renormalised top-2 probabilities
    c = np.asarray(combine[0])
    probs = np.asarray(jax.nn.softmax(logits[0, 0]))
    np.testing.assert_allclose(c[0].sum(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(c[0, 0, 0], probs[0] / (probs[0] + probs[1]), rtol=1e-6)


def test_balanced_routing_has_unit_load_balance_loss():
    logits = jnp.zeros((2, 8, 4))  # uniform router: every expert equally likely
    stats = router_metrics(choose(logits, routing(4, 1), capacity=8)[1])
    assert float(stats["load_balance_loss"]) == pytest.approx(1.0)
    assert float(stats["router_z_loss"]) == pytest.approx(np.log(4) ** 2, rel=1e-5)
    assert float(jnp.sum(stats["expert_load"])) == pytest.approx(1.0)


def test_dropped_tokens_keep_only_their_residual():
    cfg = tiny(True, capacity_factor=0.01)  # capacity 1 slot per expert per group
    layer = Moe(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (cfg.batch, cfg.seq_len, cfg.d_model))
    y, sums = layer(x)
    stats = router_metrics(sums)
    # at most one token per expert per group is served: the rest get exactly zero
    served = np.asarray(jnp.any(y != 0, axis=-1)).sum(axis=1)
    assert (served <= cfg.n_experts).all()
    assert float(stats["dropped_fraction"]) > 0.5


def test_router_sums_add_up_over_micro_batches():
    logits = jax.random.normal(jax.random.key(3), (8, 16, 4))
    whole = router_metrics(choose(logits, routing(4, 2), capacity=8)[1])
    halves = [choose(part, routing(4, 2), capacity=8)[1] for part in (logits[:4], logits[4:])]
    summed = router_metrics(jax.tree.map(lambda a, b: a + b, *halves))
    for name, value in whole.items():
        np.testing.assert_allclose(summed[name], value, rtol=1e-6, err_msg=name)


def test_expert_dropout_only_when_training():
    cfg = tiny(True, expert_dropout=0.5)
    layer = Moe(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (cfg.batch, cfg.seq_len, cfg.d_model))
    eval_a, _ = layer(x)
    eval_b, _ = layer(x)
    train_a, _ = layer(x, jax.random.key(1))
    train_b, _ = layer(x, jax.random.key(2))
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(train_a, eval_a) and not np.allclose(train_a, train_b)


def test_gated_experts_match_one_device():
    cfg = tiny(True, expert_form="swiglu")
    for r in compare_strategies(cfg, list(meshes.REGISTRY.values()), jax.devices()):
        assert r.max_abs_err <= 1e-4 * r.logits_scale, r.strategy


# and a pipeline whose data-parallel replicas each run the schedule on their rows
@pytest.mark.parametrize("name", [*meshes.REGISTRY, "dp2_tp4_pp2"])
def test_expert_dropout_draws_the_same_masks_under_every_layout(name):
    strategy = meshes.get(name)
    cfg = tiny(True, n_layers=4, expert_dropout=0.3, micro_batches=4)
    ref_loss, ref_grads = loss_grads(cfg, None, dropout=True)
    _, plain_grads = loss_grads(cfg, None)
    pairs = zip(ref_grads, plain_grads, strict=True)
    assert any(not np.allclose(a, b, rtol=1e-2) for a, b in pairs)  # dropout bites
    loss, grads = loss_grads(cfg, strategy, dropout=True)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    scale = max(float(np.max(np.abs(g))) for g in ref_grads)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-4 * scale, rtol=1e-3)


def test_chunked_expert_parallel_layers_match_one_device_and_can_overlap():
    """moe_chunks=3 sends each expert's capacity slots (3 per group here) in 3 chunks: the same
    loss and gradients as one unchunked device, expert dropout included; in the compiled
    program no chunk's all-to-alls wait on another's, and the bound hides 2/3 of their time."""
    cfg = tiny(True, expert_dropout=0.3)
    assert cfg.capacity == 3
    chunked = cfg.replace(moe_chunks=3)
    ep16 = meshes.get("ep16")
    ref_loss, ref_grads = loss_grads(cfg, None, dropout=True)
    loss, grads = loss_grads(chunked, ep16, dropout=True)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    scale = max(float(np.max(np.abs(g))) for g in ref_grads)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-4 * scale, rtol=1e-3)

    bounds = {}
    for c in (cfg, chunked):
        _, compiled = forward_hlo(c, ep16)
        bounds[c.moe_chunks] = program_bound(
            compiled, ep16.axis_sizes, hardware.get("h100x16"), c.dtype
        )
    assert overlap_chunks(compiled.as_text()) == 3
    one, three = bounds[1], bounds[3]
    assert one.overlap_chunks == 1 and one.hidden_s == 0
    assert three.overlap_chunks == 3
    assert three.comm_s == pytest.approx(one.comm_s, rel=0.01)  # the same bytes, in 3 parts
    a2a = sum(s for k, s in three.comm_by.items() if k.startswith("all-to-all"))
    assert three.hidden_s == pytest.approx(a2a * 2 / 3)
    assert three.serial_s < one.serial_s

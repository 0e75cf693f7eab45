"""Greedy generation with a KV cache: the cache reproduces the full forward pass, and every
strategy generates the same tokens as one device; a pipeline keeps each stage's cache."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny import placed, tiny

import meshes
from jaxmoe.analysis.collectives import inventory
from jaxmoe.compare import random_tokens
from jaxmoe.config import ConfigError
from jaxmoe.inference import cache_sharding, decoder, generate
from jaxmoe.placement import forward, init_params
from meshes import MeshAxis, tp8_pp2

PROMPT, STEPS = 8, 6
STRATEGIES = list(meshes.REGISTRY.values())


def setup(moe: bool):
    # capacity never binds, so whole-sequence routing groups and decode's one-token groups agree
    cfg = tiny(moe, n_layers=4, capacity_factor=8.0)
    graphdef, params = init_params(cfg, 0)
    prompt = np.asarray(random_tokens(cfg, 1))[:, :PROMPT]
    return cfg, graphdef, params, prompt


@functools.cache
def one_device_tokens(moe: bool) -> np.ndarray:
    cfg, graphdef, params, prompt = setup(moe)
    return generate(decoder(cfg, graphdef), params, prompt, STEPS)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cached_steps_reproduce_the_full_forward_pass(moe):
    cfg, graphdef, params, prompt = setup(moe)
    tokens = one_device_tokens(moe)
    text = np.concatenate([prompt, tokens], axis=1)
    full = np.asarray(jax.jit(forward(graphdef))(params, text))  # [B, S, V]
    dec = decoder(cfg, graphdef)
    logits, cache = dec.prefill(params, jnp.asarray(prompt), dec.new_cache())
    scale = np.max(np.abs(full[..., : cfg.vocab_size]))
    np.testing.assert_allclose(logits, full[:, PROMPT - 1], atol=1e-5 * scale)
    for i in range(STEPS - 1):
        pos = PROMPT + i
        logits, cache = dec.step(params, jnp.asarray(text[:, pos : pos + 1]), cache, pos)
        np.testing.assert_allclose(logits, full[:, pos], atol=1e-5 * scale)
    np.testing.assert_array_equal(full[:, PROMPT - 1 : -1].argmax(-1), tokens)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s.name for s in STRATEGIES])
def test_every_strategy_generates_the_same_tokens(strategy):
    cfg, _, params, prompt = setup(True)
    p = placed(cfg, strategy)
    tokens = generate(decoder(cfg, p.graphdef, p), p.put(params), prompt, STEPS)
    np.testing.assert_array_equal(tokens, one_device_tokens(True))


def test_pipeline_decode_keeps_each_stages_cache_on_that_stage():
    cfg = tiny(True, n_layers=4, micro_batches=4)
    strategy = tp8_pp2.STRATEGY
    p = placed(cfg, strategy)
    dec = decoder(cfg, p.graphdef, p)
    cache = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(dec.new_cache),
        cache_sharding(p),
    )
    token = jax.ShapeDtypeStruct((cfg.batch, 1), jnp.int32, sharding=p.token_sharding)
    pos = jax.ShapeDtypeStruct((), jnp.int32)
    compiled = dec.step.lower(p.abstract_params(), token, cache, pos).compile()
    for sharding in jax.tree.leaves(compiled.input_shardings[0][2]):
        blocks, heads = sharding.spec[0], sharding.spec[3]  # [N, B, T, H, K]
        assert (blocks, heads) == (MeshAxis.PIPE, MeshAxis.TENSOR), sharding.spec
    inv = inventory(compiled.as_text(), strategy.axis_sizes)
    assert all(c.axes in {(MeshAxis.TENSOR,), (MeshAxis.PIPE,)} for c in inv.collectives)
    (shift,) = (c for c in inv.collectives if c.kind == "collective-permute")
    one_token_per_sequence = cfg.batch // 4 * cfg.d_model * cfg.compute_dtype.itemsize
    assert (shift.executions, shift.operand_bytes) == (4 + 1, one_token_per_sequence)


def test_generation_longer_than_the_positions_is_refused():
    cfg, graphdef, params, prompt = setup(False)
    with pytest.raises(ConfigError, match="exceed seq_len=16"):
        generate(decoder(cfg, graphdef), params, prompt, cfg.seq_len)

"""Greedy generation with a KV cache: the cache reproduces the full forward pass, and every
strategy generates the same tokens as one device (routing a decode step's tokens together, with
capacity that binds); a pipeline keeps each stage's cache."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from tiny import placed, tiny

import meshes
from jaxmoe.analysis.collectives import inventory
from jaxmoe.axes import Axis
from jaxmoe.compare import random_tokens
from jaxmoe.config import ConfigError
from jaxmoe.inference import Generation, cache_sharding, decoder, generate
from jaxmoe.placement import forward, init_params
from meshes import MeshAxis, tp8_pp2

PROMPT, STEPS = 8, 6
STRATEGIES = list(meshes.REGISTRY.values())


def setup(moe: bool, capacity_factor: float = 8.0):
    # by default capacity never binds, so whole-sequence routing groups and decode's agree
    cfg = tiny(moe, n_layers=4, capacity_factor=capacity_factor)
    graphdef, params = init_params(cfg, 0)
    prompt = np.asarray(random_tokens(cfg, 1))[:, :PROMPT]
    return cfg, graphdef, params, prompt


@functools.cache
def one_device(moe: bool, capacity_factor: float = 8.0) -> Generation:
    cfg, graphdef, params, prompt = setup(moe, capacity_factor)
    return generate(decoder(cfg, graphdef), params, prompt, STEPS)


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_cached_steps_reproduce_the_full_forward_pass(moe):
    cfg, graphdef, params, prompt = setup(moe)
    tokens = one_device(moe).tokens
    text = np.concatenate([prompt, tokens], axis=1)
    full = np.asarray(jax.jit(forward(graphdef))(params, text))  # [B, S, V]
    dec = decoder(cfg, graphdef)
    logits, cache, dropped = dec.prefill(params, jnp.asarray(prompt), dec.new_cache())
    assert float(dropped) == 0 and one_device(moe).dropped_choices == 0  # capacity never binds
    scale = np.max(np.abs(full[..., : cfg.vocab_size]))
    np.testing.assert_allclose(logits, full[:, PROMPT - 1], atol=1e-5 * scale)
    for i in range(STEPS - 1):
        pos = PROMPT + i
        logits, cache, _ = dec.step(params, jnp.asarray(text[:, pos : pos + 1]), cache, pos)
        np.testing.assert_allclose(logits, full[:, pos], atol=1e-5 * scale)
    np.testing.assert_array_equal(full[:, PROMPT - 1 : -1].argmax(-1), tokens)


def compiled_step(dec, p) -> jax.stages.Compiled:
    """The decode step laid out by placement `p`, compiled on abstract parameters and cache."""
    cache = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        jax.eval_shape(dec.new_cache),
        cache_sharding(p),
    )
    token = jax.ShapeDtypeStruct((dec.cfg.batch, 1), jnp.int32, sharding=p.token_sharding)
    pos = jax.ShapeDtypeStruct((), jnp.int32)
    return dec.step.lower(p.abstract_params(), token, cache, pos).compile()


def expert_slots(hlo: str, cfg, placement) -> int:
    """Token slots each expert takes in a decode step on one device, read from the compiled
    program: the elements of the experts' first matmul ([E, X, F] however XLA views it) over the
    experts and hidden width a device holds."""
    name = "experts/EXD,EDF->EXF/dot_general"
    shapes = [m[1] for m in re.finditer(r"= \w+\[([\d,]*)\][^\n]*" + re.escape(name), hlo)]
    assert shapes, "no expert matmul in the decode step"
    elements = max(math.prod(int(n) for n in shape.split(",")) for shape in shapes)
    spec = placement.strategy.spec((Axis.EXPERT, Axis.EMBED, Axis.EXPERT_MLP))
    e, _, f = NamedSharding(placement.mesh, spec).shard_shape(
        (cfg.n_experts, cfg.d_model, cfg.expert_hidden)
    )
    return elements // (e * f)


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s.name for s in STRATEGIES])
def test_every_strategy_generates_the_same_tokens(strategy):
    """With GShard's capacity factor, a decode step's routing groups overflow: the layout drops
    the same choices as one device, and each expert takes at most its capacity per group."""
    cfg, _, params, prompt = setup(True, capacity_factor=1.25)
    want = one_device(True, capacity_factor=1.25)
    assert want.dropped_choices > 0  # capacity binds somewhere
    p = placed(cfg, strategy)
    dec = decoder(cfg, p.graphdef, p)
    got = generate(dec, p.put(params), prompt, STEPS)
    np.testing.assert_array_equal(got.tokens, want.tokens)
    assert got.dropped_choices == want.dropped_choices

    hlo = compiled_step(dec, p).as_text()
    groups, per_group = cfg.batch // cfg.decode_group, cfg.capacity_for(cfg.decode_group)
    assert per_group == math.ceil(
        cfg.top_k * cfg.decode_group * cfg.capacity_factor / cfg.n_experts
    )
    # before decode routed its tokens together: one slot per token per expert (batch of them)
    assert per_group <= expert_slots(hlo, cfg, p) <= groups * per_group < cfg.batch


def test_pipeline_decode_keeps_each_stages_cache_on_that_stage():
    cfg = tiny(True, n_layers=4, micro_batches=4)
    strategy = tp8_pp2.STRATEGY
    p = placed(cfg, strategy)
    dec = decoder(cfg, p.graphdef, p)
    compiled = compiled_step(dec, p)
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

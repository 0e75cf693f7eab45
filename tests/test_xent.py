"""The fused, chunked LM-head cross-entropy: the plain head's loss and gradients, without ever
holding the whole logits (read from the compiled training program)."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tiny import placed, tiny

import meshes
from jaxmoe.axes import Axis
from jaxmoe.compare import random_tokens
from jaxmoe.model import Transformer, loss_fn
from jaxmoe.model.xent import chunk_len
from jaxmoe.placement import init_params, loss_and_grad

ARRAY = re.compile(r"\bf32\[([\d,]+)\]")


def plain_ce(model, inputs, targets):
    logits, _ = model(inputs)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)
    return -jnp.mean(picked)


def fused_ce(model, inputs, targets):
    return loss_fn(model, inputs, targets)[1]["ce_loss"]


def test_chunk_len_is_the_largest_divisor_within_the_budget():
    assert chunk_len(16, 64, 512) == 32
    assert chunk_len(16, 60, 100) == 6  # 100 // 16 = 6 tokens per row, and 6 divides 60
    assert chunk_len(4, 7, 512) == 7
    assert chunk_len(1024, 16, 512) == 1  # never less than one position


@pytest.mark.parametrize("chunk_tokens", [1, 48, 512])
def test_loss_and_gradients_match_the_plain_head(chunk_tokens):
    cfg = tiny(True, loss_chunk_tokens=chunk_tokens)
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = random_tokens(cfg, 1)
    inputs, targets = tokens, jnp.roll(tokens, -1, axis=1)
    want, want_grads = nnx.value_and_grad(plain_ce)(model, inputs, targets)
    got, got_grads = nnx.value_and_grad(fused_ce)(model, inputs, targets)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for w, g in zip(jax.tree.leaves(want_grads), jax.tree.leaves(got_grads), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-7)
    # without differentiation the plain (unfused) chunked pass runs: same value
    np.testing.assert_allclose(jax.jit(fused_ce)(model, inputs, targets), want, rtol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
    cfg = tiny(True)
    model = Transformer(cfg, nnx.Rngs(0))
    tokens = random_tokens(cfg, 1)
    inputs, targets = tokens, jnp.roll(tokens, -1, axis=1)
    want = plain_ce(model, inputs, targets)
    low = Transformer(cfg.replace(dtype="bfloat16"), nnx.Rngs(0))  # the same float32 weights
    got, grads = nnx.value_and_grad(fused_ce)(low, inputs, targets)
    np.testing.assert_allclose(got, want, rtol=1e-2)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("strategy", ["one_device", "ep16", "tp16"])
def test_training_program_never_holds_the_whole_logits(strategy):
    # 1,400 tokens of vocabulary pad to 1,408: a size no other dimension has (88 per device of 16)
    cfg = tiny(True, vocab_size=1400, loss_chunk_tokens=64)  # chunks of 4 positions x 16 rows
    layout = meshes.get(strategy)
    graphdef, state = init_params(cfg, 0)
    tokens = np.asarray(random_tokens(cfg, 1))
    fn = loss_and_grad(graphdef)
    if layout.n_devices == 1:
        compiled = jax.jit(fn).lower(state, tokens, tokens).compile()
    else:
        p = placed(cfg, layout)
        jitted = p.jit(fn, in_shardings=(p.shardings, p.token_sharding, p.token_sharding))
        compiled = jitted.lower(p.put(state), tokens, tokens).compile()
    vocab = cfg.padded_vocab // layout.split_factor(Axis.VOCAB)
    shapes = [tuple(map(int, m.split(","))) for m in ARRAY.findall(compiled.as_text())]
    with_vocab = [s for s in shapes if s[-1] == vocab]
    assert (cfg.batch, 4, vocab) in with_vocab  # a chunk's logits, split as the vocabulary is
    whole = cfg.batch * cfg.seq_len * vocab
    assert max(math.prod(s) for s in with_vocab) < whole, sorted(set(with_vocab))

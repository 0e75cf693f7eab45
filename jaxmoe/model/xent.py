"""The LM head and its cross-entropy, fused and chunked over the sequence.

The training loss never holds the whole [B, S, V] logits. The forward pass runs the head over
sequence chunks of about `chunk_tokens` tokens; each chunk's logits give its losses and, at once,
its gradients (softmax minus the target's one-hot), which are applied to the chunk's inputs and
accumulated for the [D, V] weight: as each batch shard's partial sums, added over the devices
once after the last chunk (`jaxmoe.partial_sums`). The backward pass then only scales those by
the incoming cotangent, so nothing is recomputed. With a 50k vocabulary this keeps a few hundred
MiB of logits out of memory and runs faster than the unfused head (the logits stay in cache).

A strategy that splits the vocabulary (`Axis.VOCAB`) makes the head vocab-parallel: each device
computes its slice of every chunk's logits, and only the log-sum-exp statistics and the [B, c, D]
input gradients cross devices.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxmoe.axes import Axis
from jaxmoe.model.attention import RESIDUAL
from jaxmoe.partial_sums import partial_sums, split_over, sum_parts
from jaxmoe.sharding import active_layout, constrain, part_axes

ROWS = (Axis.LM_BATCH, None, None)  # the head's inputs [B, c, D]: whole rows on every vocab shard
CHUNK_LOGITS = (Axis.LM_BATCH, None, Axis.VOCAB)  # [B, c, V]
HEAD = (Axis.EMBED, Axis.VOCAB)  # the head's table [D, V]
PADDING = -1e9  # the logit of a padding vocabulary entry: it never wins


def chunk_len(batch: int, seq: int, chunk_tokens: int) -> int:
    """The largest divisor of seq whose chunk holds at most chunk_tokens tokens (at least 1)."""
    per_row = max(1, chunk_tokens // batch)
    return max(c for c in range(1, seq + 1) if seq % c == 0 and c <= per_row)


def _chunk(x, w, targets, vocab_size):
    """One chunk: x [B, c, D], w [D, V], targets [B, c] -> (logits, probabilities, hit, nll)."""
    logits = jnp.einsum("BSD,DV->BSV", x, w, preferred_element_type=jnp.float32)
    vocab_ids = jnp.arange(w.shape[1])
    logits = constrain(jnp.where(vocab_ids < vocab_size, logits, PADDING), CHUNK_LOGITS)
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    exp = jnp.exp(logits - top)
    total = jnp.sum(exp, axis=-1, keepdims=True)
    hit = vocab_ids == targets[..., None]
    # log-sum-exp minus the target's logit, picked by a masked sum that stays split with the vocab
    nll = (top + jnp.log(total))[..., 0] - jnp.sum(jnp.where(hit, logits, 0), axis=-1)
    return exp / total, hit, nll


def _chunks(x, targets, c):
    """[B, S, ...] -> [S/c, B, c, ...]: the scan runs over sequence chunks, the batch kept whole
    (so a split batch stays split)."""
    b, s = targets.shape
    xs = jnp.moveaxis(x.reshape(b, s // c, c, -1), 1, 0)
    return xs, jnp.moveaxis(targets.reshape(b, s // c, c), 1, 0)


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def cross_entropy(x, w, targets, vocab_size: int, chunk_tokens: int):
    """Mean next-token cross-entropy of the head `w` [D, V] on inputs x [B, S, D] (already
    normalised) against targets [B, S] (ids below vocab_size; padding entries are masked)."""
    b, s = targets.shape
    xs, ts = _chunks(constrain(x, ROWS), targets, chunk_len(b, s, chunk_tokens))
    nll = jax.lax.map(lambda a: jnp.sum(_chunk(a[0], w, a[1], vocab_size)[2]), (xs, ts))
    return jnp.sum(nll) / (b * s)


def _forward(x, w, targets, vocab_size, chunk_tokens):
    b, s = targets.shape
    n = b * s
    xs, ts = _chunks(constrain(x, ROWS), targets, chunk_len(b, s, chunk_tokens))
    w = constrain(w, HEAD)  # gathered once where a layout splits it for storage (FSDP)

    # the table's gradient as each batch shard's partial sums, and the inputs' as each vocab
    # shard's, added over devices after the loop
    split = split_over(ROWS, (0, 1))
    by_vocab = split_over(CHUNK_LOGITS, (2,))

    def body(dw, chunk):
        xc, tc = chunk
        probs, hit, nll = _chunk(xc, w, tc, vocab_size)
        dlogits = constrain(jnp.where(hit, probs - 1.0, probs) / n, CHUNK_LOGITS)
        dx = partial_sums("BSV,DV->BSD", dlogits, CHUNK_LOGITS, w, HEAD, by_vocab)
        dw = dw + partial_sums("BSD,BSV->DV", xc, ROWS, dlogits, CHUNK_LOGITS, split)
        return dw, (jnp.sum(nll), dx.astype(x.dtype))

    parts = jnp.zeros((split.parts if split else 1, *w.shape), jnp.float32)
    parts, (nll, dx) = jax.lax.scan(body, parts, (xs, ts))  # dx: [S/c, N, B, c, D]
    dx = jnp.moveaxis(dx, 0, 2).reshape(dx.shape[1], *x.shape)
    dx = sum_parts(dx, RESIDUAL, by_vocab, spec=_input_spec(x.shape))
    return jnp.sum(nll) / n, (dx, sum_parts(parts, HEAD, split).astype(w.dtype), targets)


def _input_spec(shape) -> PartitionSpec | None:
    """Where the head's input gradient [B, S, D] is summed to: the batch split as the head's
    rows or the residual stream split it (the loss gathers a split residual; a pipeline splits
    the head's rows over its stages), so the gradient returns to either without moving."""
    layout = active_layout()
    if layout is None:
        return None
    mesh, strategy = layout
    rows, residual = strategy.spec(ROWS, shape=shape), strategy.spec(RESIDUAL, shape=shape)
    split = set(part_axes(rows[0])) | set(part_axes(residual[0]))
    batch = tuple(a for a in mesh.axis_names if a in split)
    return PartitionSpec(batch or None, *residual[1:])


def _backward(vocab_size, chunk_tokens, residuals, g):
    dx, dw, targets = residuals
    zero_targets = jnp.zeros(targets.shape, jax.dtypes.float0)  # integer input: no gradient
    return dx * g.astype(dx.dtype), dw * g.astype(dw.dtype), zero_targets


cross_entropy.defvjp(_forward, _backward)

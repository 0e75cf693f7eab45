"""The separated model's programs, each jitted for its own mesh under its own strategy's layout.

Attention mesh: `embed`, `attend` (one block's attention side on one micro-batch, first adding
the experts' output of the block before), the LM head (`last_logits`, `logits`, `head_grads`).
Expert mesh: `experts` (router and experts of one block on one micro-batch) and `router` (the
router losses from the routing sums of the whole batch). The `*_grads` programs are the backward
passes: each recomputes its piece's forward pass from the piece's inputs (activation
checkpointing per piece), so the forward pass keeps only what crosses between the meshes.

With `transfer_bits=8` what crosses is int8 with a float32 scale per token (absmax / 127):
`send` quantises where the states leave, `receive` dequantises where they arrive.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from jaxmoe.config import ModelConfig
from jaxmoe.model import router_losses
from jaxmoe.model.attention import RESIDUAL
from jaxmoe.separation.layout import Separation
from jaxmoe.separation.params import Parts
from jaxmoe.sharding import constrain, laid_out_jit


def send(x: jax.Array, bits: int):
    """What crosses between the meshes: x itself, or (int8 values, float32 scale per token)."""
    if not bits:
        return x
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.round(x32 / scale).astype(jnp.int8), scale


def receive(sent, dtype) -> jax.Array:
    """What crossed, as [B, S, D] states laid out like the residual stream. Quantised states
    take that layout before they are dequantised, so a gather on the way moves int8 values."""
    if not isinstance(sent, tuple):
        return sent
    values, scale = (constrain(a, RESIDUAL) for a in sent)
    return (values.astype(jnp.float32) * scale).astype(dtype)


class Programs:
    def __init__(
        self,
        cfg: ModelConfig,
        sep: Separation,
        pieces: Parts,
        attn_mesh: Mesh,
        exp_mesh: Mesh,
        exit_sharding: NamedSharding,
    ):
        """`exit_sharding`: the layout (on the attention devices) the experts' input leaves in."""
        self.cfg, self.bits, self.pieces = cfg, sep.transfer_bits, pieces
        self.exit = exit_sharding
        on_attn = functools.partial(laid_out_jit, attn_mesh, sep.attention_strategy(cfg))
        on_exp = functools.partial(laid_out_jit, exp_mesh, sep.experts)
        self.embed = on_attn(self._embed)
        self.attend = on_attn(self._attend, donate_argnums=3)
        self.last_logits = on_attn(self._last_logits)
        self.logits = on_attn(self._logits)
        self.loss = on_attn(self._loss)
        self.head_grads = on_attn(jax.value_and_grad(self._whole_loss, argnums=(0, 1, 2)))
        self.attend_grads = on_attn(self._attend_grads)
        self.embed_grads = on_attn(self._embed_grads)
        self.experts = on_exp(self._experts)
        self.expert_grads = on_exp(self._expert_grads)
        self.router = on_exp(self._router)
        self.add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b))

    # ---- attention mesh ----------------------------------------------------------------------
    def _outer(self, outer):
        return nnx.merge(self.pieces.outer[0], outer)

    def _embed(self, outer, tokens, pos):
        return self._outer(outer).embed_tokens(tokens, pos)

    def _attend(self, state, x, y, cache, pos):
        """(x, the previous block's expert output or None, cache) -> (x, what goes to the
        experts, cache)."""
        if y is not None:
            x = constrain(x + receive(y, x.dtype), RESIDUAL)
        x, h, cache = nnx.merge(self.pieces.attention[0], state).attend(x, cache, pos)
        leaving = jax.tree.map(
            lambda a: jax.lax.with_sharding_constraint(a, self.exit), send(h, self.bits)
        )
        return x, leaving, cache

    @staticmethod
    def _last_block(x, y):
        return constrain(x + receive(y, x.dtype), RESIDUAL)

    def _last_logits(self, outer, x, y):
        model = self._outer(outer)
        return model.logits(model.final_norm(self._last_block(x, y)[:, -1:]))[:, 0]

    def _logits(self, outer, x, y):
        model = self._outer(outer)
        return model.logits(model.final_norm(self._last_block(x, y)))

    def _loss(self, outer, x, y, targets, weight):
        model = self._outer(outer)
        return model.token_loss(model.final_norm(self._last_block(x, y)), targets) * weight

    def _whole_loss(self, outer, xs, ys, goals):
        """The loss over every micro-batch at once (lists of each's x, y and targets), so the
        head's gradient is summed over the replica groups once a step, not once a micro-batch."""
        return self._loss(outer, _rows_together(xs), _rows_together(ys), _rows_together(goals), 1)

    def _attend_grads(self, state, x, y, cotangents):
        def attend(state, x, y):
            return self._attend(state, x, y, None, 0)[:2]

        return jax.vjp(attend, state, x, y)[1](cotangents)

    def _embed_grads(self, outer, tokens, cotangents):
        """The embedding's gradient from every micro-batch's tokens and cotangents (lists), as
        one batch: summed over the replica groups once."""
        tokens, cotangent = _rows_together(tokens), _rows_together(cotangents)
        return jax.vjp(lambda o: self._embed(o, tokens, 0), outer)[1](cotangent)[0]

    # ---- expert mesh -------------------------------------------------------------------------
    def _experts(self, state, h, key, first_row):
        """What came from attention -> (what goes back, routing sums)."""
        moe = nnx.merge(self.pieces.experts[0], state)
        y, stats = moe(receive(h, self.cfg.compute_dtype), key, first_row)
        return send(y, self.bits), stats

    def _expert_grads(self, state, h, key, first_row, cotangents):
        def experts(state, h):
            return self._experts(state, h, key, first_row)

        return jax.vjp(experts, state, h)[1](cotangents)

    def _router(self, sums: list[dict]):
        """Routing sums of every block (whole batch) -> (router metrics, d router_loss / d sums)."""

        def loss(sums):
            metrics = router_losses(self.cfg, jax.tree.map(lambda *s: jnp.stack(s), *sums))
            return metrics["router_loss"], metrics

        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(sums)
        return metrics, grads


def _rows_together(parts: list[jax.Array]) -> jax.Array:
    """Micro-batches [b, ...] each -> one batch [b * M, ...], row i of each together: each
    device's rows stay on it (a plain concatenation would move rows between replica groups)."""
    both = jnp.stack(parts, axis=1)  # [b, M, ...]
    return both.reshape(-1, *both.shape[2:])

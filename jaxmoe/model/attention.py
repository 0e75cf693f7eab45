"""Causal multi-head self-attention.

Projections keep heads (H) and head dim (K) as separate axes so a strategy may split either.
Before the scores every device rebuilds whole head vectors (the `ATTN_BATCH` layout), so the
Q.K^T contraction over K is never split across devices and no [S, S] tensor crosses them.

With a KV cache (inference) the new keys and values are written into it at position `pos` and
the queries attend over the whole cache, masked to the positions already written; the cache
keeps the `CORE` layout, so it is split wherever the strategy splits attention.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.model.params import axes_of, weight
from jaxmoe.partial_sums import project
from jaxmoe.sharding import constrain

PROJ = (Axis.BATCH, Axis.SEQ, Axis.HEADS, Axis.HEAD_DIM)  # q, k, v, o as projected: [B, S, H, K]
CORE = (Axis.ATTN_BATCH, Axis.SEQ, Axis.HEADS, None)  # whole head vectors: [B, S, H, K]
RESIDUAL = (Axis.BATCH, Axis.SEQ, Axis.EMBED)  # [B, S, D]


class KV(NamedTuple):
    """One attention layer's cache: keys and values [B, T, H, K] (T = the config's seq_len)."""

    k: jax.Array
    v: jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k = cfg.d_model, cfg.n_heads, cfg.head_dim
        qkv_axes = (Axis.EMBED, Axis.HEADS, Axis.HEAD_DIM)
        std_out = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.wq = weight(rngs, cfg, (d, h, k), qkv_axes, cfg.init_std)  # [D, H, K]
        self.wk = weight(rngs, cfg, (d, h, k), qkv_axes, cfg.init_std)
        self.wv = weight(rngs, cfg, (d, h, k), qkv_axes, cfg.init_std)
        self.wo = weight(rngs, cfg, (h, k, d), (Axis.HEADS, Axis.HEAD_DIM, Axis.EMBED), std_out)
        self.dtype = cfg.compute_dtype

    def __call__(
        self, x: jax.Array, kv: KV | None = None, pos: jax.Array | int = 0
    ) -> tuple[jax.Array, KV | None]:
        """x: [B, S, D] at positions pos.. -> ([B, S, D], the cache with these keys written)."""
        dt = self.dtype
        with jax.named_scope("qkv"):
            q, k, v = (
                constrain(
                    project("BSD,DHK->BSHK", x, RESIDUAL, w[...].astype(dt), axes_of(w)), PROJ
                )
                for w in (self.wq, self.wk, self.wv)
            )
        with jax.named_scope("attention_core"):
            q, k, v = (constrain(t, CORE) for t in (q, k, v))
            if kv is not None:
                at = (0, pos, 0, 0)
                kv = KV(
                    *(
                        constrain(jax.lax.dynamic_update_slice(c, new.astype(c.dtype), at), CORE)
                        for c, new in ((kv.k, k), (kv.v, v))
                    )
                )
                k, v = kv
            scale = q.shape[-1] ** -0.5
            scores = jnp.einsum("BSHK,BTHK->BHST", q, k, preferred_element_type=jnp.float32)
            s, t = scores.shape[-2:]
            visible = jnp.arange(t)[None, :] <= pos + jnp.arange(s)[:, None]  # causal [S, T]
            scores = jnp.where(visible, scores * scale, jnp.finfo(jnp.float32).min)
            probs = jax.nn.softmax(scores, axis=-1).astype(dt)  # [B, H, S, T]
            o = constrain(jnp.einsum("BHST,BTHK->BSHK", probs, v), CORE)
        with jax.named_scope("out_proj"):
            o = constrain(o, PROJ)
            y = project("BSHK,HKD->BSD", o, PROJ, self.wo[...].astype(dt), axes_of(self.wo))
            return constrain(y, RESIDUAL), kv

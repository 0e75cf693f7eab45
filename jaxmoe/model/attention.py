"""Causal self-attention with grouped-query key-value heads and learned or rotary positions.

Projections keep heads (H, J) and head dim (K) as separate axes so a strategy may split either.
Before the scores every device rebuilds whole head vectors (the `CORE` layouts), so rotary
positions and the Q.K^T contraction over K are never split across devices and no [S, T] tensor
crosses them. Query head h reads key-value head h // (H / J). Where a layout splits query heads
over more devices than there are key-value heads, each device holds the key-value head of its
query heads' group (Megatron's rule): the keys and values are repeated to one head per device
before the cache, and the cache follows (`cache_heads`).

With a KV cache (inference) the new keys and values are written into it at position `pos` and
the queries attend over the whole cache, masked to the positions already written; the cache
keeps the `KV_CORE` layout, so it is split wherever the strategy splits attention.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.model.attention_core import attend
from jaxmoe.model.params import axes_of, weight
from jaxmoe.model.rotary import rotate
from jaxmoe.partial_sums import project_once, project_together
from jaxmoe.sharding import active_layout, constrain

PROJ = (Axis.BATCH, Axis.SEQ, Axis.HEADS, Axis.HEAD_DIM)  # q and o as projected: [B, S, H, K]
KV_PROJ = (Axis.BATCH, Axis.SEQ, Axis.KV_HEADS, Axis.HEAD_DIM)  # k, v as projected: [B, S, J, K]
CORE = (Axis.ATTN_BATCH, Axis.SEQ, Axis.HEADS, None)  # whole head vectors: [B, S, H, K]
KV_CORE = (Axis.ATTN_BATCH, Axis.SEQ, Axis.KV_HEADS, None)  # [B, T, J, K]
RESIDUAL = (Axis.BATCH, Axis.SEQ, Axis.EMBED)  # [B, S, D]


class KV(NamedTuple):
    """One attention layer's cache: keys and values [B, T, J, K] (T = the config's seq_len)."""

    k: jax.Array
    v: jax.Array


def heads_split() -> int:
    """Devices the active layout splits query heads over (1 outside a layout)."""
    layout = active_layout()
    return 1 if layout is None else layout[1].split_factor(Axis.HEADS)


def cache_heads(cfg: ModelConfig, split: int) -> int:
    """Key-value heads the cache holds when `split` devices share the query heads: the model's,
    or one per device where they are fewer (each repeated over its group's devices)."""
    return cfg.kv_heads if cfg.kv_heads % split == 0 else split


def write(cache: tuple | None, new: tuple, pos, axes) -> tuple:
    """`new` arrays [B, S, ...] written into `cache`'s [B, T, ...] at position pos (the new
    arrays themselves without a cache)."""
    if cache is None:
        return new
    return type(cache)(
        *(
            constrain(jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), pos, 1), axes)
            for c, n in zip(cache, new, strict=True)
        )
    )


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, j, k = cfg.d_model, cfg.n_heads, cfg.kv_heads, cfg.head_dim
        std_out = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.wq = weight(
            rngs, cfg, (d, h, k), (Axis.EMBED, Axis.HEADS, Axis.HEAD_DIM), cfg.init_std
        )
        kv_axes = (Axis.EMBED, Axis.KV_HEADS, Axis.HEAD_DIM)
        self.wk = weight(rngs, cfg, (d, j, k), kv_axes, cfg.init_std)  # [D, J, K]
        self.wv = weight(rngs, cfg, (d, j, k), kv_axes, cfg.init_std)
        self.wo = weight(rngs, cfg, (h, k, d), (Axis.HEADS, Axis.HEAD_DIM, Axis.EMBED), std_out)
        self.cfg = cfg

    def __call__(
        self, x: jax.Array, kv: KV | None = None, pos: jax.Array | int = 0, window: int = 0
    ) -> tuple[jax.Array, KV | None]:
        """x: [B, S, D] at positions pos.. -> ([B, S, D], the cache with these keys written);
        `window` > 0 limits each query to the last `window` positions."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        with jax.named_scope("qkv"):
            q, k, v = project_together(
                x,
                RESIDUAL,
                [
                    ("BSD,DHK->BSHK", self.wq[...].astype(dt), axes_of(self.wq)),
                    ("BSD,DJK->BSJK", self.wk[...].astype(dt), axes_of(self.wk)),
                    ("BSD,DJK->BSJK", self.wv[...].astype(dt), axes_of(self.wv)),
                ],
            )
            q, k, v = constrain(q, PROJ), constrain(k, KV_PROJ), constrain(v, KV_PROJ)
        with jax.named_scope("attention_core"):
            q, k, v = constrain(q, CORE), constrain(k, KV_CORE), constrain(v, KV_CORE)
            if cfg.positions == "rope":
                q, k = rotate(q, pos, cfg.rope_theta), rotate(k, pos, cfg.rope_theta)
            copies = cache_heads(cfg, heads_split()) // cfg.kv_heads
            if copies > 1:
                k, v = (constrain(jnp.repeat(t, copies, axis=2), KV_CORE) for t in (k, v))
            new = write(kv, KV(k, v), pos, KV_CORE)
            o = constrain(attend(q, *new, q_pos=pos, window=window), CORE)
        with jax.named_scope("out_proj"):
            o = constrain(o, PROJ)
            wo = self.wo[...].astype(dt)
            y = project_once("BSHK,HKD->BSD", o, PROJ, wo, axes_of(self.wo))
            return constrain(y, RESIDUAL), None if kv is None else new

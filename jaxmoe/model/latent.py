"""Multi-head latent attention (MLA, DeepSeek-V2/V3).

Keys and values come from one compressed latent per token, c = norm(x W_a) [B, T, R]: per head,
k = [c W_k (K dims), r] and v = c W_v (the value dims), where r [B, T, K_rope] is a rotary key
shared by every head. Queries are [x W_q (K), rotate(x W_q_rope)], optionally through their own
compressed latent (`q_lora_rank`). The cache holds c and r only, (R + K_rope) values per token
per layer, whatever the head count; a decode step expands the cached latent into keys and values
again (the plain form, not the one that folds W_k into the queries).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.model.attention import CORE, PROJ, RESIDUAL, write
from jaxmoe.model.attention_core import attend
from jaxmoe.model.params import RMSNorm, axes_of, weight
from jaxmoe.model.rotary import rotate
from jaxmoe.partial_sums import project
from jaxmoe.sharding import constrain

COMPRESSED = (Axis.BATCH, Axis.SEQ, None)  # a latent as projected: [B, S, R]
LATENT = (Axis.ATTN_BATCH, Axis.SEQ, None)  # the cached latent and rotary key: [B, T, R]


class Latent(NamedTuple):
    """One latent attention layer's cache: the normalised latent [B, T, R] and the rotated
    rotary key [B, T, K_rope]."""

    c: jax.Array
    r: jax.Array


class LatentAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, k, kr = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.rope_head_dim
        r, rq, std = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.init_std
        std_out = std / (2 * cfg.n_layers) ** 0.5
        heads = (Axis.HEADS, Axis.HEAD_DIM)
        source = Axis.EMBED
        if rq:
            self.wq_a = weight(rngs, cfg, (d, rq), (Axis.EMBED, None), std)  # [D, R_q]
            self.q_norm = RMSNorm(cfg, rq)
            source, d = None, rq
        self.wq = weight(rngs, cfg, (d, h, k), (source, *heads), std)  # [D or R_q, H, K]
        self.wq_rope = weight(rngs, cfg, (d, h, kr), (source, *heads), std)
        d = cfg.d_model
        self.wkv_a = weight(rngs, cfg, (d, r), (Axis.EMBED, None), std)  # [D, R]
        self.kv_norm = RMSNorm(cfg, r)
        self.wk_rope = weight(rngs, cfg, (d, kr), (Axis.EMBED, None), std)  # [D, K_rope]
        self.wk = weight(rngs, cfg, (r, h, k), (None, *heads), std)  # [R, H, K]
        self.wv = weight(rngs, cfg, (r, h, cfg.value_head_dim), (None, *heads), std)
        self.wo = weight(rngs, cfg, (h, cfg.value_head_dim, d), (*heads, Axis.EMBED), std_out)
        self.cfg = cfg

    def __call__(
        self, x: jax.Array, cache: Latent | None = None, pos: jax.Array | int = 0, window: int = 0
    ) -> tuple[jax.Array, Latent | None]:
        """x: [B, S, D] at positions pos.. -> ([B, S, D], the cache with this latent written)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype

        def proj(eq, a, a_axes, w, out_axes):
            return constrain(project(eq, a, a_axes, w[...].astype(dt), axes_of(w)), out_axes)

        with jax.named_scope("qkv"):
            source, source_axes = x, RESIDUAL
            if cfg.q_lora_rank:
                source = self.q_norm(proj("BSD,DR->BSR", x, RESIDUAL, self.wq_a, COMPRESSED))
                source_axes = COMPRESSED
            eq = "BSD,DHK->BSHK" if source_axes == RESIDUAL else "BSR,RHK->BSHK"
            q = proj(eq, source, source_axes, self.wq, PROJ)
            q_rope = proj(eq, source, source_axes, self.wq_rope, PROJ)
            c = self.kv_norm(proj("BSD,DR->BSR", x, RESIDUAL, self.wkv_a, COMPRESSED))
            r = proj("BSD,DK->BSK", x, RESIDUAL, self.wk_rope, COMPRESSED)
        with jax.named_scope("attention_core"):
            c, r = constrain(c, LATENT), constrain(r, LATENT)
            new = write(cache, Latent(c, rotate(r, pos, cfg.rope_theta)), pos, LATENT)
            k = proj("BTR,RHK->BTHK", new.c, LATENT, self.wk, CORE)
            v = proj("BTR,RHK->BTHK", new.c, LATENT, self.wv, CORE)
            shared = jnp.broadcast_to(new.r[:, :, None, :], (*k.shape[:3], new.r.shape[-1]))
            k = constrain(jnp.concatenate([k, shared.astype(k.dtype)], axis=-1), CORE)
            q_rope = rotate(constrain(q_rope, CORE), pos, cfg.rope_theta)
            q = constrain(jnp.concatenate([constrain(q, CORE), q_rope], axis=-1), CORE)
            o = constrain(attend(q, k, v, q_pos=pos, window=window), CORE)
        with jax.named_scope("out_proj"):
            o = constrain(o, PROJ)
            y = proj("BSHK,HKD->BSD", o, PROJ, self.wo, RESIDUAL)
            return y, None if cache is None else new

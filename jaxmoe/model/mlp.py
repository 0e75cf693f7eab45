"""The dense MLP: D -> F, GELU, F -> D."""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.model.params import weight
from jaxmoe.sharding import constrain


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        std_out = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.w_in = weight(rngs, cfg, (cfg.d_model, cfg.d_ff), (Axis.EMBED, Axis.MLP), cfg.init_std)
        self.w_out = weight(rngs, cfg, (cfg.d_ff, cfg.d_model), (Axis.MLP, Axis.EMBED), std_out)
        self.dtype = cfg.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, S, D] -> [B, S, D]."""
        h = jnp.einsum("BSD,DF->BSF", x, self.w_in[...].astype(self.dtype))
        h = constrain(jax.nn.gelu(h), (Axis.BATCH, Axis.SEQ, Axis.MLP))
        y = jnp.einsum("BSF,FD->BSD", h, self.w_out[...].astype(self.dtype))
        return constrain(y, (Axis.BATCH, Axis.SEQ, Axis.EMBED))

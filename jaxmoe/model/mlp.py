"""The dense MLP: D -> F, GELU, F -> D."""

import jax
from flax import nnx

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.model.attention import RESIDUAL
from jaxmoe.model.params import axes_of, weight
from jaxmoe.partial_sums import project
from jaxmoe.sharding import constrain

HIDDEN = (Axis.BATCH, Axis.SEQ, Axis.MLP)  # [B, S, F]


class Mlp(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        std_out = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.w_in = weight(rngs, cfg, (cfg.d_model, cfg.d_ff), (Axis.EMBED, Axis.MLP), cfg.init_std)
        self.w_out = weight(rngs, cfg, (cfg.d_ff, cfg.d_model), (Axis.MLP, Axis.EMBED), std_out)
        self.dtype = cfg.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, S, D] -> [B, S, D]."""
        w_in, w_out = (w[...].astype(self.dtype) for w in (self.w_in, self.w_out))
        h = project("BSD,DF->BSF", x, RESIDUAL, w_in, axes_of(self.w_in))
        h = constrain(jax.nn.gelu(h), HIDDEN)
        y = project("BSF,FD->BSD", h, HIDDEN, w_out, axes_of(self.w_out))
        return constrain(y, RESIDUAL)

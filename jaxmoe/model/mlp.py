"""The dense MLP: D -> F, GELU, F -> D, or the gated form SiLU(x W_gate) * (x W_in), F -> D."""

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
    """`cfg.mlp_form` of width `cfg.d_ff`, or the given form and width (the shared experts')."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, width: int = 0, form: str = ""):
        d, f = cfg.d_model, width or cfg.d_ff
        std_out = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        self.w_in = weight(rngs, cfg, (d, f), (Axis.EMBED, Axis.MLP), cfg.init_std)
        self.gated = (form or cfg.mlp_form) == "swiglu"
        if self.gated:
            self.w_gate = weight(rngs, cfg, (d, f), (Axis.EMBED, Axis.MLP), cfg.init_std)
        self.w_out = weight(rngs, cfg, (f, d), (Axis.MLP, Axis.EMBED), std_out)
        self.dtype = cfg.compute_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [B, S, D] -> [B, S, D]."""

        def up(w: nnx.Param) -> jax.Array:
            return project("BSD,DF->BSF", x, RESIDUAL, w[...].astype(self.dtype), axes_of(w))

        h = (
            jax.nn.silu(up(self.w_gate)) * up(self.w_in)
            if self.gated
            else jax.nn.gelu(up(self.w_in))
        )
        h = constrain(h, HIDDEN)
        w_out = self.w_out[...].astype(self.dtype)
        y = project("BSF,FD->BSD", h, HIDDEN, w_out, axes_of(self.w_out))
        return constrain(y, RESIDUAL)

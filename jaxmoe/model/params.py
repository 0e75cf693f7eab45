"""Parameter creation: every parameter is made with its logical axis names attached."""

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig


def weight(
    rngs: nnx.Rngs, cfg: ModelConfig, shape: Sequence[int], axes: Sequence[Axis], std: float
) -> nnx.Param:
    """A normal(0, std) weight in the config's parameter dtype, named by logical axes."""
    value = std * jax.random.normal(rngs.params(), tuple(shape), dtype=jnp.float32)
    return nnx.Param(value.astype(cfg.weight_dtype), out_sharding=tuple(axes), eager_sharding=False)


def axes_of(param: nnx.Param) -> tuple[Axis, ...]:
    """The logical axes of a parameter's dimensions (within a block of stacked layers, those of
    one layer: the stacking axes come first)."""
    names = tuple(param.get_metadata()["out_sharding"])
    return names[len(names) - param[...].ndim :]


def ones(cfg: ModelConfig, shape: Sequence[int], axes: Sequence[Axis]) -> nnx.Param:
    return nnx.Param(
        jnp.ones(tuple(shape), cfg.weight_dtype), out_sharding=tuple(axes), eager_sharding=False
    )


class RMSNorm(nnx.Module):
    """x / rms(x) * scale, computed in float32."""

    def __init__(self, cfg: ModelConfig, width: int = 0):
        """Over the model width, or over a `width` of its own (a compressed latent's, unsplit)."""
        self.scale = (
            ones(cfg, (width,), (None,)) if width else ones(cfg, (cfg.d_model,), (Axis.EMBED,))
        )
        self.eps = cfg.norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * self.scale[...].astype(jnp.float32)).astype(x.dtype)

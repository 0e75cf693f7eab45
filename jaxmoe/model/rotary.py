"""Rotary position embedding (RoPE): each pair of dims (i, i + K/2) of a head vector is turned by
the angle position x theta^(-2i/K), the "rotate half" convention of Llama and most checkpoints.
Applied to whole head vectors, so a layout that slices head dims gathers them first."""

import jax
import jax.numpy as jnp


def rotate(x: jax.Array, first: jax.Array | int, theta: float) -> jax.Array:
    """x: [B, S, ..., K] at positions first.. -> x with each position's rotation applied."""
    half = x.shape[-1] // 2
    freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [K/2]
    positions = first + jnp.arange(x.shape[1])  # [S]
    angle = positions[:, None].astype(jnp.float32) * freq[None, :]  # [S, K/2]
    extra = (1,) * (x.ndim - 3)  # the head axes between S and K
    cos = jnp.cos(angle).reshape(1, x.shape[1], *extra, half)
    sin = jnp.sin(angle).reshape(1, x.shape[1], *extra, half)
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    turned = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return turned.astype(x.dtype)

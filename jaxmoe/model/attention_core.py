"""The attention core, blockwise: no [S, T] score matrix exists for the whole sequence at once.

`attend` takes queries [B, S, H, K] and keys and values of J key-value heads ([B, T, J, K] and
[B, T, J, K_v]: grouped-query attention when J < H, latent attention's value width when K_v != K)
and returns [B, S, H, K_v]. Query head h reads key-value head h // Q, Q = H / J the query heads per
key-value head (a letter local to this module), so queries are viewed as [B, S, J, Q, K] (J
leading: a split of H stays a split of J). An einsum never holds K and K_v together, so its K is
whichever head dim its operands have.

The blockwise path is flash attention in XLA: queries in blocks of `block` rows (a scan), each
scanning keys in blocks of `block` with an online softmax (running max m, running sum l and the
unnormalised output, all float32), so the largest intermediate is one [B, block, H, block] block of
scores. A custom VJP keeps only q, k, v, the output and the log-sum-exp per query for the backward
pass, which recomputes each block's probabilities the same way (FlashAttention-2, section 3.1.1).
Blocks that a causal mask hides entirely are still computed (a scan has a fixed trip count).
"""

import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

F32 = jnp.float32
IMPLS = ("auto", "xla", "cudnn")
Impl = Literal["auto", "xla", "cudnn"]


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_pos: jax.Array | int,
    window: jax.Array | int = 0,
    block: int = 512,
    impl: Impl = "auto",
) -> jax.Array:
    """Causal attention of q [B, S, H, K] over k [B, T, J, K], v [B, T, J, K_v] -> [B, S, H, K_v].

    Query i is at position q_pos + i (q_pos an int or a traced int32 scalar), key j at position
    j; a query at p sees keys j <= p and, with window > 0, only j > p - window. Scores and the
    softmax are float32, scaled by 1/sqrt(K); the result has q's dtype. A query that sees no key
    gets zeros. `impl`: "xla" the blockwise path, "cudnn" jax.nn.dot_product_attention's cuDNN
    kernel (its constraints are the caller's to meet), "auto" cuDNN where `cudnn_fits`, else xla.
    """
    _check(q, k, v, window, block, impl)
    static = isinstance(window, int | np.integer)
    if impl == "cudnn" or (impl == "auto" and static and cudnn_fits(q, k, v, q_pos)):
        return _cudnn(q, k, v, window)
    b, s, h, kd = q.shape
    t, j, kv = v.shape[1:]
    if s <= block and t <= block:  # one block: the scores are no larger than a block's
        return _whole(q.reshape(b, s, j, h // j, kd), k, v, q_pos, window).reshape(b, s, h, kv)
    bq, bk = min(block, s), min(block, t)
    q = _pad(q, -s % bq).reshape(b, s + -s % bq, j, h // j, kd)  # [B, S', J, Q, K]
    k, v = _pad(k, -t % bk), _pad(v, -t % bk)  # [B, T', J, K], [B, T', J, K_v]
    positions = jnp.asarray(q_pos, jnp.int32), jnp.asarray(window, jnp.int32)
    o = _flash(q, k, v, *positions, t, bq, bk)  # [B, S', J, Q, K_v]
    return o[:, :s].reshape(b, s, h, kv)


def cudnn_fits(q: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array | int) -> bool:
    """Whether jax.nn.dot_product_attention's cuDNN kernel computes exactly `attend`'s result.

    On a CUDA backend: fp16 or bf16 q, k, v of one dtype; K_v == K (jax.nn wants value shaped as
    key); K a multiple of 8, at most 128 (256 from Hopper on); and self-attention from position
    0 (q_pos the int 0, S == T), since cuDNN's causal mask aligns query i with key i. Chunked
    prefill and decode (q_pos > 0 or traced) take the blockwise path.
    """
    if jax.default_backend() != "gpu":
        return False
    device = jax.devices()[0]
    if "cuda" not in device.client.platform_version.lower():
        return False
    hopper = tuple(map(int, device.compute_capability.split("."))) >= (9, 0)
    kd = q.shape[-1]
    return (
        q.dtype in (jnp.float16, jnp.bfloat16)
        and q.dtype == k.dtype == v.dtype
        and v.shape == k.shape
        and kd % 8 == 0
        and kd <= (256 if hopper else 128)
        and isinstance(q_pos, int | np.integer)
        and q_pos == 0
        and q.shape[1] == k.shape[1]
    )


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, window: int) -> jax.Array:
    # cuDNN's sliding window (p - window, p] is local_window_size (window - 1, 0) under is_causal
    local = (window - 1, 0) if window else None
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, local_window_size=local, implementation="cudnn"
    )


def _whole(q, k, v, q_pos, window) -> jax.Array:
    """q [B, S, J, Q, K] over the whole of k [B, T, J, K] and v [B, T, J, K_v] (plain autodiff)."""
    s = _scores(q, k, q_pos, 0, k.shape[1], jnp.asarray(window, jnp.int32))  # [B, S, J, Q, T]
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    o = jnp.einsum("BSJQT,BTJK->BSJQK", p.astype(v.dtype), v, preferred_element_type=F32)
    return o.astype(q.dtype)


def _check(q, k, v, window: int, block: int, impl: str) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, S, H, K], got {q.shape}, {k.shape}, {v.shape}")
    b, _, h, kd = q.shape
    if k.shape[0] != b or k.shape[3] != kd or v.shape[:3] != k.shape[:3]:
        raise ValueError(f"k {k.shape} and v {v.shape} must be [B, T, J, K] and [B, T, J, K_v]")
    if h % k.shape[2]:
        raise ValueError(f"key-value heads J={k.shape[2]} must divide query heads H={h}")
    if (isinstance(window, int | np.integer) and window < 0) or block < 1:
        raise ValueError(f"window={window}, block={block}: need window >= 0 and block >= 1")
    if impl not in IMPLS:
        raise ValueError(f"impl={impl!r}: use one of {IMPLS}")


def _pad(x: jax.Array, n: int) -> jax.Array:
    """x [B, S, ...] with n zero rows appended along S."""
    return jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2)) if n else x


def _blocks(x: jax.Array, n: int) -> jax.Array:
    """[B, S, ...] -> [S/n, B, n, ...]: the scanned axis leading."""
    return jnp.moveaxis(x.reshape(x.shape[0], -1, n, *x.shape[2:]), 1, 0)


def _unblock(x: jax.Array) -> jax.Array:
    """[S/n, B, n, ...] -> [B, S, ...]."""
    return jnp.moveaxis(x, 0, 1).reshape(x.shape[1], -1, *x.shape[3:])


def _scores(qi, kj, qs, ks, t: int, window: jax.Array) -> jax.Array:
    """Masked scaled scores of a query block [B, bq, J, Q, K] and a key block [B, bk, J, K]
    starting at positions qs and ks -> [B, bq, J, Q, bk] float32, -inf where hidden."""
    s = jnp.einsum("BSJQK,BTJK->BSJQT", qi, kj, preferred_element_type=F32)
    qp = qs + jnp.arange(qi.shape[1])[:, None]  # [bq, 1]
    kp = ks + jnp.arange(kj.shape[1])[None, :]  # [1, bk]
    seen = (kp <= qp) & (kp < t)  # causal, and not padding
    seen &= (window <= 0) | (kp > qp - window)  # the sliding window, if any
    return jnp.where(seen[None, :, None, None, :], s * qi.shape[-1] ** -0.5, -jnp.inf)


def _starts(n: int, size: int, offset=0) -> jax.Array:
    return offset + size * jnp.arange(n, dtype=jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_pos, window, t: int, bq: int, bk: int) -> jax.Array:
    """q [B, S', J, Q, K], k [B, T', J, K], v [B, T', J, K_v] (S', T' padded to whole blocks, t
    keys real) -> [B, S', J, Q, K_v] in q's dtype."""
    return _flash_fwd(q, k, v, q_pos, window, t, bq, bk)[0]


def _flash_fwd(q, k, v, q_pos, window, t, bq, bk):
    b, sp, j, qh, _ = q.shape
    kv = v.shape[-1]
    kb, vb = _blocks(k, bk), _blocks(v, bk)  # [nk, B, bk, J, K], [nk, B, bk, J, K_v]
    k_starts = _starts(kb.shape[0], bk)

    def query_block(_, xs):
        qi, qs = xs  # [B, bq, J, Q, K]

        def key_block(carry, ys):
            o, m, l = carry  # [B, bq, J, Q, K_v], [B, bq, J, Q] twice
            kj, vj, ks = ys
            s = _scores(qi, kj, qs, ks, t, window)  # [B, bq, J, Q, bk]
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # rows that saw nothing yet
            p = jnp.exp(s - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("BSJQT,BTJK->BSJQK", p.astype(vj.dtype), vj, preferred_element_type=F32)
            return (alpha[..., None] * o + pv, m_new, alpha * l + p.sum(-1)), None

        init = (
            jnp.zeros((b, bq, j, qh, kv), F32),
            jnp.full((b, bq, j, qh), -jnp.inf, F32),
            jnp.zeros((b, bq, j, qh), F32),
        )
        (o, m, l), _ = lax.scan(key_block, init, (kb, vb, k_starts))
        seen = l > 0
        o = o / jnp.where(seen, l, 1.0)[..., None]
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), 0.0)  # [B, bq, J, Q]
        return None, (o.astype(q.dtype), lse)

    q_starts = _starts(sp // bq, bq, q_pos)
    _, (o, lse) = lax.scan(query_block, None, (_blocks(q, bq), q_starts))
    o = _unblock(o)  # [B, S', J, Q, K_v]
    return o, (q, k, v, q_pos, window, o, _unblock(lse))


def _flash_bwd(t, bq, bk, res, do):
    q, k, v, q_pos, window, o, lse = res  # lse [B, S', J, Q]
    delta = jnp.einsum("BSJQK,BSJQK->BSJQ", do.astype(F32), o.astype(F32))
    kb, vb = _blocks(k, bk), _blocks(v, bk)
    k_starts = _starts(kb.shape[0], bk)
    scale = q.shape[-1] ** -0.5

    def query_block(carry, xs):
        dk, dv = carry  # [nk, B, bk, J, K], [nk, B, bk, J, K_v] float32
        qi, doi, lsei, deltai, qs = xs

        def key_block(dq, ys):
            kj, vj, ks = ys
            p = jnp.exp(_scores(qi, kj, qs, ks, t, window) - lsei[..., None])  # [B, bq, J, Q, bk]
            dvj = jnp.einsum(
                "BSJQT,BSJQK->BTJK", p.astype(doi.dtype), doi, preferred_element_type=F32
            )
            dp = jnp.einsum("BSJQK,BTJK->BSJQT", doi, vj, preferred_element_type=F32)
            ds = (p * (dp - deltai[..., None]) * scale).astype(q.dtype)
            dq = dq + jnp.einsum("BSJQT,BTJK->BSJQK", ds, kj, preferred_element_type=F32)
            dkj = jnp.einsum("BSJQT,BSJQK->BTJK", ds, qi, preferred_element_type=F32)
            return dq, (dkj, dvj)

        dq, (dki, dvi) = lax.scan(key_block, jnp.zeros(qi.shape, F32), (kb, vb, k_starts))
        return (dk + dki, dv + dvi), dq

    xs = (*(_blocks(x, bq) for x in (q, do, lse, delta)), _starts(q.shape[1] // bq, bq, q_pos))
    zeros = (jnp.zeros(kb.shape, F32), jnp.zeros(vb.shape, F32))
    (dk, dv), dq = lax.scan(query_block, zeros, xs)
    grads = (_unblock(dq), _unblock(dk), _unblock(dv))
    return (*(d.astype(x.dtype) for d, x in zip(grads, (q, k, v), strict=True)), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)

"""Greedy generation with a KV cache: prefill, then one decode step per new token.

`decoder(cfg, graphdef, placement)` jits both phases once, for one device (`placement=None`) or
laid out by a strategy: the cache is split as the strategy splits attention (its `layers` axis
as well, so a pipeline keeps each stage's layers' cache on that stage) and donated, so a step
updates it in place. The decode position is an argument, not a constant, so every step reuses
one compiled program.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmoe.axes import Axis
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model import Cache, cache_logical, init_cache
from jaxmoe.placement import Placement
from jaxmoe.platform import compile_program
from jaxmoe.sharding import Strategy

LAST_LOGITS = (Axis.LM_BATCH, Axis.VOCAB)  # [B, V]


def prefill_fn(graphdef: nnx.GraphDef) -> Callable:
    """(params, prompt [B, S], cache) -> (last logits [B, V], cache with positions 0..S-1,
    expert choices dropped over capacity)."""

    def fn(state, prompt, cache):
        return nnx.merge(graphdef, state).extend(prompt, cache, 0)

    return fn


def decode_fn(graphdef: nnx.GraphDef) -> Callable:
    """(params, tokens [B, 1], cache, pos) -> (logits [B, V], cache with position pos, expert
    choices dropped over capacity)."""

    def fn(state, tokens, cache, pos):
        return nnx.merge(graphdef, state).extend(tokens, cache, pos)

    return fn


@dataclasses.dataclass(frozen=True)
class Decoder:
    """The two jitted phases of greedy generation and the empty cache they fill."""

    cfg: ModelConfig
    prefill: Callable  # (params, prompt [B, S], cache) -> (logits [B, V], cache, dropped)
    step: Callable  # (params, tokens [B, 1], cache, pos) -> (logits [B, V], cache, dropped)
    new_cache: Callable[[], Cache]
    token_sharding: jax.sharding.Sharding | None = None

    def put_tokens(self, tokens) -> jax.Array:
        tokens = jnp.asarray(tokens, jnp.int32)
        return (
            tokens if self.token_sharding is None else jax.device_put(tokens, self.token_sharding)
        )


def decoder(cfg: ModelConfig, graphdef: nnx.GraphDef, placement: Placement | None = None):
    prefill, step = prefill_fn(graphdef), decode_fn(graphdef)
    if placement is None:
        return Decoder(
            cfg,
            jax.jit(prefill, donate_argnums=2),
            jax.jit(step, donate_argnums=2),
            lambda: init_cache(cfg, cfg.batch),
        )
    mesh, strategy = placement.mesh, placement.strategy
    cache = cache_sharding(placement)
    tokens, logits = placement.token_sharding, NamedSharding(mesh, strategy.spec(LAST_LOGITS))
    params = placement.shardings
    replicated = NamedSharding(mesh, jax.sharding.PartitionSpec())
    return Decoder(
        cfg,
        placement.jit(
            prefill,
            in_shardings=(params, tokens, cache),
            out_shardings=(logits, cache, replicated),
            donate_argnums=2,
        ),
        placement.jit(
            step,
            in_shardings=(params, tokens, cache, replicated),
            out_shardings=(logits, cache, replicated),
            donate_argnums=2,
        ),
        jax.jit(lambda: layout_cache(cfg, strategy), out_shardings=cache),
        tokens,
    )


def layout_cache(cfg: ModelConfig, strategy: Strategy) -> Cache:
    """The empty cache of cfg's batch under `strategy` (which sets how many key-value heads it
    holds: one per device where the strategy splits query heads more finely)."""
    return init_cache(cfg, cfg.batch, strategy.split_factor(Axis.HEADS))


def new_cache(placement: Placement) -> Cache:
    """The placement's empty cache, abstract (shapes and dtypes, nothing allocated)."""
    return jax.eval_shape(lambda: layout_cache(placement.cfg, placement.strategy))


def cache_sharding(placement: Placement) -> Cache:
    """The sharding of every cache array under the placement's strategy ([N, B, T, J, K] or a
    latent [N, B, T, R]), as a Cache of NamedShardings."""
    cache = new_cache(placement)
    return jax.tree.map(
        lambda axes, a: NamedSharding(
            placement.mesh, placement.strategy.spec(tuple(axes), shape=a.shape)
        ),
        cache_logical(cache),
        cache,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


@dataclasses.dataclass(frozen=True)
class Generation:
    """Greedy tokens [B, steps] and the expert choices that found their expert full (prefill's
    and every decode step's, over all MoE layers; such a choice keeps only its residual)."""

    tokens: np.ndarray
    dropped_choices: int


def check_prompt(cfg: ModelConfig, prompt, steps: int) -> int:
    """One-line ConfigError unless `prompt` [B, S] and `steps` new tokens fit cfg's batch and
    sequence length; returns the prompt's length."""
    batch, length = np.shape(prompt)
    if batch != cfg.batch:
        raise ConfigError(f"prompt batch {batch} != batch={cfg.batch}; set batch={batch}")
    if length + steps > cfg.seq_len:
        raise ConfigError(
            f"a {length}-token prompt and {steps} new tokens exceed seq_len={cfg.seq_len}; "
            f"set seq_len to at least {length + steps} or generate fewer tokens"
        )
    return length


def generate(dec: Decoder, params, prompt, steps: int) -> Generation:
    """Greedy continuation of `prompt` [B, S]: the next `steps` tokens."""
    length = check_prompt(dec.cfg, prompt, steps)
    logits, cache, dropped = dec.prefill(params, dec.put_tokens(prompt), dec.new_cache())
    out, drops = [], [dropped]
    for i in range(steps):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)[:, None]  # [B, 1]
        out.append(token)
        if i + 1 < steps:
            pos = jnp.asarray(length + i, jnp.int32)
            logits, cache, dropped = dec.step(params, dec.put_tokens(token), cache, pos)
            drops.append(dropped)
    tokens = np.asarray(jnp.concatenate(out, axis=1))
    return Generation(tokens, round(sum(float(d) for d in drops)))


def compile_phases(
    dec: Decoder, params, prompt_len: int, *, read_only: bool = False
) -> dict[str, jax.stages.Compiled]:
    """Both phases compiled for `params` (arrays or abstract `ShapeDtypeStruct`s, so a full-size
    model compiles with no weights allocated): prefill of a `prompt_len`-token prompt, and one
    decode step, which attends over the whole cache (seq_len positions) wherever it writes.
    `read_only`: the programs are only read, never run (see `platform.compile_program`)."""
    cfg = dec.cfg
    cache = jax.eval_shape(dec.new_cache)
    tokens = dec.token_sharding

    def ids(length):
        return jax.ShapeDtypeStruct((cfg.batch, length), jnp.int32, sharding=tokens)

    position = jax.ShapeDtypeStruct((), jnp.int32)
    return {
        "prefill": compile_program(
            dec.prefill.lower(params, ids(prompt_len), cache), cfg.dtype, read_only=read_only
        ),
        "decode": compile_program(
            dec.step.lower(params, ids(1), cache, position), cfg.dtype, read_only=read_only
        ),
    }

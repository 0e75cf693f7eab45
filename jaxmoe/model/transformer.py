"""The decoder-only transformer: embeddings, a scanned stack of pre-norm blocks, the LM head.

Blocks are stacked on a leading `layers` axis (created with `nnx.vmap`) and run by `lax.scan`,
or by the strategy's own layer runner (a pipeline schedule).
One block holds `moe_every - 1` dense layers followed by one MoE layer (a dense model: one dense
layer), so a model whose layers are all MoE, all dense or interleaved scans one uniform block.
The first `first_dense` layers (DeepSeek's dense layers before its MoE ones) are a stack of
their own, scanned before the blocks and never split over a pipeline's stages.

Inference: `extend(tokens, cache, pos)` runs new tokens at positions pos.. against a KV cache
(`init_cache`) and returns the last position's logits: prefill is `extend(prompt, cache, 0)`,
a decode step `extend(next_token[:, None], cache, pos)`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.model.attention import KV, RESIDUAL, Attention, cache_heads
from jaxmoe.model.latent import Latent, LatentAttention
from jaxmoe.model.mlp import Mlp
from jaxmoe.model.moe import Moe, dropped_choices, router_metrics
from jaxmoe.model.params import RMSNorm, weight
from jaxmoe.model.xent import PADDING, cross_entropy
from jaxmoe.partial_sums import lookup
from jaxmoe.sharding import SENT, constrain, run_layers, scan_layers


def attention(cfg: ModelConfig, rngs: nnx.Rngs) -> Attention | LatentAttention:
    return LatentAttention(cfg, rngs) if cfg.is_mla else Attention(cfg, rngs)


class DenseLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.norm_attn, self.attn = RMSNorm(cfg), attention(cfg, rngs)
        self.norm_mlp, self.mlp = RMSNorm(cfg), Mlp(cfg, rngs)

    def __call__(self, x: jax.Array, kv, pos, window=0) -> tuple[jax.Array, dict, KV | None]:
        y, kv = self.attn(self.norm_attn(x), kv, pos, window)
        x = x + y
        return constrain(x + self.mlp(self.norm_mlp(x)), RESIDUAL), {}, kv


class MoeLayer(nnx.Module):
    """Attention then experts. `attend` is the first half alone (a layout that runs the experts
    elsewhere calls it, then `moe` on the normalised states it returns)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.norm_attn, self.attn = RMSNorm(cfg), attention(cfg, rngs)
        self.norm_moe, self.moe = RMSNorm(cfg), Moe(cfg, rngs)

    def attend(self, x: jax.Array, kv, pos, window=0) -> tuple[jax.Array, jax.Array, KV | None]:
        """x -> (x after attention, the experts' normalised input, the cache)."""
        y, kv = self.attn(self.norm_attn(x), kv, pos, window)
        x = x + y
        return x, self.norm_moe(x), kv


class Block(nnx.Module):
    """One scan step: `moe_every - 1` dense layers then one MoE layer, or one dense layer."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        n_dense = cfg.layers_per_block - 1 if cfg.is_moe else 1
        self.dense = nnx.List([DenseLayer(cfg, rngs) for _ in range(n_dense)])
        self.moe = MoeLayer(cfg, rngs) if cfg.is_moe else None

    def __call__(
        self,
        x: jax.Array,
        dropout_key: jax.Array | None,
        cache: tuple[KV, ...] | None,
        pos,
        first_row,
        windows: jax.Array | None = None,
    ) -> tuple[jax.Array, dict, tuple[KV, ...] | None]:
        """`cache`: one KV per layer of the block, in order (None: no cache); x holds rows
        first_row.. of the batch; `windows` [layers of the block]: each one's sliding window."""
        x, h, cache = self.attend(x, cache, pos, windows)
        if h is None:
            return x, {}, cache
        y, stats = self.moe.moe(h, dropout_key, first_row)
        return constrain(x + y, RESIDUAL), stats, cache

    def attend(
        self, x: jax.Array, cache: tuple[KV, ...] | None, pos, windows: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array | None, tuple[KV, ...] | None]:
        """Everything of the block but the experts: its dense layers and the MoE layer's attention.
        Returns (x, the experts' normalised input [B, S, D] or None in a dense block, cache)."""
        n_layers = len(self.dense) + (self.moe is not None)
        kvs = (None,) * n_layers if cache is None else cache
        window = [0] * n_layers if windows is None else list(windows)
        new, h = [], None
        for layer, kv, w in zip(self.dense, kvs, window, strict=False):
            x, _, kv = layer(x, kv, pos, w)
            new.append(kv)
        if self.moe is not None:
            x, h, kv = self.moe.attend(x, kvs[-1], pos, window[-1])
            new.append(kv)
        return x, h, None if cache is None else tuple(new)


class Cache(NamedTuple):
    """The decoding cache: `prefix` one entry stacked over the first dense layers (None without
    them), `blocks` one per layer of a block, each stacked over the blocks. An entry is a KV
    (keys and values [N, B, T, J, K]) or, for latent attention, a Latent ([N, B, T, R] and
    [N, B, T, K_rope]), in the compute dtype."""

    prefix: KV | Latent | None
    blocks: tuple[KV | Latent, ...]


def init_cache(cfg: ModelConfig, batch: int, heads_split: int = 1) -> Cache:
    """An empty cache for `batch` sequences of up to `seq_len` tokens, for a layout that splits
    query heads over `heads_split` devices (it sets how many key-value heads the cache holds)."""

    def entry(n: int) -> KV | Latent:
        rows = (n, batch, cfg.seq_len)
        if cfg.is_mla:
            shapes = ((*rows, cfg.kv_lora_rank), (*rows, cfg.rope_head_dim))
            return Latent(*(jnp.zeros(s, cfg.compute_dtype) for s in shapes))
        shape = (*rows, cache_heads(cfg, heads_split), cfg.head_dim)
        return KV(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))

    prefix = entry(cfg.first_dense) if cfg.first_dense else None
    return Cache(prefix, tuple(entry(cfg.n_blocks) for _ in range(cfg.layers_per_block)))


CACHE = (Axis.LAYERS, Axis.ATTN_BATCH, Axis.SEQ, Axis.KV_HEADS, None)  # [N, B, T, (J,) width]


def cache_axes(array, stacked: Axis | None = Axis.LAYERS) -> tuple[Axis | None, ...]:
    """The logical axes of a cache array [N, B, T, J, K] or a latent one [N, B, T, R]."""
    return (stacked, *CACHE[1 : array.ndim - 1], None)


def cache_logical(cache: Cache) -> Cache:
    """The logical axes of every cache array, as PartitionSpecs of `Axis` names."""
    return Cache(
        jax.tree.map(lambda a: PartitionSpec(*cache_axes(a, None)), cache.prefix),
        jax.tree.map(lambda a: PartitionSpec(*cache_axes(a)), cache.blocks),
    )


LOGITS = (Axis.LM_BATCH, Axis.SEQ, Axis.VOCAB)  # [B, S, V]


def layer_windows(cfg: ModelConfig) -> tuple[jax.Array | None, jax.Array | None]:
    """Each layer's sliding window (0: none), as int32 [first_dense] and [blocks, layers per
    block]; (None, None) when no layer slides."""
    if not cfg.sliding_window:
        return None, None
    every = jnp.asarray([cfg.window(i) for i in range(cfg.n_layers)], jnp.int32)
    return every[: cfg.first_dense], every[cfg.first_dense :].reshape(cfg.n_blocks, -1)


# what "dots" holds: matrix products' results and what a collective sent (recomputing those
# would send them again)
HELD = {
    "dot_general",
    "psum",
    "psum_invariant",
    "all_gather",
    "all_to_all",
    "reduce_scatter",
    "ppermute",
}
POLICIES = {
    "dots": lambda prim, *_, **params: prim.name in HELD or params.get("name") == SENT,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def recomputed(cfg: ModelConfig):
    """A block's step, its backward pass recomputing what `cfg.recompute` says (a forward pass
    without gradients runs it as it is)."""

    def wrap(step):
        if cfg.recompute == "none":
            return step
        return jax.checkpoint(step, policy=POLICIES[cfg.recompute])

    return wrap


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        table = (cfg.padded_vocab, cfg.d_model)
        std = cfg.init_std if cfg.tie_embeddings else 1.0  # a tied table also makes the logits
        self.embed = weight(rngs, cfg, table, (Axis.VOCAB, Axis.EMBED), std)
        if cfg.positions == "learned":
            rows = (cfg.position_rows, cfg.d_model)
            self.pos_embed = weight(rngs, cfg, rows, (None, Axis.EMBED), 1.0)

        def stack(n: int, stacked: Axis | None, make):
            @nnx.split_rngs(splits=n)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: stacked})
            def build(rngs: nnx.Rngs):
                return make(cfg, rngs)

            return build(rngs)

        self.first = stack(cfg.first_dense, None, DenseLayer) if cfg.first_dense else None
        self.blocks = stack(cfg.n_blocks, Axis.LAYERS, Block)
        self.final_norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            head = (cfg.d_model, cfg.padded_vocab)
            self.unembed = weight(rngs, cfg, head, (Axis.EMBED, Axis.VOCAB), cfg.init_std)

    def __call__(
        self, tokens: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        """tokens: [B, S] int -> (logits [B, S, V] float32, routing sums per MoE layer)."""
        x, stats = self.features(tokens, dropout_key)
        return self.logits(x), stats

    def features(
        self, tokens: jax.Array, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, dict]:
        """tokens: [B, S] int -> (the LM head's normalised inputs [B, S, D], routing sums)."""
        x, stats, _ = self._layers(self.embed_tokens(tokens, 0), dropout_key, None, 0)
        with jax.named_scope("lm_head"):
            return self.final_norm(x), stats

    def extend(
        self, tokens: jax.Array, cache: Cache, pos: jax.Array | int
    ) -> tuple[jax.Array, Cache, jax.Array]:
        """tokens [B, S] at positions pos.. -> (logits of the last one [B, V], updated cache,
        expert choices dropped over capacity on the way)."""
        x, stats, cache = self._layers(
            self.embed_tokens(tokens, pos), None, cache, pos, last_only=True
        )
        return self.logits(self.final_norm(x[:, -1:]))[:, 0], cache, dropped_choices(stats)

    def embed_tokens(self, tokens: jax.Array, pos: jax.Array | int) -> jax.Array:
        """tokens [B, S] at positions pos.. -> the first block's input [B, S, D]."""
        with jax.named_scope("embed"):
            dt = self.cfg.compute_dtype
            x = lookup(self.embed[...], (Axis.VOCAB, Axis.EMBED), tokens, RESIDUAL, dt)
            if self.cfg.positions == "learned":
                rows = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], pos, tokens.shape[1])
                x = x + rows.astype(dt)
            return constrain(x, RESIDUAL)  # [B, S, D]

    def _layers(self, x, dropout_key, cache: Cache | None, pos, *, last_only=False):
        cfg = self.cfg
        first_windows, windows = layer_windows(cfg)
        if self.first is not None:
            x, cache = self._first_layers(x, cache, pos, first_windows)
        graphdef, block_state = nnx.split(self.blocks)
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.n_blocks)

        @recomputed(cfg)
        def step(x, per_block, block_cache, first_row):
            state, key, window = per_block
            return nnx.merge(graphdef, state)(x, key, block_cache, pos, first_row, window)

        per_block = (block_state, keys, windows)
        blocks = None if cache is None else cache.blocks
        # stats: [L_moe, ...]
        x, stats, blocks = run_layers(step, x, per_block, blocks, cfg, last_only=last_only)
        return x, stats, None if cache is None else cache._replace(blocks=blocks)

    def _first_layers(self, x, cache: Cache | None, pos, windows):
        """The dense layers before the blocks: a plain scan on every device (never pipelined)."""
        graphdef, state = nnx.split(self.first)

        @recomputed(self.cfg)
        def step(x, per_layer, layer_cache, _):
            state, window = per_layer
            layer = nnx.merge(graphdef, state)
            x, _, layer_cache = layer(x, layer_cache, pos, 0 if window is None else window)
            return x, (), layer_cache

        prefix = None if cache is None else cache.prefix
        x, _, prefix = scan_layers(step, x, (state, windows), prefix)
        return x, None if cache is None else cache._replace(prefix=prefix)

    @property
    def head(self) -> jax.Array:
        """The LM head's table [D, V]: its own, or the token table's transpose when tied."""
        return self.embed[...].T if self.cfg.tie_embeddings else self.unembed[...]

    def logits(self, x: jax.Array) -> jax.Array:
        """x: the normalised features [B, S, D] -> logits [B, S, V] float32."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        with jax.named_scope("lm_head"):
            logits = jnp.einsum(
                "BSD,DV->BSV", x, self.head.astype(dt), preferred_element_type=jnp.float32
            )
            vocab_ids = jnp.arange(cfg.padded_vocab)
            logits = jnp.where(vocab_ids < cfg.vocab_size, logits, PADDING)
            return constrain(logits, LOGITS)

    def token_loss(self, x: jax.Array, targets: jax.Array) -> jax.Array:
        """x: the normalised features [B, S, D], targets [B, S] -> mean next-token cross-entropy
        (the fused, chunked LM head: no [B, S, V] logits are held)."""
        cfg = self.cfg
        with jax.named_scope("lm_head"):
            unembed = self.head.astype(cfg.compute_dtype)
            return cross_entropy(x, unembed, targets, cfg.vocab_size, cfg.loss_chunk_tokens)


def loss_fn(
    model: Transformer,
    inputs: jax.Array,
    targets: jax.Array,
    dropout_key: jax.Array | None = None,
) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy plus the weighted router losses; returns (loss, metrics)."""
    cfg = model.cfg
    x, stats = model.features(inputs, dropout_key)
    ce = model.token_loss(x, targets)
    metrics = {"ce_loss": ce}
    loss = metrics["ce_loss"]
    if cfg.is_moe:
        router = router_losses(cfg, stats)
        metrics |= router
        loss = loss + router["router_loss"]
    metrics["loss"] = loss
    return loss, metrics


def router_losses(cfg: ModelConfig, stats: dict) -> dict:
    """Each router metric averaged over the MoE layers (`stats`: routing sums [L_moe, ...]),
    and `router_loss`, their weighted sum that joins the training loss."""
    metrics = jax.tree.map(lambda m: jnp.mean(m, axis=0), router_metrics(stats))
    metrics["router_loss"] = (
        cfg.router_aux_coef * metrics["load_balance_loss"]
        + cfg.router_z_coef * metrics["router_z_loss"]
    )
    return metrics

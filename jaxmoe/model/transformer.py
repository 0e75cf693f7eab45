"""The decoder-only transformer: embeddings, a scanned stack of pre-norm blocks, the LM head.

Blocks are stacked on a leading `layers` axis (created with `nnx.vmap`) and run by `lax.scan`,
or by the strategy's own layer runner (a pipeline schedule).
One block holds `moe_every - 1` dense layers followed by one MoE layer (a dense model: one dense
layer), so a model whose layers are all MoE, all dense or interleaved scans one uniform block.

Inference: `extend(tokens, cache, pos)` runs new tokens at positions pos.. against a KV cache
(`init_cache`) and returns the last position's logits: prefill is `extend(prompt, cache, 0)`,
a decode step `extend(next_token[:, None], cache, pos)`.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.model.attention import CORE, KV, RESIDUAL, Attention
from jaxmoe.model.mlp import Mlp
from jaxmoe.model.moe import Moe, router_metrics
from jaxmoe.model.params import RMSNorm, weight
from jaxmoe.model.xent import PADDING, cross_entropy
from jaxmoe.sharding import constrain, run_layers


class DenseLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.norm_attn, self.attn = RMSNorm(cfg), Attention(cfg, rngs)
        self.norm_mlp, self.mlp = RMSNorm(cfg), Mlp(cfg, rngs)

    def __call__(self, x: jax.Array, kv: KV | None, pos) -> tuple[jax.Array, dict, KV | None]:
        y, kv = self.attn(self.norm_attn(x), kv, pos)
        x = x + y
        return constrain(x + self.mlp(self.norm_mlp(x)), RESIDUAL), {}, kv


class MoeLayer(nnx.Module):
    """Attention then experts. `attend` is the first half alone (a layout that runs the experts
    elsewhere calls it, then `moe` on the normalised states it returns)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.norm_attn, self.attn = RMSNorm(cfg), Attention(cfg, rngs)
        self.norm_moe, self.moe = RMSNorm(cfg), Moe(cfg, rngs)

    def attend(self, x: jax.Array, kv: KV | None, pos) -> tuple[jax.Array, jax.Array, KV | None]:
        """x -> (x after attention, the experts' normalised input, the cache)."""
        y, kv = self.attn(self.norm_attn(x), kv, pos)
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
    ) -> tuple[jax.Array, dict, tuple[KV, ...] | None]:
        """`cache`: one KV per layer of the block, in order (None: no cache); x holds rows
        first_row.. of the batch."""
        x, h, cache = self.attend(x, cache, pos)
        if h is None:
            return x, {}, cache
        y, stats = self.moe.moe(h, dropout_key, first_row)
        return constrain(x + y, RESIDUAL), stats, cache

    def attend(
        self, x: jax.Array, cache: tuple[KV, ...] | None, pos
    ) -> tuple[jax.Array, jax.Array | None, tuple[KV, ...] | None]:
        """Everything of the block but the experts: its dense layers and the MoE layer's attention.
        Returns (x, the experts' normalised input [B, S, D] or None in a dense block, cache)."""
        n_layers = len(self.dense) + (self.moe is not None)
        kvs = (None,) * n_layers if cache is None else cache
        new, h = [], None
        for layer, kv in zip(self.dense, kvs, strict=False):
            x, _, kv = layer(x, kv, pos)
            new.append(kv)
        if self.moe is not None:
            x, h, kv = self.moe.attend(x, kvs[-1], pos)
            new.append(kv)
        return x, h, None if cache is None else tuple(new)


def init_cache(cfg: ModelConfig, batch: int) -> tuple[KV, ...]:
    """An empty KV cache for `batch` sequences of up to `seq_len` tokens: per layer of a block,
    keys and values stacked over the blocks, [N, B, T, H, K] in the compute dtype."""
    shape = (cfg.n_blocks, batch, cfg.seq_len, cfg.n_heads, cfg.head_dim)
    return tuple(
        KV(jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype))
        for _ in range(cfg.layers_per_block)
    )


CACHE = (Axis.LAYERS, *CORE)  # the logical axes of every cache array
LOGITS = (Axis.LM_BATCH, Axis.SEQ, Axis.VOCAB)  # [B, S, V]


class Transformer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = weight(
            rngs, cfg, (cfg.padded_vocab, cfg.d_model), (Axis.VOCAB, Axis.EMBED), 1.0
        )
        self.pos_embed = weight(rngs, cfg, (cfg.seq_len, cfg.d_model), (None, Axis.EMBED), 1.0)

        @nnx.split_rngs(splits=cfg.n_blocks)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: Axis.LAYERS})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = RMSNorm(cfg)
        self.unembed = weight(
            rngs, cfg, (cfg.d_model, cfg.padded_vocab), (Axis.EMBED, Axis.VOCAB), cfg.init_std
        )

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
        self, tokens: jax.Array, cache: tuple[KV, ...], pos: jax.Array | int
    ) -> tuple[jax.Array, tuple[KV, ...]]:
        """tokens [B, S] at positions pos.. -> (logits of the last one [B, V], updated cache)."""
        x, _, cache = self._layers(self.embed_tokens(tokens, pos), None, cache, pos)
        return self.logits(self.final_norm(x[:, -1:]))[:, 0], cache

    def embed_tokens(self, tokens: jax.Array, pos: jax.Array | int) -> jax.Array:
        """tokens [B, S] at positions pos.. -> the first block's input [B, S, D]."""
        with jax.named_scope("embed"):
            positions = jax.lax.dynamic_slice_in_dim(self.pos_embed[...], pos, tokens.shape[1])
            x = jnp.take(self.embed[...], tokens, axis=0) + positions
            return constrain(x.astype(self.cfg.compute_dtype), RESIDUAL)  # [B, S, D]

    def _layers(self, x, dropout_key, cache, pos):
        cfg = self.cfg
        graphdef, block_state = nnx.split(self.blocks)
        keys = None if dropout_key is None else jax.random.split(dropout_key, cfg.n_blocks)

        def step(x, per_block, block_cache, first_row):
            state, key = per_block
            return nnx.merge(graphdef, state)(x, key, block_cache, pos, first_row)

        return run_layers(step, x, (block_state, keys), cache, cfg)  # stats: [L_moe, ...] each

    def logits(self, x: jax.Array) -> jax.Array:
        """x: the normalised features [B, S, D] -> logits [B, S, V] float32."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        with jax.named_scope("lm_head"):
            logits = jnp.einsum(
                "BSD,DV->BSV", x, self.unembed[...].astype(dt), preferred_element_type=jnp.float32
            )
            vocab_ids = jnp.arange(cfg.padded_vocab)
            logits = jnp.where(vocab_ids < cfg.vocab_size, logits, PADDING)
            return constrain(logits, LOGITS)

    def token_loss(self, x: jax.Array, targets: jax.Array) -> jax.Array:
        """x: the normalised features [B, S, D], targets [B, S] -> mean next-token cross-entropy
        (the fused, chunked LM head: no [B, S, V] logits are held)."""
        cfg = self.cfg
        with jax.named_scope("lm_head"):
            unembed = self.unembed[...].astype(cfg.compute_dtype)
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

"""The model's parameters cut for two meshes: what lives on the attention side, what on the experts.

`SepParams` holds, per block of layers, the attention side (the block's dense layers and its MoE
layer's norms and attention, heads padded to the attention mesh) and the expert side (router and
experts), plus the `outer` parameters (embeddings, final norm, LM head), which the attention
mesh runs. `split` cuts a model's state into these pieces, `join` puts pieces (parameters or
gradients) back into the model's own state, unpadded, on the host.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import numpy as np
from flax import nnx

from jaxmoe.config import ModelConfig
from jaxmoe.model import Transformer
from jaxmoe.model.moe import Moe
from jaxmoe.model.transformer import Block
from jaxmoe.separation.layout import Separation

OUTER = ("embed", "pos_embed", "final_norm", "unembed")
HEAD_AXIS = {"wq": 1, "wk": 1, "wv": 1, "wo": 0}  # where each attention weight keeps its heads


class SepParams(NamedTuple):
    outer: nnx.State  # embeddings, final norm, LM head (attention mesh)
    attention: tuple[nnx.State, ...]  # per block: dense layers, norms, attention (padded heads)
    experts: tuple[nnx.State, ...]  # per block: router and experts (expert mesh)

    @property
    def sides(self) -> tuple:
        """(the attention mesh's pieces (outer, attention), the expert mesh's)."""
        return (self.outer, self.attention), self.experts

    @classmethod
    def of_sides(cls, attention_side, experts) -> SepParams:
        outer, attention = attention_side
        return cls(outer, attention, experts)


@dataclasses.dataclass(frozen=True)
class Parts:
    """Graph definitions and abstract states (shapes, logical axes) of the three pieces."""

    outer: tuple[nnx.GraphDef, nnx.State]
    attention: tuple[nnx.GraphDef, nnx.State]  # one block's attention side
    experts: tuple[nnx.GraphDef, nnx.State]  # one block's Moe


def parts(cfg: ModelConfig, sep: Separation) -> Parts:
    model = nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0)))
    model.blocks = None
    block = nnx.eval_shape(lambda: Block(sep.attention_cfg(cfg), nnx.Rngs(0)))
    block.moe.moe = None
    experts = nnx.eval_shape(lambda: Moe(cfg, nnx.Rngs(0)))
    return Parts(nnx.split(model), nnx.split(block), nnx.split(experts))


def filled(abstract: nnx.State, pure: dict) -> nnx.State:
    state = jax.tree.map(lambda a: a, abstract)  # a fresh copy to fill
    nnx.replace_by_pure_dict(state, pure)
    return state


def _map_heads(tree: dict, fn, in_attention: bool = False) -> dict:
    """A block's pure dict with fn(array, head axis) applied to every attention weight."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _map_heads(value, fn, key == "attn")
        else:
            out[key] = fn(value, HEAD_AXIS[key]) if in_attention else value
    return out


def split(state: nnx.State, cfg: ModelConfig, sep: Separation, pieces: Parts) -> SepParams:
    """The model's state cut into the separated pieces (on the host, heads padded)."""
    pure = jax.tree.map(np.asarray, nnx.to_pure_dict(state))
    slots = sep.head_slots(cfg)

    def pad(w, axis):
        taken = np.take(w, np.maximum(slots, 0), axis=axis)
        shape = [1] * w.ndim
        shape[axis] = len(slots)
        return np.where((slots >= 0).reshape(shape), taken, 0).astype(w.dtype)

    attention, experts = [], []
    for i in range(cfg.n_blocks):
        block = jax.tree.map(lambda a, i=i: a[i], pure["blocks"])
        experts.append(filled(pieces.experts[1], block["moe"].pop("moe")))
        attention.append(filled(pieces.attention[1], _map_heads(block, pad)))
    outer = filled(pieces.outer[1], {k: pure[k] for k in OUTER})
    return SepParams(outer, tuple(attention), tuple(experts))


def join(params: SepParams, cfg: ModelConfig, sep: Separation, abstract: nnx.State) -> nnx.State:
    """Separated pieces (parameters or their gradients) back as the model's state: heads
    unpadded, blocks stacked, every array on the host. `abstract`: the model's abstract state."""
    real = np.nonzero(sep.head_slots(cfg) >= 0)[0]
    host = jax.tree.map(np.asarray, params)
    blocks = []
    for attention, experts in zip(host.attention, host.experts, strict=True):
        block = _map_heads(nnx.to_pure_dict(attention), lambda w, axis: np.take(w, real, axis))
        block["moe"]["moe"] = nnx.to_pure_dict(experts)
        blocks.append(block)
    pure = nnx.to_pure_dict(host.outer) | {"blocks": jax.tree.map(lambda *a: np.stack(a), *blocks)}
    return filled(abstract, pure)

"""The transformer (dense or MoE per layer), its loss and its KV cache."""

from jaxmoe.model.attention import KV
from jaxmoe.model.moe import router_metrics
from jaxmoe.model.transformer import (
    Cache,
    Transformer,
    cache_logical,
    init_cache,
    loss_fn,
    router_losses,
)

__all__ = [
    "KV",
    "Cache",
    "Transformer",
    "cache_logical",
    "init_cache",
    "loss_fn",
    "router_losses",
    "router_metrics",
]

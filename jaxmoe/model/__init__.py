"""The transformer (dense or MoE per layer), its loss and its KV cache."""

from jaxmoe.model.attention import KV
from jaxmoe.model.moe import router_metrics
from jaxmoe.model.transformer import CACHE, Transformer, init_cache, loss_fn, router_losses

__all__ = ["CACHE", "KV", "Transformer", "init_cache", "loss_fn", "router_losses", "router_metrics"]

"""The transformer (dense or MoE per layer) and its loss."""

from jaxmoe.model.moe import router_metrics
from jaxmoe.model.transformer import Transformer, loss_fn

__all__ = ["Transformer", "loss_fn", "router_metrics"]

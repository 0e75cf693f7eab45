"""The transformer (dense or MoE per layer) and its loss."""

from jaxmoe.model.transformer import ROUTER_STATS, Transformer, loss_fn

__all__ = ["ROUTER_STATS", "Transformer", "loss_fn"]

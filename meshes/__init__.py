"""Strategies: where the model runs. One module per strategy, registered here by name."""

from jaxmoe.config import ConfigError
from jaxmoe.sharding import Strategy
from meshes import ep16, heads_dims, tp8_pp2, tp16
from meshes.axes import MeshAxis

REGISTRY: dict[str, Strategy] = {
    s.name: s
    for s in (
        tp16.STRATEGY,
        ep16.STRATEGY,
        heads_dims.STRATEGY,
        tp8_pp2.STRATEGY,
        tp8_pp2.EXPERTS_TP,
    )
}


def get(name: str) -> Strategy:
    if name not in REGISTRY:
        raise ConfigError(f"unknown strategy {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


__all__ = ["REGISTRY", "MeshAxis", "get"]

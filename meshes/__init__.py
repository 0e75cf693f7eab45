"""Strategies: where the model runs. One module per strategy, registered here by name."""

from jaxmoe.config import ConfigError
from jaxmoe.sharding import Strategy
from meshes import ep16, heads_dims, single, tp8_pp2, tp16
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


ONE_DEVICE = single.STRATEGY  # the reference, outside the registry


def get(name: str) -> Strategy:
    """A registered strategy, or `one_device`."""
    if name == ONE_DEVICE.name:
        return ONE_DEVICE
    if name not in REGISTRY:
        raise ConfigError(
            f"unknown strategy {name!r}; choose from {', '.join(REGISTRY)} (or {ONE_DEVICE.name})"
        )
    return REGISTRY[name]


__all__ = ["ONE_DEVICE", "REGISTRY", "MeshAxis", "get"]

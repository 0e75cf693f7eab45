"""Strategies: where the model runs. One module per strategy, registered here by name."""

from jaxmoe.config import ConfigError
from jaxmoe.layout import Layout
from jaxmoe.separation import Separation
from jaxmoe.sharding import Strategy
from meshes import ep16, heads_dims, ma_separation, single, tp8_pp2, tp16
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

# layouts over two sub-meshes, joined by transfers (not one SPMD program)
SEPARATIONS: dict[str, Separation] = {ma_separation.NAME: ma_separation.separation()}
LAYOUTS: dict[str, Layout] = REGISTRY | SEPARATIONS

ONE_DEVICE = single.STRATEGY  # the reference, outside the registry
# what `plan` ranks by default: every layout, and ma_separation's other device splits
CANDIDATES = (*REGISTRY, *SEPARATIONS, "ma_separation:8+8", "ma_separation:14+2")


def get(name: str, transfer_bits: int = 0) -> Layout:
    """A registered strategy, `one_device`, or `ma_separation[:A+X[/R]]` (whose hidden states
    cross between its meshes as int8 with `transfer_bits=8`; other layouts move none)."""
    if name == ONE_DEVICE.name:
        return ONE_DEVICE
    if name.split(":")[0] == ma_separation.NAME:
        return ma_separation.parse(name).with_options(transfer_bits=transfer_bits)
    if name not in REGISTRY:
        raise ConfigError(
            f"unknown strategy {name!r}; choose from {', '.join(LAYOUTS)} "
            f"(or {ONE_DEVICE.name}, {ma_separation.NAME}:A+X)"
        )
    return REGISTRY[name]


__all__ = ["CANDIDATES", "LAYOUTS", "ONE_DEVICE", "REGISTRY", "SEPARATIONS", "MeshAxis", "get"]

"""Layouts: where the model runs. Any composition of parallelism axes by name (`dp2_ep8`,
`fsdp4_tp4`: meshes/compose.py), the papers' layouts by their names (aliases of compositions, over
16 devices), and ma_separation's two sub-meshes (`ma_separation:A+X/R`). A composition or a
paper's layout may name another device order after `@` (`heads_dims_4x4@dims-heads`)."""

import dataclasses

from jaxmoe.config import ConfigError
from jaxmoe.layout import Layout
from jaxmoe.separation import Separation
from jaxmoe.sharding import Strategy
from meshes import compose, ep16, heads_dims, ma_separation, single, tp8_pp2, tp16
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
# the compositions the papers name: a composition's name -> its registered layout
ALIASES = {"tp16": "tp16", "ep16": "ep16", "heads4_dims4": "heads_dims_4x4", "tp8_pp2": "tp8_pp2"}
# each registered layout's composition
COMPOSITIONS = {
    "tp16": compose.parse("tp16"),
    "ep16": compose.parse("ep16"),
    "heads_dims_4x4": compose.parse("heads4_dims4"),
    "tp8_pp2": tp8_pp2.COMPOSITION,
    "tp8_pp2:experts_tp": compose.parse("tp8_pp2"),
}


def _reordered(name: str, c: compose.Composition) -> str:
    """A registered layout's name with `c`'s device order (its own name in AXES's order)."""
    _, _, order = c.name.partition("@")
    return f"{name}@{order}" if order else name


def candidates(n_devices: int, per_node: int | None = None) -> list[str]:
    """What `plan` considers on `n_devices`: every composition of parallelism axes (the
    registered layouts of that count among them, by their names), each in the device orders
    that put different axes inside a node of `per_node` devices (`compose.orders`), and
    ma_separation's splits of the devices into attention and experts in the ratios 1:1, 3:1
    and 7:1 where they divide."""
    node = per_node or n_devices
    registered = []
    for name, layout in LAYOUTS.items():
        if layout.n_devices != n_devices:
            continue
        if name in COMPOSITIONS:
            registered += [_reordered(name, c) for c in compose.orders(COMPOSITIONS[name], node)]
        else:
            registered.append(name)
    composed = [
        o.name
        for c in compose.compositions(n_devices)
        if c.name not in ALIASES
        for o in compose.orders(c, node)
    ]
    splits = [
        f"{ma_separation.NAME}:{n_devices - x}+{x}"
        for x in sorted({n_devices // 2, n_devices // 4, n_devices // 8} - {0})
        if (n_devices - x) % x == 0
    ]
    separations = [ma_separation.parse(s).name for s in splits]  # named as their layouts are
    separations = [s for s in separations if s not in registered]
    return [*registered, *composed, *separations]


def get(name: str, transfer_bits: int = 0) -> Layout:
    """A layout by name: a registered one, `one_device`, a composition of parallelism axes
    (`dp2_ep8`; written in any order, and a composition that is a registered layout is that
    layout), or `ma_separation[:A+X[/R]]` (whose hidden states cross between its meshes as int8
    with `transfer_bits=8`; other layouts move none)."""
    if name == ONE_DEVICE.name:
        return ONE_DEVICE
    if name.split(":")[0] == ma_separation.NAME:
        return ma_separation.parse(name).with_options(transfer_bits=transfer_bits)
    if name in REGISTRY:
        return REGISTRY[name]
    base, _, order = name.partition("@")
    if base in COMPOSITIONS:  # a paper's layout in another device order
        c = compose.parse(f"{COMPOSITIONS[base].name}@{order}")
        c = dataclasses.replace(COMPOSITIONS[base], order=c.order)
        strategy = REGISTRY[base]
        return compose.compose(c, name=_reordered(base, c), description=strategy.description)
    if not compose.looks_composed(name):
        raise ConfigError(
            f"unknown strategy {name!r}; choose from {', '.join(LAYOUTS)} "
            f"(or {ONE_DEVICE.name}, {ma_separation.NAME}:A+X, or axes with sizes: "
            f"{compose.EXAMPLES})"
        )
    composition = compose.parse(name)
    if composition.name in ALIASES:
        return REGISTRY[ALIASES[composition.name]]
    alias = ALIASES.get(dataclasses.replace(composition, order=()).name)
    if alias is not None:  # written as axes: the paper's layout in that order
        return get(_reordered(alias, composition))
    return compose.compose(composition)


__all__ = ["LAYOUTS", "ONE_DEVICE", "REGISTRY", "SEPARATIONS", "MeshAxis", "candidates", "get"]

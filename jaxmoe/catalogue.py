"""Layouts and experiments by name, from the installed packages that provide them.

jaxmoe never imports the packages that define layouts (`meshes`) or the papers' experiments
(`experiments`): they declare themselves as entry points in their distribution's metadata
(pyproject.toml), in the groups `jaxmoe.layouts` and `jaxmoe.experiments`, and are loaded here on
first use. Any installed package can add its own the same way.

A layouts provider is a module with `LAYOUTS` (name -> layout), `candidates(n_devices,
per_node)` (the names `plan` considers on that many devices, in nodes of `per_node`) and
`get(name, transfer_bits=0)` (a layout by name, including parametrised names like
`ma_separation:8+8` or `dp2_ep8`; ConfigError for an unknown
one). An experiments provider is a
module with `EXPERIMENTS` (name -> `jaxmoe.experiment.Experiment`).
"""

from __future__ import annotations

import functools
import logging
from importlib.metadata import entry_points
from types import ModuleType

from jaxmoe import hf_config
from jaxmoe.config import PRESETS, ConfigError, ModelConfig, preset

log = logging.getLogger(__name__)

LAYOUTS_GROUP = "jaxmoe.layouts"
EXPERIMENTS_GROUP = "jaxmoe.experiments"


@functools.cache
def _providers(group: str) -> tuple[ModuleType, ...]:
    found = tuple(ep.load() for ep in entry_points(group=group))
    if not found:
        raise ConfigError(
            f"no package provides {group}; install jaxmoe with its layouts and papers "
            f'(pip install -e ".")'
        )
    return found


def layouts() -> dict:
    """Every registered layout by name."""
    return {name: s for p in _providers(LAYOUTS_GROUP) for name, s in p.LAYOUTS.items()}


def candidates(n_devices: int, per_node: int | None = None) -> list[str]:
    """The layout names `plan` considers on `n_devices` (nodes of `per_node`) by default."""
    return [name for p in _providers(LAYOUTS_GROUP) for name in p.candidates(n_devices, per_node)]


def layout(name: str, transfer_bits: int = 0):
    """A layout by name (one line naming the choices for an unknown one)."""
    providers = _providers(LAYOUTS_GROUP)
    for provider in providers[1:]:
        if name.split(":")[0] in {n.split(":")[0] for n in provider.LAYOUTS}:
            return provider.get(name, transfer_bits)
    return providers[0].get(name, transfer_bits)


def experiments() -> dict:
    """Every registered experiment (the papers') by name."""
    return {n: e for p in _providers(EXPERIMENTS_GROUP) for n, e in p.EXPERIMENTS.items()}


def experiment(name: str):
    found = experiments()
    if name not in found:
        raise ConfigError(f"unknown paper {name!r}; choose one of {', '.join(found)}")
    return found[name]


def config(name: str, scale: str = "tiny") -> ModelConfig:
    """A config by name: a preset, a paper's model at `scale` (`tiny`: the one that runs on a
    CPU; `full`: the paper's), a shipped model (`mixtral-8x7b`, or `mixtral-8x7b-tiny` of the
    same structure that runs on a CPU; `scale` does not apply), or a Hugging Face config.json by
    path. The fields a config.json has that the model leaves out are logged as warnings."""
    papers = experiments()
    if name in papers:
        return papers[name].config(scale)
    if name in PRESETS:
        return preset(name)
    if name in hf_config.shipped() or name.endswith(".json"):
        cfg, warnings = hf_config.load(name)
        for warning in warnings:
            log.warning("%s: %s", cfg.name, warning)
        return cfg
    choices = ", ".join([*sorted(PRESETS), *papers, *hf_config.shipped()])
    raise ConfigError(f"unknown config {name!r}; choose one of {choices}, or a config.json path")

"""Run one model under several strategies and read what each compiled program does.

For every strategy: the same parameters and tokens as the one-device reference, the largest
logits difference from it, the collectives XLA inserted (per layer and in all), the bytes each
device sends against the textbook volume of the layout, parameter bytes per device and the
compiled memory analysis. Returns data; printing is the CLI's business.
"""

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.analysis.collectives import Inventory, inventory
from jaxmoe.analysis.memory import memory_per_device
from jaxmoe.config import ModelConfig
from jaxmoe.placement import (
    Placement,
    forward,
    init_params,
    param_bytes_per_device,
    param_bytes_total,
    place,
)
from jaxmoe.sharding import Strategy


@dataclasses.dataclass(frozen=True)
class LayoutReport:
    strategy: str
    mesh: dict[str, int]
    max_abs_err: float  # max |logits - one-device logits|
    logits_scale: float  # max |one-device logits| over the real vocabulary
    inventory: Inventory  # every collective of one forward pass
    per_layer: dict[str, tuple[float, float]]  # kind -> (count, bytes sent per device) per layer
    textbook_bytes_per_layer: float
    bubble_fraction: float  # share of a pipeline schedule's iterations a stage idles (0: none)
    param_bytes_per_device: int
    param_bytes_total: int
    memory: dict[str, int]

    @property
    def bytes_per_layer(self) -> float:
        return sum(b for _, b in self.per_layer.values())

    @property
    def bytes_vs_textbook(self) -> float:
        if self.textbook_bytes_per_layer == 0:
            return 1.0 if self.bytes_per_layer == 0 else float("inf")
        return self.bytes_per_layer / self.textbook_bytes_per_layer

    def to_json(self, cfg: ModelConfig) -> dict:
        totals = self.inventory.by_kind()
        return {
            "mesh": self.mesh,
            "max_abs_err": self.max_abs_err,
            "logits_scale": self.logits_scale,
            "n_layers": cfg.n_layers,
            "n_moe_layers": cfg.n_moe_layers,
            "collectives": {k: {"count": t.count, "bytes": t.bytes} for k, t in totals.items()},
            "collectives_per_layer": {
                k: {"count": c, "bytes": b} for k, (c, b) in self.per_layer.items()
            },
            "bytes_per_layer": self.bytes_per_layer,
            "textbook_bytes_per_layer": self.textbook_bytes_per_layer,
            "bytes_vs_textbook": self.bytes_vs_textbook,
            "bubble_fraction": self.bubble_fraction,
            "param_bytes_per_device": self.param_bytes_per_device,
            "param_bytes_total": self.param_bytes_total,
            "memory_per_device": self.memory,
        }


def textbook_per_layer(cfg: ModelConfig, strategy: Strategy) -> float:
    """Mean over layers of the strategy's textbook bytes per device."""
    volume = strategy.textbook_bytes(cfg)
    return (cfg.n_dense_layers * volume["dense"] + cfg.n_moe_layers * volume["moe"]) / cfg.n_layers


def per_layer(inv: Inventory, n_layers: int) -> dict[str, tuple[float, float]]:
    """Collectives inside the layer loop, per layer: kind -> (count, bytes per device)."""
    return {
        k: (t.count / n_layers, t.bytes / n_layers) for k, t in inv.by_kind(in_loop=True).items()
    }


def random_tokens(cfg: ModelConfig, seed: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (cfg.batch, cfg.seq_len), 0, cfg.vocab_size)


def compile_forward(placement: Placement) -> jax.stages.Compiled:
    """The forward pass compiled for the placement's mesh from abstract inputs."""
    fn = placement.jit(
        forward(placement.graphdef), in_shardings=(placement.shardings, placement.token_sharding)
    )
    return fn.lower(placement.abstract_params(), placement.abstract_tokens()).compile()


def analyse(placement: Placement, compiled: jax.stages.Compiled) -> dict:
    """What the compiled program does: collectives, bytes against the textbook, memory."""
    cfg, strategy = placement.cfg, placement.strategy
    inv = inventory(compiled.as_text(), placement.strategy.axis_sizes)
    return {
        "strategy": strategy.name,
        "mesh": strategy.axis_sizes,
        "inventory": inv,
        "per_layer": per_layer(inv, cfg.n_layers),
        "textbook_bytes_per_layer": textbook_per_layer(cfg, strategy),
        "bubble_fraction": strategy.bubble_fraction(cfg),
        "param_bytes_per_device": param_bytes_per_device(compiled, placement.abstract),
        "param_bytes_total": param_bytes_total(placement.abstract),
        "memory": memory_per_device(compiled),
    }


def compare_strategies(
    cfg: ModelConfig,
    strategies: Sequence[Strategy],
    devices: Sequence[jax.Device],
    seed: int = 0,
) -> list[LayoutReport]:
    """Every strategy on the same parameters and tokens, against the one-device forward pass.

    All strategies are checked against the config (one-line ConfigError) before any compiling.
    """
    placements = [place(cfg, s, devices) for s in strategies]
    graphdef, state = init_params(cfg, seed)
    tokens = random_tokens(cfg, seed + 1)
    reference = np.asarray(jax.jit(forward(graphdef))(state, tokens))
    scale = float(np.max(np.abs(reference[..., : cfg.vocab_size])))
    reports = []
    for placement in placements:
        compiled = compile_forward(placement)
        logits = compiled(placement.put(state), jax.device_put(tokens, placement.token_sharding))
        err = float(jnp.max(jnp.abs(logits - reference)))
        reports.append(
            LayoutReport(max_abs_err=err, logits_scale=scale, **analyse(placement, compiled))
        )
    return reports


__all__ = ["LayoutReport", "analyse", "compare_strategies", "compile_forward"]

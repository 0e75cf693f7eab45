"""Run one model under several strategies and read what each compiled program does.

For every strategy: the same parameters and tokens as the one-device reference, the largest
logits difference from it (none where either gave NaN or infinite logits: those are counted,
and `check_finite` turns them into one error line), the collectives XLA inserted (per layer and
in all), the bytes each device sends against the textbook volume of the layout, parameter bytes
per device and the compiled memory analysis. Returns data; printing is the CLI's business.
"""

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jaxmoe.analysis.collectives import Inventory, inventory
from jaxmoe.analysis.memory import memory_per_device
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.placement import (
    Placement,
    abstract_model,
    forward,
    init_params,
    param_bytes_per_device,
    param_bytes_total,
    place,
)
from jaxmoe.separation import INTER_MESH, Separated, Separation, cost
from jaxmoe.sharding import Strategy


@dataclasses.dataclass(frozen=True)
class LayoutReport:
    strategy: str
    mesh: dict[str, int]
    max_abs_err: float | None  # max |logits - one-device logits|; None if either is not finite
    logits_scale: float | None  # max |one-device logits| over the real vocabulary; None: not finite
    inventory: Inventory  # every collective of one forward pass
    per_layer: dict[str, tuple[float, float]]  # kind -> (count, bytes sent per device) per layer
    textbook_bytes_per_layer: float
    bubble_fraction: float  # share of a pipeline schedule's iterations a stage idles (0: none)
    param_bytes_per_device: int
    param_bytes_total: int
    memory: dict[str, int]
    details: dict | None = None  # a layout's own figures (two sub-meshes: per mesh, transfers)
    nonfinite_logits: int = 0  # this layout's logits that are NaN or infinite
    reference_nonfinite_logits: int = 0  # the one-device forward pass's
    n_logits: int = 0  # logits per forward pass (B x S x padded vocabulary)

    @property
    def finite(self) -> bool:
        """Both this layout's logits and the one-device reference's are all finite numbers."""
        return self.nonfinite_logits == 0 and self.reference_nonfinite_logits == 0

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
            "finite": self.finite,
            "max_abs_err": self.max_abs_err,
            "logits_scale": self.logits_scale,
            "nonfinite_logits": self.nonfinite_logits,
            "reference_nonfinite_logits": self.reference_nonfinite_logits,
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
        } | (self.details or {})


def textbook_per_layer(cfg: ModelConfig, strategy: Strategy | Separation) -> float:
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
    strategies: Sequence[Strategy | Separation],
    devices: Sequence[jax.Device],
    seed: int = 0,
) -> list[LayoutReport]:
    """Every strategy on the same parameters and tokens, against the one-device forward pass.

    All strategies are checked against the config (one-line ConfigError) before any compiling.
    """
    layouts = [
        Separated(cfg, s, devices) if isinstance(s, Separation) else place(cfg, s, devices)
        for s in strategies
    ]
    graphdef, state = init_params(cfg, seed)
    tokens = random_tokens(cfg, seed + 1)
    reference = _gathered(jax.jit(forward(graphdef))(state, tokens))
    reference_bad = _nonfinite(reference)
    scale = None if reference_bad else float(np.max(np.abs(reference[..., : cfg.vocab_size])))
    reports = []
    for layout in layouts:
        if isinstance(layout, Separated):
            logits, analysis = separated_forward(layout, state, tokens)
        else:
            compiled = compile_forward(layout)
            logits = compiled(layout.put(state), jax.device_put(tokens, layout.token_sharding))
            analysis = analyse(layout, compiled)
        logits = _gathered(logits)
        bad = _nonfinite(logits)
        # numpy on the gathered arrays: a max over sharded arrays may drop NaNs
        err = None if bad or reference_bad else float(np.max(np.abs(logits - reference)))
        reports.append(
            LayoutReport(
                max_abs_err=err,
                logits_scale=scale,
                nonfinite_logits=bad,
                reference_nonfinite_logits=reference_bad,
                n_logits=reference.size,
                **analysis,
            )
        )
    return reports


def _gathered(logits) -> np.ndarray:
    """Logits as one host array in float32 (bfloat16 and float16 ones compared exactly)."""
    return np.asarray(logits).astype(np.float32)


def _nonfinite(logits: np.ndarray) -> int:
    return int(np.count_nonzero(~np.isfinite(logits)))


def check_finite(cfg: ModelConfig, reports: Sequence[LayoutReport]) -> None:
    """One line naming what gave NaN or infinite logits (the one-device reference, layouts) and
    the likely fix; nothing when every pass was finite. Call it once the results are shown."""
    bad = [r for r in reports if r.nonfinite_logits]
    reference = next((r for r in reports if r.reference_nonfinite_logits), None)
    if not bad and reference is None:
        return
    n = reports[0].n_logits
    if reference is not None:
        who = "the one-device forward pass" + (
            f" and {', '.join(r.strategy for r in bad)}" if bad else ""
        )
        count = reference.reference_nonfinite_logits
        fix = f"lower init_std={cfg.init_std:g}"
        if (cfg.dtype, cfg.param_dtype) != ("float32", "float32"):
            fix += f" or compute in float32 (now dtype={cfg.dtype}, param_dtype={cfg.param_dtype})"
        raise ConfigError(
            f"logits: {who} gave {count:,} of {n:,} NaN or infinite logits (the model itself "
            f"overflows, whatever the layout); {fix}"
        )
    names = ", ".join(f"{r.strategy} ({r.nonfinite_logits:,} of {n:,})" for r in bad)
    raise ConfigError(
        f"logits: {names} gave NaN or infinite logits where one device's are finite; a layout "
        f"bug: report it with this command line (the other strategies' rows stand)"
    )


def separated_forward(run: Separated, state, tokens) -> tuple[np.ndarray, dict]:
    """The forward pass with attention and experts on two sub-meshes, and what it does.

    Collectives per layer come from the compiled attention and expert programs (per micro-batch,
    times the micro-batches); the transfers between the meshes from what the pass moved. Counts
    are what one device of the mesh issuing them does; bytes are averaged over all the devices
    (attention devices send the all-reduces, expert devices the all-to-alls, both the transfers),
    as is the textbook volume they are held against.
    """
    cfg, sep = run.cfg, run.sep
    run.moved.clear()
    logits = run.forward(run.put(state), tokens)
    moved = {k: v / cfg.n_layers for k, v in run.moved.items()}
    pieces = cost.compile_pieces(run, "forward")
    inventories = cost.mesh_inventories(run, pieces)
    collectives = [c for inv in inventories.values() for c in inv.collectives]
    by_mesh = {
        mesh: {
            k: (t.count / cfg.n_layers, t.bytes / cfg.n_layers) for k, t in inv.by_kind().items()
        }
        for mesh, inv in inventories.items()
    }
    a, x = sep.attention.n_devices, sep.experts.n_devices
    per_layer = {}
    for kind, (count_a, bytes_a) in by_mesh["attention"].items():
        count_x, bytes_x = by_mesh["experts"][kind]
        if count_a + count_x:
            per_layer[kind] = (count_a + count_x, (a * bytes_a + x * bytes_x) / (a + x))
    crossing = sum(moved.get(k, 0.0) for k in INTER_MESH)
    calls_per_layer = cfg.micro_batches * cfg.n_moe_layers / cfg.n_layers
    per_layer["transfer"] = (2.0 * calls_per_layer, crossing / (a + x))
    per_layer["fanout"] = (calls_per_layer, moved.get("fanout", 0.0) / (a + x))
    params = run.abstract_params()
    held = {
        "attention": cost.shard_bytes((params.outer, params.attention)),
        "experts": cost.shard_bytes(params.experts),
    }
    textbook = sep.transfer_bytes(cfg) * 2 * cfg.n_moe_layers / cfg.n_layers
    details = {
        "separation": {
            "attention_mesh": sep.attention.axis_sizes,
            "expert_mesh": sep.experts.axis_sizes,
            "micro_batches": cfg.micro_batches,
            "transfer_bits": sep.transfer_bits,
            "heads": sep.padding(cfg),
            "collectives_per_layer_by_mesh": {
                mesh: {k: {"count": c, "bytes_per_device": b} for k, (c, b) in per.items() if c}
                for mesh, per in by_mesh.items()
            },
            "moved_per_layer": moved,
            "transfer_bytes_per_layer": crossing,
            "transfer_textbook_bytes_per_layer": textbook,
            "transfer_vs_textbook": crossing / textbook if textbook else None,
            "param_bytes_per_device_by_mesh": held,
        }
    }
    mesh = {"attention": sep.attention.axis_sizes, "experts": sep.experts.axis_sizes}
    return logits, {
        "strategy": sep.name,
        "mesh": mesh,
        "inventory": Inventory(tuple(collectives)),
        "per_layer": per_layer,
        "textbook_bytes_per_layer": textbook_per_layer(cfg, sep),
        "bubble_fraction": 0.0,
        "param_bytes_per_device": max(held.values()),
        "param_bytes_total": param_bytes_total(abstract_model(cfg)[1]),
        "memory": cost.memory(run, pieces, "forward"),
        "details": details,
    }

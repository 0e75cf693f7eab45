"""Run one model under several strategies and read what each compiled program does.

For every strategy: the same parameters and tokens as the one-device reference, the largest
logits difference from it (none where either gave NaN or infinite logits: those are counted,
and `check_finite` turns them into one error line), the collectives XLA inserted (per layer and
in all), the bytes each device sends against the least volume the layout needs, parameter bytes
per device and the compiled memory analysis. Returns data; printing is the CLI's business.
"""

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.layout import Layout, Phase, ProgramCost
from jaxmoe.placement import forward, init_params


@dataclasses.dataclass(frozen=True)
class LayoutReport(ProgramCost):
    """What a layout's programs do (`ProgramCost`) and, for the forward pass, how its logits
    compare with one device's."""

    max_abs_err: float | None = (
        None  # max |logits - one-device logits|; None: not run, or not finite
    )
    logits_scale: float | None = None  # max |one-device logits| over the real vocabulary
    nonfinite_logits: int = 0  # this layout's logits that are NaN or infinite
    reference_nonfinite_logits: int = 0  # the one-device forward pass's
    n_logits: int = 0  # logits per forward pass (B x S x padded vocabulary); 0: not run

    @property
    def finite(self) -> bool:
        """Both this layout's logits and the one-device reference's are all finite numbers."""
        return self.nonfinite_logits == 0 and self.reference_nonfinite_logits == 0

    @property
    def bytes_per_layer(self) -> float:
        return sum(b for _, b in self.per_layer.values())

    @property
    def bytes_vs_minimum(self) -> float:
        if self.minimum_bytes_per_layer == 0:
            return 1.0 if self.bytes_per_layer == 0 else float("inf")
        return self.bytes_per_layer / self.minimum_bytes_per_layer

    def to_json(self, cfg: ModelConfig) -> dict:
        totals = self.inventory.by_kind()
        return {
            "phase": self.phase,
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
            "minimum_bytes_per_layer": self.minimum_bytes_per_layer,
            "bytes_vs_minimum": self.bytes_vs_minimum,
            "gap_to_minimum": self.gap or None,
            "gap_bytes_per_layer": self.gap_bytes_per_layer,
            "bubble_fraction": self.bubble_fraction,
            "param_bytes_per_device": self.param_bytes_per_device,
            "param_bytes_total": self.param_bytes_total,
            "memory_per_device": self.memory,
        } | (self.details or {})


def random_tokens(cfg: ModelConfig, seed: int) -> jax.Array:
    return jax.random.randint(jax.random.key(seed), (cfg.batch, cfg.seq_len), 0, cfg.vocab_size)


def can_split(
    cfg: ModelConfig, layouts: Sequence[Layout]
) -> tuple[list[Layout], tuple[tuple[str, str], ...]]:
    """The layouts that can split `cfg`, and (name, the one-line reason) for each of the others:
    nothing is compiled. A ConfigError if none can."""
    able, refused = [], []
    for layout in layouts:
        try:
            layout.check(cfg)
        except ConfigError as e:
            refused.append((layout.name, str(e)))
        else:
            able.append(layout)
    if not able:
        raise ConfigError(
            f"none of {len(refused)} layouts can split {cfg.name}, e.g. {refused[0][1]}; "
            "name a layout that fits the model with --strategies"
        )
    return able, tuple(refused)


def compare_strategies(
    cfg: ModelConfig,
    layouts: Sequence[Layout],
    devices: Sequence[jax.Device],
    seed: int = 0,
    phase: Phase = "forward",
) -> list[LayoutReport]:
    """Every layout's programs for `phase`; for the forward pass, run on the same parameters and
    tokens and held against the one-device forward pass (other phases are compiled on abstract
    inputs, nothing run).

    All layouts are checked against the config (one-line ConfigError) before any compiling.
    """
    laid = [layout.lay_out(cfg, devices) for layout in layouts]
    if phase != "forward":
        return [LayoutReport(**vars(run.cost(phase))) for run in laid]
    graphdef, state = init_params(cfg, seed)
    tokens = random_tokens(cfg, seed + 1)
    reference = _gathered(jax.jit(forward(graphdef))(state, tokens))
    reference_bad = _nonfinite(reference)
    scale = None if reference_bad else float(np.max(np.abs(reference[..., : cfg.vocab_size])))
    reports = []
    for run in laid:
        logits, cost = run.run_forward(run.put(state), tokens)
        logits = _gathered(logits)
        bad = _nonfinite(logits)
        # numpy on the gathered arrays: a max over sharded arrays may drop NaNs
        err = None if bad or reference_bad else float(np.max(np.abs(logits - reference)))
        reports.append(
            LayoutReport(
                **vars(cost),
                max_abs_err=err,
                logits_scale=scale,
                nonfinite_logits=bad,
                reference_nonfinite_logits=reference_bad,
                n_logits=reference.size,
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

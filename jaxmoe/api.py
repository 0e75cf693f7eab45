"""The public API: what a notebook (or another program) calls; `jaxmoe/__init__.py` re-exports it.

Every function takes a config (a `ModelConfig`, or a name: a preset or a paper's tiny model) and
layouts by name or as values, runs on `devices` (default: every device JAX gives this process;
`jaxmoe.platform` chooses them) and returns a frozen dataclass with `to_json()` and, where there
is one, the table the command line prints (`table()`, `text()`). Nothing here prints.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from pathlib import Path

import jax

from jaxmoe import catalogue, report
from jaxmoe.analysis import hardware as profiles
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.compare import LayoutReport, can_split, check_finite, compare_strategies
from jaxmoe.config import ModelConfig, Workload
from jaxmoe.experiment import PREFILL_BATCH, Experiment, experiment_rows
from jaxmoe.explain import Explanation
from jaxmoe.explain import explain as _explain
from jaxmoe.layout import Layout, Phase
from jaxmoe.phases import Measure, PhaseCost, phase_costs
from jaxmoe.plan import PHASES as PLAN_PHASES
from jaxmoe.plan import Plan
from jaxmoe.plan import plan as _plan
from jaxmoe.train.loop import RunOptions
from jaxmoe.train.loop import train as _train
from jaxmoe.train.recipe import TrainConfig, described, recipe

Config = ModelConfig | str
Layouts = Sequence[Layout | str] | None


def config(name: Config, scale: str = "tiny", workload: Workload | None = None) -> ModelConfig:
    """A config by name: a preset (`tiny_moe`, ...), a paper's model (`paper000`) at `scale`
    (`tiny`, or `full`: the paper's own), a shipped model (`mixtral-8x7b`) or a config.json's
    path; under `workload` where given (batch, sequence length, micro-batches, loss chunks)."""
    cfg = name if isinstance(name, ModelConfig) else catalogue.config(name, scale)
    return cfg if workload is None else cfg.replace(**dataclasses.asdict(workload))


def layout(name: Layout | str, transfer_bits: int = 0) -> Layout:
    """A layout by name (`ep16`, `tp8_pp2`, `ma_separation:8+8`, ...), or the one given."""
    return catalogue.layout(name, transfer_bits) if isinstance(name, str) else name


def layouts() -> dict[str, Layout]:
    """Every registered layout by name."""
    return catalogue.layouts()


def hardware(name: Hardware | str) -> Hardware:
    """A hardware profile by name: a cluster `<gpu>x<count>[n<per_node>]` (`h100x64`: 8 nodes
    of 8; `b200x72n72`: one NVLink domain) or a named profile of jaxmoe/assets/hardware.toml."""
    return profiles.get(name) if isinstance(name, str) else name


def _layouts(names: Layouts, transfer_bits: int = 0) -> list[Layout]:
    chosen = catalogue.layouts().values() if names is None else names
    return [layout(n, transfer_bits) for n in chosen]


def _devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
    return list(jax.devices() if devices is None else devices)


# ---- compare ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Comparison:
    """Each layout's programs for one phase; for the forward pass, against one device.
    `cannot_split`: (layout, reason) for each registered layout left out because it cannot split
    the model (only when no layouts were named)."""

    config: ModelConfig
    phase: Phase
    reports: tuple[LayoutReport, ...]
    cannot_split: tuple[tuple[str, str], ...] = ()

    def to_json(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "phase": self.phase,
            "strategies": {r.strategy: r.to_json(self.config) for r in self.reports},
            "cannot_split": dict(self.cannot_split),
        }

    def table(self) -> str:
        lines = [f"\ncannot split {self.config.name}:"] if self.cannot_split else []
        lines += [f"  {name:<20} {reason}" for name, reason in self.cannot_split]
        return "\n".join([report.compare_table(self.config, self.reports), *lines])

    def check_finite(self) -> None:
        """One-line ConfigError naming who gave NaN or infinite logits, if anyone did."""
        check_finite(self.config, self.reports)


def compare(
    cfg: Config = "tiny_moe",
    layouts: Layouts = None,
    *,
    phase: Phase = "forward",
    devices: Sequence[jax.Device] | None = None,
    seed: int = 0,
    transfer_bits: int = 0,
) -> Comparison:
    """Lay `cfg` out under each layout (default: every registered one that can split it; the
    others are listed with the reason). The forward pass runs on the same parameters and tokens
    as one device and is held against it; other phases are compiled on abstract inputs.
    Collectives per layer, bytes against the layout's minimum, memory."""
    model = config(cfg)
    chosen, refused = _layouts(layouts, transfer_bits), ()
    if layouts is None:
        chosen, refused = can_split(model, chosen)
    reports = compare_strategies(model, chosen, _devices(devices), seed=seed, phase=phase)
    return Comparison(model, phase, tuple(reports), refused)


# ---- explain ----------------------------------------------------------------------------------
def explain(
    cfg: Config,
    layout_: Layout | str,
    *,
    phase: Phase = "forward",
    devices: Sequence[jax.Device] | None = None,
) -> Explanation:
    """Per parameter its logical axes, the spec the compiled program gives it and its bytes per
    device; the collectives with their mesh axes; memory per device (see `jaxmoe.explain`)."""
    return _explain(config(cfg), layout(layout_), _devices(devices), phase)


# ---- the bound, plan --------------------------------------------------------------------------
def bound(
    cfg: Config,
    layout_: Layout | str,
    hw: Hardware | str = "h100x16",
    *,
    prefill_batch: int = PREFILL_BATCH,
    measure: Measure | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> tuple[PhaseCost, ...]:
    """Prefill and decode under a layout: each one's roofline bound on `hw` from its compiled
    program, memory per device and (with `measure`) its time on `devices`. A paper's name is its
    full-size model, or its tiny one when measured."""
    model = config(cfg, "tiny" if measure else "full")
    batch = min(model.batch, prefill_batch)
    costs = phase_costs(
        model,
        layout(layout_),
        _devices(devices),
        hardware(hw),
        prefill_batch=batch,
        measure=measure,
    )
    return tuple(costs)


def plan(
    cfg: Config,
    hw: Hardware | str = "h100x16",
    candidates: Sequence[str] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
    compile_top: int | None = None,
    phases: Sequence[str] = PLAN_PHASES,
    progress: bool = False,
) -> Plan:
    """Search the candidates (default: every layout of the devices: compositions of parallelism
    axes, ma_separation's splits) for `cfg` (a paper's name: its full-size model) on `hw`:
    estimated from their rules, pruned, the `compile_top` best per phase (of `phases`) compiled
    on abstract inputs (nothing allocated, nothing run) and ranked by their bound. Candidates
    named are all compiled unless `compile_top` says otherwise."""
    model, profile = config(cfg, "full"), hardware(hw)
    names = None if candidates is None else list(candidates)
    return _plan(
        model,
        profile,
        names,
        _devices(devices),
        compile_top=compile_top,
        phases=phases,
        progress=progress,
    )


# ---- a paper's experiment ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExperimentResult:
    experiment: Experiment
    scale: str
    hardware: Hardware
    rows: tuple[dict, ...]  # per strategy and phase: measured, bound, claimed, memory

    def to_json(self) -> dict:
        exp = self.experiment
        return {
            "experiment": exp.name,
            "scale": self.scale,
            "hardware": self.hardware.name,
            "config": dataclasses.asdict(exp.config(self.scale)),
            "notes": list(exp.notes),
            "rows": list(self.rows),
        }

    def table(self) -> str:
        return report.experiment_table(self.experiment, self.scale, self.hardware, self.rows)


def experiments() -> dict[str, Experiment]:
    """The papers' experiments by name."""
    return catalogue.experiments()


def experiment(
    name: Experiment | str,
    scale: str = "tiny",
    hw: Hardware | str | None = None,
    *,
    measure: Measure | None = None,
    devices: Sequence[jax.Device] | None = None,
    device_counts: Sequence[int] | None = None,
) -> ExperimentResult:
    """A paper's setup: each strategy it compares, per phase, with the bound on `hw` (default:
    the paper's hardware) beside the paper's claim; at the tiny scale pass `measure` to time it
    on `devices` and check its greedy tokens against one device's. `device_counts` (default: the
    paper's own, 16) lays it out at each count on the first of `devices`, bounded on as many of
    `hw`'s GPUs (`jaxmoe.experiment.hardware_at`; paper002 scales its layouts to 8 and 32), with
    the claims for that count and the bound's scaling efficiency against the paper's count."""
    exp = catalogue.experiment(name) if isinstance(name, str) else name
    profile = hardware(hw or exp.hardware)
    rows = experiment_rows(exp, scale, profile, measure, _devices(devices), device_counts)
    return ExperimentResult(exp, scale, profile, tuple(rows))


# ---- training ---------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TrainResult:
    step: int
    loss: float  # the last step's training loss
    val_loss: float  # held-out cross-entropy at the last evaluation
    metrics: dict[str, float]  # the last step's metrics
    metrics_file: Path  # one JSON line per step

    def to_json(self) -> dict:
        return {
            "step": self.step,
            "loss": self.loss,
            "val_loss": self.val_loss,
            "metrics": self.metrics,
            "metrics_file": str(self.metrics_file),
        }


def train(
    cfg: Config,
    layout_: Layout | str,
    options: RunOptions,
    tc: TrainConfig | None = None,
    *,
    explicit: Collection[str] = (),
    devices: Sequence[jax.Device] | None = None,
) -> TrainResult:
    """Train with the papers' recipe (`jaxmoe.train.recipe.recipe`: fields in `explicit` are the
    caller's own) on C4, resuming from `options.workdir`; see `jaxmoe.train.loop.train`."""
    model, tc = recipe(config(cfg), options.steps, tc, explicit=explicit)
    options = dataclasses.replace(options, announce=described(model, tc, explicit))
    last = _train(model, layout(layout_), tc, options, devices)
    return TrainResult(
        last["step"],
        last["loss"],
        last["val_loss"],
        last,
        options.workdir / "metrics.jsonl",
    )

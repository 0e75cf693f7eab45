"""Which layout to use for a model on a cluster: a search over the layouts of its devices, ranked
by the hardware's bound.

The candidates (by default every composition of parallelism axes whose sizes multiply to the
device count, the registered layouts of that count, each in the device orders that put
different axes inside a node of the hardware, and ma_separation's splits) are checked
against the model (a layout that cannot split it is listed with the reason), estimated from
their rule tables (`jaxmoe.estimate`: nothing compiled), and compiled on abstract inputs (no
weights allocated, nothing run) best estimate first, per phase, until `compile_top` of them fit
in the GPU's memory with a bound within MISSED times their estimate (at most TRIES times as many
compiled; a layout whose weights alone do not fit comes last); the rest are pruned. The
compiled are ranked by their roofline bound: prefill by tokens per second, decode by time per
output token, the training step by tokens per second. Each row's memory per device, from the
compiled program, stands beside the estimate's floor (the weights the layout leaves a device,
its KV cache when decoding, gradients and Adam's moments when training): what the program holds
beyond them is activations and workspace. A layout that does not fit ranks after
every one that fits. Each row says what limits it (compute, memory bandwidth, or which
collective on which mesh axes). A layout with no estimate of its own (the two-mesh separation)
is always compiled.

An ma_separation split runs with the most ping-pong micro-batches, up to the config's
`micro_batches`, that split its batches (named in the row when fewer).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence

import jax
from tqdm import tqdm

from jaxmoe import catalogue, report
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.experiment import PREFILL_BATCH
from jaxmoe.report import human_bytes


def _fitting(cfg: ModelConfig, layout, n_devices: int) -> tuple[ModelConfig, str]:
    """The first of the layout's variants of the config that runs both phases' batches."""
    first_error = None
    for sized, name in layout.variants(cfg):
        try:
            for phase in (sized, sized.replace(batch=min(cfg.batch, PREFILL_BATCH))):
                layout.check(phase, n_devices)
        except ConfigError as err:
            first_error = first_error or err
            continue
        return sized, name
    raise first_error


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """One compiled candidate in one phase: its bound (tokens per second; decode also ms per
    output token), what limits it, its memory per device, its rank and why, beside the estimate
    that chose it for compiling."""

    strategy: str
    phase: str
    tps: float
    tpot_ms: float | None  # decode only
    seconds: float  # per call, communication overlapped
    serial_seconds: float  # nothing overlapped
    estimated_seconds: float | None  # the rule-table estimate (None: the layout has none)
    limit: str
    memory_bytes_per_device: int
    # the estimate's floor: the weights (and Adam's state, training) and KV cache per device
    floor_bytes_per_device: float | None
    fits: bool
    rank: int  # 1: the best; a candidate that does not fit ranks after every one that does
    reason: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every compiled candidate's bound per phase, the rankings (best first), and what the search
    left out: layouts that cannot split the model, and per phase those pruned (and why)."""

    config: ModelConfig
    hardware: Hardware
    n_devices: int
    considered: int
    rows: tuple[PlanRow, ...]
    cannot_split: dict[str, str]  # candidate -> why it cannot lay the model out
    pruned: dict[str, dict[str, str]]  # phase -> candidate -> why it was not compiled
    cannot_rank: dict[str, dict[str, str]]  # phase -> candidate -> why it has no bound there

    @property
    def compiled(self) -> int:
        """Programs compiled: one per candidate and phase ranked."""
        return len(self.rows)

    def ranking(self, phase: str) -> list[PlanRow]:
        return sorted((r for r in self.rows if r.phase == phase), key=lambda r: r.rank)

    def device_orders(self, phase: str) -> list[tuple[str, tuple[str, ...]]]:
        """Per layout compiled in several device orders (`name@...`) in `phase`: the order that
        ranked best and the others, best first."""
        by_layout: dict[str, list[str]] = {}
        for row in self.ranking(phase):
            by_layout.setdefault(row.strategy.split("@")[0], []).append(row.strategy)
        return [(names[0], tuple(names[1:])) for names in by_layout.values() if len(names) > 1]

    def table(self, top: int | None = None) -> str:
        return report.plan_table(self, PREFILL_BATCH, top)

    def to_json(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "hardware": self.hardware.name,
            "n_devices": self.n_devices,
            "considered": self.considered,
            "compiled": self.compiled,
            "rows": [r.to_json() for r in self.rows],
            "ranking": {p: [r.strategy for r in self.ranking(p)] for p in PHASES},
            "device_orders": {
                p: [
                    {"best": best, "others": list(others)} for best, others in self.device_orders(p)
                ]
                for p in PHASES
            },
            "cannot_split": self.cannot_split,
            "pruned": self.pruned,
            "cannot_rank": self.cannot_rank,
        }


PHASES = ("prefill", "decode", "train")
COMPILE_TOP = 3
TRIES = 3  # programs compiled per phase, at most, per one wanted that fits
MISSED = 2.0  # a bound this many times its estimate: the estimate missed what the program does


def plan(
    cfg: ModelConfig,
    hw: Hardware,
    names: Sequence[str] | None,
    devices: Sequence[jax.Device],
    *,
    compile_top: int | None = None,
    phases: Sequence[str] = PHASES,
    progress: bool = False,
) -> Plan:
    """Search the candidates (`names`; None: every layout of `len(devices)` devices), compile
    the `compile_top` most promising per phase (default: COMPILE_TOP when searching, every one
    named) and rank them. `progress`: a progress bar on stderr."""
    n = len(devices)
    if compile_top is None:
        compile_top = COMPILE_TOP if names is None else len(names)
    unknown = sorted(set(phases) - set(PHASES))
    if unknown or not phases:
        raise ConfigError(
            f"phases {', '.join(phases) or '(none)'}: choose among {', '.join(PHASES)}"
        )
    names = catalogue.candidates(n, hw.per_node) if names is None else list(names)
    layouts = [catalogue.layout(name) for name in names]  # unknown names fail before compiling
    runnable, skipped = [], {}
    for layout in layouts:
        try:
            runnable.append((layout, *_fitting(cfg, layout, n)))
        except ConfigError as err:
            skipped[layout.name] = str(err)
    if not runnable:  # one line before anything compiles: nothing to rank
        if len(skipped) == 1:
            raise ConfigError(next(iter(skipped.values())))
        first, reason = next(iter(skipped.items()))
        raise ConfigError(
            f"none of the {len(skipped)} candidates can run {cfg.name} (B {cfg.batch} x S "
            f"{cfg.seq_len}) on {n} devices; {first}: {reason}"
        )
    queues = {phase: _queue(runnable, cfg, hw, phase) for phase in phases}
    bar = tqdm(
        total=sum(len(a) + min(len(e), TRIES * compile_top) for a, e in queues.values()),
        desc="compiling",
        unit="program",
        disable=not progress,
        file=sys.stderr,
    )
    costs, pruned, cannot_rank = [], {}, {}
    for phase, (always, estimated) in queues.items():
        pruned[phase], cannot_rank[phase] = {}, {}
        fitting, tried = 0, 0
        for layout, sized, name, e in [*always, *estimated]:
            if e is not None and (fitting == compile_top or tried == TRIES * compile_top):
                pruned[phase][name] = _pruned_why(e, hw, phase, compile_top)
                continue
            try:
                laid = layout.lay_out(_phase_config(sized, cfg, phase), devices)
                cost = laid.phase_cost(phase, hw)
            except ConfigError as err:
                cannot_rank[phase][name] = str(err)
            else:
                costs.append((name, cost, e))
                if e is not None:
                    tried, fitting = tried + 1, fitting + _as_estimated(cost, e, hw)
            bar.update()
    bar.close()
    rows = [row for phase in phases for row in _ranked(phase, costs, hw)]
    return Plan(cfg, hw, n, len(layouts), tuple(rows), skipped, pruned, cannot_rank)


def _as_estimated(cost, e, hw: Hardware) -> bool:
    """Whether a compiled candidate fits and its bound is within MISSED of its estimate (one the
    estimate misses by more does not stop the search: the next estimates may be truer)."""
    return _fits(cost, hw) and cost.bound.overlapped_s <= MISSED * e.seconds


def _phase_config(sized: ModelConfig, cfg: ModelConfig, phase: str) -> ModelConfig:
    return sized.replace(batch=min(cfg.batch, PREFILL_BATCH)) if phase == "prefill" else sized


def _queue(runnable, cfg: ModelConfig, hw: Hardware, phase: str):
    """(the candidates without an estimate, those with one, best first: fitting ones, then by
    estimated time), each as (layout, config, name, estimate)."""
    always, estimated = [], []
    for layout, sized, name in runnable:
        e = layout.estimate(_phase_config(sized, cfg, phase), hw, phase)
        (always if e is None else estimated).append((layout, sized, name, e))
    estimated.sort(key=lambda c: (not c[3].fits(hw), c[3].seconds, c[3].serial_seconds))
    return always, estimated


def _pruned_why(e, hw: Hardware, phase: str, top: int) -> str:
    if not e.fits(hw):
        adam = " and Adam state" if phase == "train" else ""
        return (
            f"its weights{adam} alone take {human_bytes(e.memory_bytes)} per device > "
            f"{human_bytes(hw.hbm_bytes)}"
        )
    return f"estimated {e.seconds * 1e3:.3g} ms per call, behind the {top} best compiled"


def _ranked(phase: str, costs, hw: Hardware) -> list[PlanRow]:
    here = [(name, c, e) for name, c, e in costs if c.phase == phase]
    ranked = sorted(here, key=lambda nce: (not _fits(nce[1], hw), nce[1].bound.overlapped_s))
    rows = []
    for rank, (name, c, e) in enumerate(ranked, 1):
        rate = c.rate(c.bound.overlapped_s)
        rows.append(
            PlanRow(
                strategy=name,
                phase=phase,
                tps=rate["tps"],
                tpot_ms=rate.get("tpot_ms"),
                seconds=c.bound.overlapped_s,
                serial_seconds=c.bound.serial_s,
                estimated_seconds=None if e is None else e.seconds,
                limit=c.bound.limit,
                memory_bytes_per_device=c.memory["total"],
                floor_bytes_per_device=None if e is None else e.memory_bytes,
                fits=_fits(c, hw),
                rank=rank,
                reason=_reason(c, ranked[0][1], hw),
            )
        )
    return rows


def _fits(cost, hw: Hardware) -> bool:
    return cost.memory["total"] <= hw.hbm_bytes


def _reason(cost, best, hw: Hardware) -> str:
    limit = cost.bound.limit
    why = f"limited by {limit}" if "@" in limit or ":" in limit else f"{limit}-bound"
    if not _fits(cost, hw):
        gib = human_bytes(cost.memory["total"])
        return f"does not fit: {gib} per device > {human_bytes(hw.hbm_bytes)}; {why}"
    if cost is best:
        return f"best: {why}"
    return f"{cost.bound.overlapped_s / best.bound.overlapped_s:.2f}x the best's time; {why}"

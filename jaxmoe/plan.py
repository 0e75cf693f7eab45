"""Which placement to use for a model on a machine, ranked by the hardware's bound.

Every candidate layout (the registered strategies and ma_separation's device splits) is compiled
for the model on abstract inputs (no weights allocated, nothing run) and ranked by its roofline
bound: prefill by tokens per second, decode by time per output token. A layout that does not fit
in the GPU's memory is ranked after every one that fits; one that cannot split the model is
listed with the reason. Each row says what limits it (compute, memory bandwidth, or which
collective on which mesh axes).

An ma_separation split runs with the most ping-pong micro-batches, up to the
config's `micro_batches`, that split its batches (named in the row when fewer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax

from jaxmoe import catalogue, report
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.experiment import PREFILL_BATCH
from jaxmoe.phases import phase_costs
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
    """One candidate in one phase: its bound (tokens per second; decode also ms per output
    token), what limits it, its memory per device, its rank and why."""

    strategy: str
    phase: str
    tps: float
    tpot_ms: float | None  # decode only
    seconds: float  # per call, communication overlapped
    serial_seconds: float  # nothing overlapped
    limit: str
    memory_bytes_per_device: int
    fits: bool
    rank: int  # 1: the best; a candidate that does not fit ranks after every one that does
    reason: str

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Plan:
    """Every candidate's bound per phase and the rankings (best first)."""

    config: ModelConfig
    hardware: Hardware
    rows: tuple[PlanRow, ...]
    cannot_split: dict[str, str]  # candidate -> why it cannot lay the model out

    def ranking(self, phase: str) -> list[PlanRow]:
        return sorted((r for r in self.rows if r.phase == phase), key=lambda r: r.rank)

    def table(self) -> str:
        return report.plan_table(self, PREFILL_BATCH)

    def to_json(self) -> dict:
        return {
            "config": dataclasses.asdict(self.config),
            "hardware": self.hardware.name,
            "rows": [r.to_json() for r in self.rows],
            "ranking": {p: [r.strategy for r in self.ranking(p)] for p in PHASES},
            "cannot_split": self.cannot_split,
        }


PHASES = ("prefill", "decode")


def plan(
    cfg: ModelConfig, hw: Hardware, names: Sequence[str], devices: Sequence[jax.Device]
) -> Plan:
    """Every candidate's bound per phase, ranked."""
    layouts = [catalogue.layout(n) for n in names]  # unknown names fail here, before compiling
    runnable, skipped = [], {}
    for layout in layouts:
        try:
            runnable.append((layout, *_fitting(cfg, layout, len(devices))))
        except ConfigError as err:
            skipped[layout.name] = str(err)
    if not runnable:  # one line before anything compiles: nothing to rank
        if len(skipped) == 1:
            raise ConfigError(next(iter(skipped.values())))
        first, reason = next(iter(skipped.items()))
        raise ConfigError(
            f"none of the {len(skipped)} candidates can run {cfg.name} (B {cfg.batch} x S "
            f"{cfg.seq_len}); {first}: {reason}"
        )
    costs = [
        (name, c)
        for layout, sized, name in runnable
        for c in phase_costs(
            sized, layout, devices, hw, prefill_batch=min(cfg.batch, PREFILL_BATCH)
        )
    ]
    rows = []
    for phase in PHASES:
        here = [(name, c) for name, c in costs if c.phase == phase]
        ranked = sorted(here, key=lambda nc: (not _fits(nc[1], hw), nc[1].bound.overlapped_s))
        best = ranked[0][1]
        for rank, (name, c) in enumerate(ranked, 1):
            rate = c.rate(c.bound.overlapped_s)
            rows.append(
                PlanRow(
                    strategy=name,
                    phase=phase,
                    tps=rate["tps"],
                    tpot_ms=rate.get("tpot_ms"),
                    seconds=c.bound.overlapped_s,
                    serial_seconds=c.bound.serial_s,
                    limit=c.bound.limit,
                    memory_bytes_per_device=c.memory["total"],
                    fits=_fits(c, hw),
                    rank=rank,
                    reason=_reason(c, best, hw),
                )
            )
    return Plan(cfg, hw, tuple(rows), skipped)


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

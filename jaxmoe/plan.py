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

from collections.abc import Sequence

import jax

from jaxmoe import catalogue
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


def plan(
    cfg: ModelConfig, hw: Hardware, names: Sequence[str], devices: Sequence[jax.Device]
) -> dict:
    """Every candidate's bound per phase, and the two rankings (best first)."""
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
    rows = []
    for layout, sized, name in runnable:
        costs = phase_costs(sized, layout, devices, hw, prefill_batch=min(cfg.batch, PREFILL_BATCH))
        for c in costs:
            memory = c.memory["total"]
            rows.append(
                {
                    "strategy": name,
                    "phase": c.phase,
                    **c.rate(c.bound.overlapped_s),
                    "seconds": c.bound.overlapped_s,
                    "serial_seconds": c.bound.serial_s,
                    "limit": c.bound.limit,
                    "memory_bytes_per_device": memory,
                    "fits": memory <= hw.hbm_bytes,
                }
            )
    ranking = {}
    for phase in ("prefill", "decode"):
        ranked = sorted(
            (r for r in rows if r["phase"] == phase), key=lambda r: (not r["fits"], r["seconds"])
        )
        for i, r in enumerate(ranked):
            r["rank"] = i + 1
            r["reason"] = _reason(r, ranked[0], hw)
        ranking[phase] = [r["strategy"] for r in ranked]
    return {"rows": rows, "ranking": ranking, "cannot_split": skipped}


def _reason(row: dict, best: dict, hw: Hardware) -> str:
    limit = row["limit"]
    why = f"limited by {limit}" if "@" in limit or ":" in limit else f"{limit}-bound"
    if not row["fits"]:
        gib = human_bytes(row["memory_bytes_per_device"])
        return f"does not fit: {gib} per device > {human_bytes(hw.hbm_bytes)}; {why}"
    if row is best:
        return f"best: {why}"
    return f"{row['seconds'] / best['seconds']:.2f}x the best's time; {why}"

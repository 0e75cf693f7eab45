"""`plan`: which placement to use for a model on a machine, ranked by the hardware's bound.

Every candidate layout (the registered strategies and ma_separation's device splits) is compiled
for the model on abstract inputs (no weights allocated, nothing run) and ranked by its roofline
bound: prefill by tokens per second, decode by time per output token. A layout that does not fit
in the GPU's memory is ranked after every one that fits; one that cannot split the model is
listed with the reason. Each row says what limits it (compute, memory bandwidth, or which
collective on which mesh axes).

A paper's name as `--config` plans its full-size model (a deployment question); a preset is
planned as it is. An ma_separation split runs with the most ping-pong micro-batches, up to the
config's `micro_batches`, that split its batches (named in the row when fewer).
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax

import meshes
from experiments.configs import DEVICES, config, strategies
from experiments.experiment_cmd import PREFILL_BATCH
from experiments.papers.registry import EXPERIMENTS
from experiments.report import human_bytes, table
from jaxmoe.analysis import hardware
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.config import ConfigError, ModelConfig, with_overrides
from jaxmoe.paths import writable_file
from jaxmoe.phases import phase_costs

SPLITS = ("ma_separation:12+4", "ma_separation:8+8", "ma_separation:14+2")


def candidates(names: str | None) -> list[str]:
    """`--strategies a,b` (each known, named once; not empty), or every layout and split."""
    if names is not None:
        return [s.name for s in strategies(names)]
    return [*meshes.REGISTRY, *SPLITS]


def plan_config(name: str, sets: list[str], batch: int | None, seq: int | None) -> ModelConfig:
    if batch is not None and batch < 1:
        raise ConfigError(f"--batch {batch}: must be at least 1 sequence; use e.g. --batch 16")
    if seq is not None and seq < 2:
        raise ConfigError(f"--seq {seq}: must be at least 2 tokens; use e.g. --seq 2048")
    cfg = EXPERIMENTS[name].full if name in EXPERIMENTS else config(name)
    cfg = with_overrides(cfg, assignments=sets)
    changes = {k: v for k, v in (("batch", batch), ("seq_len", seq)) if v is not None}
    return cfg.replace(**changes) if changes else cfg


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


def plan(cfg: ModelConfig, hw: Hardware, names: list[str]) -> dict:
    """Every candidate's bound per phase, and the two rankings (best first)."""
    layouts = [meshes.get(n) for n in names]  # unknown names fail here, before compiling
    runnable, skipped = [], {}
    for layout in layouts:
        try:
            runnable.append((layout, *_fitting(cfg, layout, len(jax.devices()))))
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
        costs = phase_costs(
            sized, layout, jax.devices(), hw, prefill_batch=min(cfg.batch, PREFILL_BATCH)
        )
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


def run(args: argparse.Namespace) -> None:
    hw = hardware.get(args.hardware)
    hw.check_devices(DEVICES, "--hardware")
    cfg = plan_config(args.config, args.set, args.batch, args.seq)
    names = candidates(args.strategies)  # unknown names fail here, before anything compiles
    if args.json:
        writable_file(args.json, "--json")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", DEVICES)
    result = plan(cfg, hw, names)
    print(_table(cfg, hw, result))
    if args.json:
        doc = {"config": dataclasses.asdict(cfg), "hardware": hw.name, **result}
        args.json.write_text(json.dumps(doc, indent=2))
        print(f"\nwrote {args.json}")


def _table(cfg: ModelConfig, hw: Hardware, result: dict) -> str:
    parts = [
        f"plan for {cfg.name}: {cfg.n_layers} layers, D {cfg.d_model}, B {cfg.batch} x S "
        f"{cfg.seq_len}, {cfg.dtype}, on {hw.description} (bounds: nothing run)"
    ]
    for phase in ("prefill", "decode"):
        rows = sorted((r for r in result["rows"] if r["phase"] == phase), key=lambda r: r["rank"])
        headers = ("rank", "strategy", "bound", "memory/device", "fits", "why")
        body = [
            (
                str(r["rank"]),
                r["strategy"],
                f"{r['tps']:,.0f} tok/s" if phase == "prefill" else f"{r['tpot_ms']:.3g} ms",
                human_bytes(r["memory_bytes_per_device"]),
                "yes" if r["fits"] else "NO",
                r["reason"],
            )
            for r in rows
        ]
        batch = min(cfg.batch, PREFILL_BATCH) if phase == "prefill" else cfg.batch
        unit = "tokens/s" if phase == "prefill" else "ms per output token"
        parts.append(f"{phase} (B {batch}, {unit}):\n\n{table(headers, body)}")
    for name, reason in result["cannot_split"].items():
        parts.append(f"{name}: cannot run this model: {reason}")
    return "\n\n".join(parts)

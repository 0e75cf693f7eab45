"""`experiment`: a paper's setup under each strategy it compares, with the hardware's bound beside
every measured and claimed figure.

At `--scale tiny` the model runs on the 16 virtual CPU devices: prefill and decode are timed,
and each strategy's greedy tokens are checked against one device's. At `--scale full` the paper's
model is compiled for 16 devices on abstract inputs (no weights allocated): its bound and memory
come from the partitioned program, nothing is run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import jax
import numpy as np

import meshes
from experiments import plots, report
from experiments.configs import DEVICES, timing
from experiments.papers import Experiment
from experiments.papers.registry import EXPERIMENTS, get
from jaxmoe.analysis import hardware
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.inference import decoder, generate
from jaxmoe.paths import writable_dir, writable_file
from jaxmoe.phases import Measure, PhaseCost, phase_costs
from jaxmoe.placement import init_params

PREFILL_BATCH = 16  # sequences per prefill program (the bound is per token)


def run(args: argparse.Namespace) -> None:
    names = list(EXPERIMENTS) if args.name == "all" else [get(args.name).name]
    hw = hardware.get(args.hardware) if args.hardware else None
    for name in names:
        (hw or hardware.get(get(name).hardware)).check_devices(DEVICES, "--hardware")
    timing(args.warmup, args.iters)
    if args.json:
        writable_file(args.json, "--json")
    if args.plots:
        writable_dir(args.plots, "--plots")
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", DEVICES)

    docs = []
    for name in names:
        exp = get(name)
        profile = hw or hardware.get(exp.hardware)
        measure = Measure(args.warmup, args.iters) if args.scale == "tiny" else None
        rows = experiment_rows(exp, args.scale, profile, measure)
        doc = {
            "experiment": exp.name,
            "scale": args.scale,
            "hardware": profile.name,
            "config": dataclasses.asdict(exp.config(args.scale)),
            "notes": list(exp.notes),
            "rows": rows,
        }
        docs.append(doc)
        print(report.experiment_table(exp, args.scale, profile, rows), end="\n\n", flush=True)
        if args.plots:
            path = plots.experiment_plot(doc, args.plots / f"{exp.name}_{args.scale}.png")
            print(f"wrote {path}\n")
    if args.json:
        args.json.write_text(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
        print(f"wrote {args.json}")


def experiment_rows(
    exp: Experiment, scale: str, hw: Hardware, measure: Measure | None
) -> list[dict]:
    cfg = exp.config(scale)
    reference = _one_device_tokens(cfg) if measure else None
    rows = []
    for name in exp.strategies:
        strategy = meshes.get(name)
        try:
            for sized in (cfg, cfg.replace(batch=min(cfg.batch, PREFILL_BATCH))):
                strategy.check(sized, len(jax.devices()))
        except ConfigError as err:
            rows += [_unbuilt(exp, name, p, str(err), scale) for p in ("prefill", "decode")]
            continue
        costs = phase_costs(
            cfg,
            strategy,
            jax.devices(),
            hw,
            prefill_batch=min(cfg.batch, PREFILL_BATCH),
            measure=measure,
        )
        same = None if reference is None else _same_tokens(cfg, strategy, reference)
        rows += [_row(exp, name, cost, hw, same, scale) for cost in costs]
    for name in sorted({c.strategy for c in exp.claims} - set(exp.strategies)):
        reason = f"{name} is not built yet: the paper's claim is shown without a bound"
        rows += [_unbuilt(exp, name, p, reason, scale) for p in ("prefill", "decode")]
    return rows


def _claimed(exp: Experiment, strategy: str, phase: str) -> dict | None:
    claims = [c for c in exp.claims if c.strategy == strategy]
    if not claims:
        return None
    claim = claims[0]
    figures: dict = {"source": claim.source}
    if claim.tps is not None and exp.phase_of_tps == phase:
        figures["tps"] = claim.tps
    if claim.tpot_ms is not None and phase == "decode":
        figures["tpot_ms"] = claim.tpot_ms
    return figures if len(figures) > 1 else None


def _exceeds(claimed: dict | None, bound: dict) -> bool:
    if claimed is None:
        return False
    too_fast = "tps" in claimed and claimed["tps"] > bound["tps"] * (1 + 1e-9)
    too_short = "tpot_ms" in claimed and claimed["tpot_ms"] < bound["tpot_ms"] * (1 - 1e-9)
    return bool(too_fast or too_short)


def _row(exp, strategy, cost: PhaseCost, hw: Hardware, same_tokens: bool | None, scale) -> dict:
    b = cost.bound
    bound = {**cost.rate(b.overlapped_s), "overlapped": True, "seconds": b.overlapped_s}
    bound.setdefault("tpot_ms", None)
    serial = {**cost.rate(b.serial_s), "overlapped": False, "seconds": b.serial_s}
    # a paper's figures are for its full-size model: the tiny one is not held to them
    claimed = _claimed(exp, strategy, cost.phase) if scale == "full" else None
    measured = None
    if cost.measured is not None:
        measured = {**cost.rate(cost.measured.median), **cost.measured.summary()}
        if cost.phase == "decode":
            low, high = cost.measured.ci95
            measured["tpot_ms_ci95"] = [low * 1e3, high * 1e3]
    memory = cost.memory["total"]
    return {
        "strategy": strategy,
        "phase": cost.phase,
        "batch": cost.batch,
        "measured": measured,
        "bound": bound,
        "bound_serial": serial,
        "limit": b.limit,
        "roofline": b.summary(),
        "claimed": claimed,
        "claim_exceeds_bound": _exceeds(claimed, bound),
        "memory_bytes_per_device": memory,
        "memory": cost.memory,
        "fits": memory <= hw.hbm_bytes,
        "same_tokens_as_one_device": same_tokens,
    }


def _unbuilt(exp, strategy: str, phase: str, reason: str, scale: str) -> dict:
    return {
        "strategy": strategy,
        "phase": phase,
        "measured": None,
        "bound": None,
        "claimed": _claimed(exp, strategy, phase) if scale == "full" else None,
        "claim_exceeds_bound": False,
        "memory_bytes_per_device": None,
        "fits": None,
        "error": reason,
    }


GENERATED = 8  # tokens each strategy generates for the comparison with one device


def _prompt(cfg: ModelConfig) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, cfg.vocab_size, (cfg.batch, cfg.seq_len - GENERATED), dtype=np.int32)


def _one_device_tokens(cfg: ModelConfig) -> np.ndarray:
    graphdef, params = init_params(cfg, 0)
    return generate(decoder(cfg, graphdef), params, _prompt(cfg), GENERATED)


def _same_tokens(cfg: ModelConfig, strategy, reference: np.ndarray) -> bool:
    run = strategy.lay_out(cfg, jax.devices())
    params = run.put(init_params(cfg, 0)[1])
    return bool(np.array_equal(generate(run.decoder(), params, _prompt(cfg), GENERATED), reference))

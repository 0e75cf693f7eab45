"""A paper's experiment as data, and its rows: each strategy it compares, per phase, with the
hardware's bound beside every measured and claimed figure.

An `Experiment` names its model at two scales (the paper's, and a tiny one that runs on a laptop
CPU), the strategies it compares (by layout name), the hardware it ran on and the figures it
claims (checked against the bound, never trusted). The papers themselves are registered by the
`experiments` package (`jaxmoe.catalogue`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import numpy as np

from jaxmoe import catalogue
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.inference import decoder, generate
from jaxmoe.phases import Measure, PhaseCost, phase_costs
from jaxmoe.placement import init_params

PREFILL_BATCH = 16  # sequences per prefill program (the bound is per token)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One figure a paper claims for one strategy, with where it says so."""

    strategy: str  # the registered strategy that lays the model out as the paper describes
    tps: float | None = None  # tokens per second as the paper reports them
    tpot_ms: float | None = None  # time per output token, milliseconds
    source: str = ""  # the paper's words, quoted briefly, with the section or table


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One paper's experiment: its model at two scales, what it compares, where, and its claims."""

    name: str  # paper000 ...
    paper: str  # the file in ../shared/papers
    title: str  # a few words on what the paper proposes
    full: ModelConfig  # the paper's model, batch and prompt length, and dtype
    tiny: ModelConfig  # the same structure, small enough for this CPU
    strategies: tuple[str, ...]  # registered strategies the paper compares
    hardware: str  # a profile of jaxmoe's hardware data file, e.g. "h100x16"
    claims: tuple[Claim, ...]
    notes: tuple[str, ...] = ()  # what the paper leaves unsaid and what the experiment assumes
    phase_of_tps: Literal["prefill", "decode"] = "prefill"  # what the paper's TPS measures

    def config(self, scale: Literal["tiny", "full"]) -> ModelConfig:
        return self.tiny if scale == "tiny" else self.full


def shrink(full: ModelConfig) -> ModelConfig:
    """The tiny variant of a paper's model: the same layer pattern, experts, routing and expert
    form, with width, workload and dtype cut to what compiles on 16 CPU devices in seconds."""
    return full.replace(
        name=f"{full.name}_tiny",
        vocab_size=50257,
        d_model=128,
        n_heads=16,  # tp16 splits heads 16 ways; heads_dims_4x4 needs heads and head dim / 4
        head_dim=8,  # H * K = D, as in every paper
        d_ff=512,  # 4 x D, as in every paper
        n_layers=4,
        moe_group_size=0,  # one routing group per sequence
        dtype="float32",
        param_dtype="float32",
        batch=16,
        seq_len=64,
        micro_batches=4,
    )


def experiment_rows(
    exp: Experiment,
    scale: str,
    hw: Hardware,
    measure: Measure | None,
    devices: Sequence[jax.Device],
) -> list[dict]:
    """Each strategy the paper compares, per phase: its bound on `hw` (and, with `measure`, its
    time on `devices` and whether its greedy tokens are one device's), memory per device, the
    paper's claim beside them; a strategy that cannot lay the model out gets its reason."""
    cfg = exp.config(scale)
    reference = _one_device_tokens(cfg) if measure else None
    rows = []
    for name in exp.strategies:
        strategy = catalogue.layout(name)
        try:
            for sized in (cfg, cfg.replace(batch=min(cfg.batch, PREFILL_BATCH))):
                strategy.check(sized, len(devices))
        except ConfigError as err:
            rows += [_unbuilt(exp, name, p, str(err), scale) for p in ("prefill", "decode")]
            continue
        costs = phase_costs(
            cfg,
            strategy,
            devices,
            hw,
            prefill_batch=min(cfg.batch, PREFILL_BATCH),
            measure=measure,
        )
        same = None if reference is None else _same_tokens(cfg, strategy, devices, reference)
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


def _same_tokens(cfg: ModelConfig, strategy, devices, reference: np.ndarray) -> bool:
    run = strategy.lay_out(cfg, devices)
    params = run.put(init_params(cfg, 0)[1])
    return bool(np.array_equal(generate(run.decoder(), params, _prompt(cfg), GENERATED), reference))

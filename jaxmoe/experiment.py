"""A paper's experiment as data, and its rows: each strategy it compares, per phase, with the
hardware's bound beside every measured and claimed figure.

An `Experiment` names its model at two scales (the paper's, and a tiny one that runs on a laptop
CPU), the strategies it compares (by layout name), the hardware it ran on and the figures it
claims (checked against the bound, never trusted). The papers themselves are registered by the
`experiments` package (`jaxmoe.catalogue`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence
from typing import Literal

import jax
import numpy as np

from jaxmoe import catalogue
from jaxmoe.analysis import hardware
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.inference import decoder, generate
from jaxmoe.phases import Measure, PhaseCost, phase_costs
from jaxmoe.placement import init_params

PREFILL_BATCH = 16  # sequences per prefill program (the bound is per token)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One figure a paper claims for one strategy, with where it says so."""

    strategy: str  # the layout that lays the model out as the paper describes, at `devices`
    tps: float | None = None  # tokens per second as the paper reports them
    tpot_ms: float | None = None  # time per output token, milliseconds
    source: str = ""  # the paper's words, quoted briefly, with the section or table
    # the full-size model the figure is for when it is not the experiment's own (its dense twin,
    # another sequence length): bounded at full scale only, beside the experiment's own model
    model: ModelConfig | None = None
    # the device count the figure is for when it is not the paper's own (a scaling claim):
    # `strategy` is then one of the experiment's layouts at that count (`Experiment.layouts_at`)
    devices: int | None = None


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
    n_devices: int = 16  # the paper's device count: its strategies' and its hardware's
    # its strategies at other device counts, for its scaling claims: (count, layouts in the
    # order of `strategies`, each the same layout scaled to that count)
    layouts_at: tuple[tuple[int, tuple[str, ...]], ...] = ()

    def config(self, scale: Literal["tiny", "full"]) -> ModelConfig:
        return self.tiny if scale == "tiny" else self.full

    def strategies_at(self, n: int) -> tuple[str, ...]:
        """The layouts it compares on `n` devices: `strategies` at its own count, and at a count
        it names no layouts for (each then says what it needs)."""
        if n == self.n_devices:
            return self.strategies
        return dict(self.layouts_at).get(n, self.strategies)

    def devices_of(self, claim: Claim) -> int:
        return claim.devices or self.n_devices

    def models(self, counts: Collection[int] | None = None) -> dict[ModelConfig, str | None]:
        """The full-size models its claims (those at `counts` devices; default: all) are for, its
        own first, each named by what sets it apart from the others (dense or MoE, layers,
        width, sequence length, batch; None when there is only its own)."""
        claims = [c for c in self.claims if counts is None or self.devices_of(c) in counts]
        models = list(dict.fromkeys([self.full, *(c.model or self.full for c in claims)]))
        if len(models) == 1:
            return {self.full: None}
        parts = [[_describe(m, field) for field in _DESCRIBED] for m in models]
        varying = [i for i in range(len(_DESCRIBED)) if len({p[i] for p in parts}) > 1]
        labels = [", ".join(p[i] for i in varying) for p in parts]
        if len(set(labels)) < len(labels) or "" in labels:
            raise ConfigError(
                f"{self.name}: its claims' models differ in more than {', '.join(_DESCRIBED)} "
                f"({labels}); make them differ in one of these"
            )
        return dict(zip(models, labels, strict=True))


_DESCRIBED = ("moe_every", "n_layers", "d_model", "seq_len", "batch")


def _describe(cfg: ModelConfig, field: str) -> str:
    if field == "moe_every":
        return "MoE" if cfg.is_moe else "dense"
    value = getattr(cfg, field)
    return {"n_layers": f"{value} layers", "d_model": f"D {value}", "seq_len": f"S {value}"}.get(
        field, f"B {value}"
    )


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
    counts: Sequence[int] | None = None,
) -> list[dict]:
    """Each strategy the paper compares, per phase, at each of `counts` devices (default: the
    paper's own count; the first of `devices`): its bound on `hw`'s GPUs at that count
    (`hardware_at`) (and, with `measure`, its time and whether its greedy tokens are one
    device's), memory per device, the paper's claim for that count beside them; a strategy that
    cannot lay the model out gets its reason.

    At full scale, claims for other models (`Claim.model`) follow: each strategy and phase they
    claim, compiled for that model (phases and strategies it claims nothing for are skipped).
    At another count than the paper's that it claims figures for (its scaling claims, at full
    scale) the rows are those claims' alone, its own model included; at any other count, its
    model in every phase. A row at another count than the paper's carries `scaling`: the bound's
    scaling efficiency (and the claims') against the paper's count, in the phase the paper's TPS
    measures."""
    counts = check_counts(counts or (exp.n_devices,), len(devices))
    cfg = exp.config(scale)
    reference = _one_device_tokens(cfg) if measure else None
    models = exp.models(counts) if scale == "full" else {cfg: None}
    found: list[tuple[ModelConfig, dict]] = []  # each row with the model it is for
    for n in counts:
        at = _Count(n, hardware_at(exp, hw, n), tuple(devices[:n]))
        claims_only = (  # a count of its scaling claims: their rows alone
            scale == "full"
            and n != exp.n_devices
            and any(exp.devices_of(c) == n for c in exp.claims)
        )
        for model, label in models.items():
            every = model == cfg and not claims_only  # its model in every phase
            for compared, name in zip(exp.strategies, exp.strategies_at(n), strict=True):
                phases = [p for p in PHASES if every or _claimed(exp, name, p, model, n)]
                if phases:
                    rows = _strategy_rows(
                        exp, name, model, label, phases, at, measure, reference, scale
                    )
                    found += [(model, {**r, "compares": compared}) for r in rows]
            claimed = {
                c.strategy
                for c in exp.claims
                if (c.model or exp.full) == model and exp.devices_of(c) == n
            }
            for name in sorted(claimed - set(exp.strategies_at(n))):
                reason = f"{name} is not built yet: the paper's claim is shown without a bound"
                found += [
                    (
                        model,
                        {
                            **_unbuilt(exp, name, p, reason, scale, model, label, at),
                            "compares": None,
                        },
                    )
                    for p in PHASES
                ]
    _add_scaling(exp, cfg, found)
    return [row for _, row in found]


PHASES = ("prefill", "decode")


def check_counts(counts: Sequence[int], available: int) -> tuple[int, ...]:
    """Device counts, ascending: each at least 1 and given once, none above the `available`
    devices; a one-line ConfigError otherwise."""
    if min(counts) < 1 or len(set(counts)) < len(counts):
        raise ConfigError(
            f"device counts {list(counts)}: give each count once, each 1 or more, e.g. 8, 16, 32"
        )
    if max(counts) > available:
        raise ConfigError(
            f"device counts {list(counts)}: {max(counts)} devices asked for, {available} given; "
            f"pass at least {max(counts)} devices"
        )
    return tuple(sorted(counts))


def hardware_at(exp: Experiment, hw: Hardware, n: int) -> Hardware:
    """The profile the bound at `n` devices is on: `hw` itself at the paper's own count (as
    given; its layouts may span part of it), else `hw`'s GPUs, `n` of them, in nodes of its size
    (of `n` when that is smaller): the paper's DGX H100s scaled to 8 or 32 GPUs."""
    if n in (exp.n_devices, hw.count):
        return hw
    per_node = min(hw.per_node, n)
    return hardware.get(f"{hw.gpu}x{n}" + ("" if per_node == min(8, n) else f"n{per_node}"))


@dataclasses.dataclass(frozen=True)
class _Count:
    """One device count of the experiment: its profile and its devices."""

    n: int
    hw: Hardware
    devices: tuple[jax.Device, ...]

    @property
    def fields(self) -> dict:
        return {"devices": self.n, "hardware": self.hw.name}


def _prefill_batch(exp: Experiment, cfg: ModelConfig, scale: str) -> int:
    """Sequences per prefill program: PREFILL_BATCH, times k for a model claimed at k times the
    paper's batch (weak scaling: each device's share of the work stays)."""
    return min(cfg.batch, PREFILL_BATCH * max(1, cfg.batch // exp.config(scale).batch))


def _strategy_rows(exp, name, cfg, label, phases, at: _Count, measure, reference, scale):
    strategy = catalogue.layout(name)
    batches = {"prefill": _prefill_batch(exp, cfg, scale), "decode": cfg.batch}
    try:
        for batch in {batches[p] for p in phases}:
            strategy.check(cfg.replace(batch=batch), at.n)
    except ConfigError as err:
        return [_unbuilt(exp, name, p, str(err), scale, cfg, label, at) for p in phases]
    if list(phases) == list(PHASES):
        costs = phase_costs(
            cfg, strategy, at.devices, at.hw, prefill_batch=batches["prefill"], measure=measure
        )
    else:  # phase_costs, for the phases claimed only
        costs = [
            strategy.lay_out(cfg.replace(batch=batches[p]), at.devices).phase_cost(
                p, at.hw, measure
            )
            for p in phases
        ]
    same = None if reference is None else _same_tokens(cfg, strategy, at.devices, reference)
    return [_row(exp, name, cost, at, same, scale, cfg, label) for cost in costs]


def _claimed(exp: Experiment, strategy: str, phase: str, model: ModelConfig, n: int) -> dict | None:
    """The figures the paper claims for `strategy` on `model` in `phase` at `n` devices (several
    claims for one model, from different tables, are merged: they must agree)."""
    figures: dict = {}
    sources = []
    for claim in exp.claims:
        if (
            claim.strategy != strategy
            or (claim.model or exp.full) != model
            or exp.devices_of(claim) != n
        ):
            continue
        found = {}
        if claim.tps is not None and exp.phase_of_tps == phase:
            found["tps"] = claim.tps
        if claim.tpot_ms is not None and phase == "decode":
            found["tpot_ms"] = claim.tpot_ms
        for key, value in found.items():
            if figures.setdefault(key, value) != value:
                raise ConfigError(
                    f"{exp.name}: two claims for {strategy} on one model disagree on {key} "
                    f"({figures[key]} and {value})"
                )
        if found:
            sources.append(claim.source)
    return {"source": "; ".join(sources), **figures} if figures else None


def _exceeds(claimed: dict | None, bound: dict) -> bool:
    if claimed is None:
        return False
    too_fast = "tps" in claimed and claimed["tps"] > bound["tps"] * (1 + 1e-9)
    too_short = "tpot_ms" in claimed and claimed["tpot_ms"] < bound["tpot_ms"] * (1 - 1e-9)
    return bool(too_fast or too_short)


def _add_scaling(exp: Experiment, cfg: ModelConfig, found: list[tuple[ModelConfig, dict]]) -> None:
    """Each row at another count than the paper's, in the phase its TPS measures, against the
    same strategy's row on the paper's model at the paper's count: efficiency = (TPS at the
    larger count / TPS at the smaller) / (larger count / smaller), of the bounds and, where both
    rows hold a claimed TPS, of the claims. Same batch: strong scaling; the batch grown with the
    devices: weak."""
    base = {
        r["compares"]: r
        for m, r in found
        if m == cfg and r["devices"] == exp.n_devices and r["phase"] == exp.phase_of_tps
    }
    for model, row in found:
        paper = base.get(row.get("compares"))
        if row["devices"] == exp.n_devices or row["phase"] != exp.phase_of_tps or paper is None:
            continue
        (lo, lo_batch, low), (hi, hi_batch, high) = sorted(
            [(row["devices"], model.batch, row), (exp.n_devices, cfg.batch, paper)],
            key=lambda t: t[0],
        )
        kind = "strong" if lo_batch == hi_batch else None
        if hi_batch * lo == lo_batch * hi and lo_batch != hi_batch:
            kind = "weak"
        row["scaling"] = {
            "kind": kind,
            "devices": [lo, hi],
            "batch": [lo_batch, hi_batch],
            "bound_efficiency": _efficiency(low, high, "bound", hi / lo),
            "claimed_efficiency": _efficiency(low, high, "claimed", hi / lo),
        }


def _efficiency(low: dict, high: dict, key: str, ratio: float) -> float | None:
    """(TPS of `high` / TPS of `low`) / the ratio of their device counts, for their `key`
    figures (None where either has no TPS)."""
    a, b = (low.get(key) or {}).get("tps"), (high.get(key) or {}).get("tps")
    return None if not a or not b else b / a / ratio


def _row(exp, strategy, cost: PhaseCost, at: _Count, same_tokens, scale, model, label) -> dict:
    b = cost.bound
    bound = {**cost.rate(b.overlapped_s), "overlapped": True, "seconds": b.overlapped_s}
    bound.setdefault("tpot_ms", None)
    serial = {**cost.rate(b.serial_s), "overlapped": False, "seconds": b.serial_s}
    # a paper's figures are for its full-size model: the tiny one is not held to them
    claimed = _claimed(exp, strategy, cost.phase, model, at.n) if scale == "full" else None
    measured = None
    if cost.measured is not None:
        measured = {**cost.rate(cost.measured.median), **cost.measured.summary()}
        if cost.phase == "decode":
            low, high = cost.measured.ci95
            measured["tpot_ms_ci95"] = [low * 1e3, high * 1e3]
    memory = cost.memory["total"]
    return {
        **at.fields,
        "strategy": strategy,
        "model": label,  # which of the experiment's models (None: it has one)
        "phase": cost.phase,
        "batch": cost.batch,
        "seq_len": model.seq_len,
        "measured": measured,
        "bound": bound,
        "bound_serial": serial,
        "limit": b.limit,
        "roofline": b.summary(),
        "claimed": claimed,
        "claim_exceeds_bound": _exceeds(claimed, bound),
        "memory_bytes_per_device": memory,
        "memory": cost.memory,
        "fits": memory <= at.hw.hbm_bytes,
        "same_tokens_as_one_device": same_tokens,
        "scaling": None,
    }


def _unbuilt(exp, strategy, phase, reason, scale, model, label, at: _Count) -> dict:
    return {
        **at.fields,
        "strategy": strategy,
        "model": label,
        "phase": phase,
        "seq_len": model.seq_len,
        "measured": None,
        "bound": None,
        "claimed": _claimed(exp, strategy, phase, model, at.n) if scale == "full" else None,
        "claim_exceeds_bound": False,
        "memory_bytes_per_device": None,
        "fits": None,
        "error": reason,
        "scaling": None,
    }


GENERATED = 8  # tokens each strategy generates for the comparison with one device


def _prompt(cfg: ModelConfig) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, cfg.vocab_size, (cfg.batch, cfg.seq_len - GENERATED), dtype=np.int32)


def _one_device_tokens(cfg: ModelConfig) -> np.ndarray:
    graphdef, params = init_params(cfg, 0)
    return generate(decoder(cfg, graphdef), params, _prompt(cfg), GENERATED).tokens


def _same_tokens(cfg: ModelConfig, strategy, devices, reference: np.ndarray) -> bool:
    run = strategy.lay_out(cfg, devices)
    params = run.put(init_params(cfg, 0)[1])
    tokens = generate(run.decoder(), params, _prompt(cfg), GENERATED).tokens
    return bool(np.array_equal(tokens, reference))

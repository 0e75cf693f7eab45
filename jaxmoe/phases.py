"""What inference costs under a layout: the prefill and decode programs compiled for a mesh, their
roofline bounds on a hardware profile, their memory per device, and (when run) measured times.

Prefill is compiled for `prefill_batch` sequences of `seq_len` tokens: its bound is per token,
and a smaller batch keeps the attention scores of a 10,000-token prompt within one GPU's memory.
Decode is compiled for the whole batch, one token per sequence, attending over a full cache of
`seq_len` positions (the cost of every step at that context).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp

from jaxmoe.analysis.hardware import Hardware
from jaxmoe.analysis.memory import memory_per_device
from jaxmoe.analysis.roofline import Bound, program_bound
from jaxmoe.config import ModelConfig
from jaxmoe.inference import Decoder, compile_phases, decoder
from jaxmoe.placement import abstract_model, init_params, place
from jaxmoe.separation import Separated, Separation, cost
from jaxmoe.separation.cost import SeparatedBound
from jaxmoe.sharding import Strategy
from jaxmoe.timer import Timing, time_calls

Phase = Literal["prefill", "decode"]


@dataclasses.dataclass(frozen=True)
class PhaseCost:
    phase: Phase
    batch: int  # sequences per call
    tokens: int  # tokens per call: batch x seq_len for prefill, batch for decode
    bound: Bound | SeparatedBound
    memory: dict[str, int]  # XLA's memory analysis, bytes per device
    measured: Timing | None = None  # seconds per call on the devices at hand

    def rate(self, seconds: float) -> dict[str, float]:
        """Tokens per second and, for decode, milliseconds per output token, at this time."""
        figures = {"tps": self.tokens / seconds}
        if self.phase == "decode":
            figures["tpot_ms"] = seconds * 1e3
        return figures


@dataclasses.dataclass(frozen=True)
class Measure:
    warmup: int
    iters: int
    seed: int = 0


def phase_costs(
    cfg: ModelConfig,
    strategy: Strategy | Separation | None,
    devices: Sequence[jax.Device],
    hw: Hardware,
    *,
    prefill_batch: int,
    measure: Measure | None = None,
) -> list[PhaseCost]:
    """Prefill and decode under `strategy` (None: one device). Without `measure` nothing is
    allocated: the programs are compiled on abstract parameters and caches."""
    if isinstance(strategy, Separation):
        return separated_costs(cfg, strategy, devices, hw, prefill_batch, measure)
    costs = []
    for phase, batch in (("prefill", prefill_batch), ("decode", cfg.batch)):
        sized = cfg.replace(batch=batch)
        dec, params = _decoder(sized, strategy, devices, allocate=measure is not None)
        compiled = compile_phases(dec, params, sized.seq_len)[phase]
        axes = {} if strategy is None else strategy.axis_sizes
        timing = None if measure is None else _time(phase, compiled, dec, params, measure)
        costs.append(
            PhaseCost(
                phase=phase,
                batch=batch,
                tokens=batch * (sized.seq_len if phase == "prefill" else 1),
                bound=program_bound(compiled, axes, hw, sized.dtype),
                memory=memory_per_device(compiled),
                measured=timing,
            )
        )
    return costs


def separated_costs(
    cfg: ModelConfig,
    sep: Separation,
    devices: Sequence[jax.Device],
    hw: Hardware,
    prefill_batch: int,
    measure: Measure | None,
) -> list[PhaseCost]:
    """Prefill and decode with attention and experts on two sub-meshes: the bound composed from
    the compiled pieces (`separation.cost`), and memory per device on the busier mesh."""
    costs = []
    for phase, batch in (("prefill", prefill_batch), ("decode", cfg.batch)):
        run = Separated(cfg.replace(batch=batch), sep, devices)
        pieces = cost.compile_pieces(run, phase)
        timing = None if measure is None else _time_separated(phase, run, measure)
        costs.append(
            PhaseCost(
                phase=phase,
                batch=batch,
                tokens=batch * (cfg.seq_len if phase == "prefill" else 1),
                bound=cost.separated_bound(run, pieces, hw, phase),
                memory=cost.memory(run, pieces, phase),
                measured=timing,
            )
        )
    return costs


def _time_separated(phase: Phase, run: Separated, measure: Measure) -> Timing:
    cfg = run.cfg
    params = run.put(init_params(cfg, 0)[1])
    tokens = jax.random.randint(
        jax.random.key(measure.seed), (cfg.batch, cfg.seq_len), 0, cfg.vocab_size, jnp.int32
    )
    if phase == "prefill":
        return time_calls(
            lambda cache: run.extend(params, tokens, cache, 0),
            warmup=measure.warmup,
            iters=measure.iters,
            setup=lambda: (run.new_cache(),),
        )
    cache = run.new_cache()
    return time_calls(
        lambda: run.extend(params, tokens[:, -1:], cache, cfg.seq_len - 1),
        warmup=measure.warmup,
        iters=measure.iters,
    )


def _decoder(cfg, strategy, devices, *, allocate: bool) -> tuple[Decoder, object]:
    if strategy is None:
        graphdef, abstract = abstract_model(cfg)
        params = init_params(cfg, 0)[1] if allocate else abstract
        return decoder(cfg, graphdef), params
    placement = place(cfg, strategy, devices[: strategy.n_devices])
    params = placement.put(init_params(cfg, 0)[1]) if allocate else placement.abstract_params()
    return decoder(cfg, placement.graphdef, placement), params


def _time(phase: Phase, compiled, dec: Decoder, params, measure: Measure) -> Timing:
    cfg = dec.cfg
    tokens = jax.random.randint(
        jax.random.key(measure.seed), (cfg.batch, cfg.seq_len), 0, cfg.vocab_size, jnp.int32
    )
    if phase == "prefill":
        prompt = dec.put_tokens(tokens)
        return time_calls(
            lambda cache: compiled(params, prompt, cache),
            warmup=measure.warmup,
            iters=measure.iters,
            setup=lambda: (dec.new_cache(),),
        )
    token = dec.put_tokens(tokens[:, -1:])
    position = jnp.asarray(cfg.seq_len - 1, jnp.int32)  # every step attends over the whole cache
    state = {"cache": dec.new_cache()}

    def step():
        logits, state["cache"] = compiled(params, token, state["cache"], position)
        return logits

    return time_calls(step, warmup=measure.warmup, iters=measure.iters)

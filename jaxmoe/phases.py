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

from jaxmoe.analysis.hardware import Hardware
from jaxmoe.analysis.roofline import Bound
from jaxmoe.config import ModelConfig
from jaxmoe.layout import Layout
from jaxmoe.separation.cost import SeparatedBound
from jaxmoe.timer import Timing

Phase = Literal["prefill", "decode", "train"]


@dataclasses.dataclass(frozen=True)
class PhaseCost:
    phase: Phase
    batch: int  # sequences per call
    tokens: int  # tokens per call: batch x seq_len (prefill, a training step), batch (decode)
    bound: Bound | SeparatedBound
    memory: dict[str, int]  # bytes per device by part (XLA's memory analysis, or per sub-mesh)
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
    layout: Layout,
    devices: Sequence[jax.Device],
    hw: Hardware,
    *,
    prefill_batch: int,
    measure: Measure | None = None,
) -> list[PhaseCost]:
    """Prefill and decode under `layout`. Without `measure` nothing is allocated: the programs
    are compiled on abstract parameters and caches."""
    return [
        layout.lay_out(cfg.replace(batch=batch), devices).phase_cost(phase, hw, measure)
        for phase, batch in (("prefill", prefill_batch), ("decode", cfg.batch))
    ]

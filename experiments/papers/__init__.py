"""The five source papers as experiments: each paper's model at full size (as the paper states
it) and a tiny version that runs on a laptop CPU, the strategies it compares, the hardware it ran
on, and the figures it claims (to be checked against the hardware's bound, never trusted).

Names follow the papers' files in ../shared/papers: `paper000` ... `paper004`, one module each;
`registry.get(name)` returns one.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from jaxmoe.config import ModelConfig


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

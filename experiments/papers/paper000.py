"""Paper 000: large cross-node expert parallelism (EP=16) against TP=8 x PP=2, 16-layer MoE."""

from experiments.papers import Claim, Experiment, shrink
from jaxmoe.config import ModelConfig

FULL = ModelConfig(
    name="paper000",
    vocab_size=50257,
    d_model=4096,
    n_heads=32,
    head_dim=128,
    d_ff=16384,
    n_layers=16,
    moe_every=1,
    n_experts=16,
    top_k=2,
    capacity_factor=1.25,
    expert_form="gelu",
    moe_group_size=1000,
    dtype="bfloat16",
    param_dtype="bfloat16",
    batch=128,
    seq_len=10_000,
)

EXPERIMENT = Experiment(
    name="paper000",
    paper="000_20484a92daf2c30a.txt",
    title="EP=16, one expert per GPU",
    full=FULL,
    tiny=shrink(FULL),
    strategies=("tp8_pp2", "ep16"),
    hardware="h100x16",
    claims=(
        Claim(
            "tp8_pp2",
            tps=120_000,
            tpot_ms=8.3,
            source="4.1 'Baseline (TP=8, PP=2): TPS 120,000, TPOT 8.3 ms'",
        ),
        Claim(
            "ep16",
            tps=450_000,
            tpot_ms=2.2,
            source="4.1 'Proposed (EP=16): TPS 450,000, TPOT 2.2 ms'",
        ),
    ),
    notes=(
        "1.1 '16 MoE layers': every layer is MoE (moe_every=1)",
        "the paper never states the expert form; a GELU 2-matrix expert (D -> F -> D) is assumed",
        "its memory estimate (4096 x 16384 x 2 bytes = 128 MB per expert) counts one matrix only",
        "top_k and capacity factor unstated: top-2 and 1.25 (GShard) assumed",
        "vocabulary unstated: GPT-2's 50257 assumed",
        "routing groups of 1000 tokens (10 per sequence) so the one-hot dispatch stays small",
        "pipeline micro-batches unstated: 4 assumed (bubble 1/5)",
        "hardware: '16 H100 GPUs', '80 GB HBM3', 'NVLink + NVSwitch + InfiniBand': 2 nodes of 8",
        "baseline 2.1 '16 experts / 8 GPUs per stage = 2 experts per GPU': experts over tensor",
        "3.2 says experts may be 'identical across layers (shared weights or separate "
        "instances)': separate weights per layer modelled",
        "TPS read as prefill: TPS x TPOT is about 1000 tokens, not the batch of 128, so TPS is "
        "not batch / TPOT; strategies.md bounds it as prefill",
    ),
    phase_of_tps="prefill",
)

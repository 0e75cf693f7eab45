"""Paper 002: head-group x head-dim slicing (m x n = 4 x 4), 16-layer dense transformer."""

from experiments.papers import Claim, Experiment, shrink
from jaxmoe.config import ModelConfig

FULL = ModelConfig(
    name="paper002",
    vocab_size=50257,
    d_model=4096,
    n_heads=32,
    head_dim=128,
    d_ff=16384,
    n_layers=16,
    moe_every=0,
    expert_form="gelu",
    dtype="float16",
    param_dtype="float16",
    batch=128,
    seq_len=10_000,
)

EXPERIMENT = Experiment(
    name="paper002",
    paper="002_7b907619bbc2ade3.txt",
    title="head-group x head-dim slicing",
    full=FULL,
    tiny=shrink(FULL),
    strategies=("tp8_pp2", "heads_dims_4x4"),
    hardware="h100x16",
    claims=(
        Claim(
            "tp8_pp2",
            tps=1_200_000,
            tpot_ms=0.35,
            source="Performance Metrics table, 'Baseline': 1,200,000 TPS, 0.35 ms TPOT",
        ),
        Claim(
            "heads_dims_4x4",
            tps=1_580_000,
            tpot_ms=0.22,
            source="Performance Metrics table, 'Proposed': 1,580,000 TPS, 0.22 ms TPOT",
        ),
    ),
    notes=(
        "'16-layer Dense Transformer': moe_every=0",
        "'Activation Function: GELU' is stated: a GELU 2-matrix MLP",
        "'FP16 mixed precision': float16 weights and compute",
        "vocabulary unstated: GPT-2's 50257 assumed",
        "pipeline micro-batches unstated: 4 assumed (bubble 1/5)",
        "hardware: '16x NVIDIA H100 GPUs (80GB HBM3 each)', 'DGX H100', 'InfiniBand NDR "
        "400Gbps for multi-node': 2 nodes of 8",
        "the paper does not say how the MLP uses the 16 devices; heads_dims_4x4 chooses",
        "TPS read as prefill: TPOT is 'Total overhead ... per token' (communication), and "
        "TPS x TPOT (420 and 348 tokens) is not the batch of 128",
    ),
    phase_of_tps="prefill",
)

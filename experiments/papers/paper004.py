"""Paper 004: head-group x head-dim slicing (m x n = 4 x 4) on a 4-layer MoE (8 experts) and on
the same model dense."""

from experiments.papers import Claim, Experiment, shrink
from jaxmoe.config import ModelConfig

FULL = ModelConfig(
    name="paper004",
    vocab_size=50257,
    d_model=8192,
    n_heads=16,
    head_dim=512,
    d_ff=32768,
    n_layers=4,
    moe_every=1,
    n_experts=8,
    top_k=2,
    capacity_factor=1.25,
    expert_form="gelu",
    moe_group_size=1000,
    dtype="float16",
    param_dtype="float16",
    batch=1024,
    seq_len=10_000,
)

# the paper's other model: the same 4 layers, every MLP dense (its claims carry it)
DENSE = FULL.replace(moe_every=0)

TABLE = "Results Table, '4-layer MoE'"
DENSE_TABLE = "Results Table, '4-layer Dense'"

EXPERIMENT = Experiment(
    name="paper004",
    paper="004_5ebc8ae348a98af5.txt",
    title="head x dim slicing, dense and MoE",
    full=FULL,
    tiny=shrink(FULL),
    strategies=("tp8_pp2", "heads_dims_4x4"),
    hardware="h100x16",
    claims=(
        Claim(
            "tp8_pp2",
            tps=850_000,
            tpot_ms=0.45,
            source=f"{TABLE}, 'Baseline (TP=8, PP=2)': 850,000 TPS, 0.45 ms",
        ),
        Claim(
            "heads_dims_4x4",
            tps=1_150_000,
            tpot_ms=0.30,
            source=f"{TABLE}, 'Proposed (m x n=16)': 1,150,000 TPS, 0.30 ms",
        ),
        Claim(
            "tp8_pp2",
            tps=1_200_000,
            tpot_ms=0.35,
            source=f"{DENSE_TABLE}, 'Baseline (TP=8, PP=2)': 1,200,000 TPS, 0.35 ms",
            model=DENSE,
        ),
        Claim(
            "heads_dims_4x4",
            tps=1_580_000,
            tpot_ms=0.22,
            source=f"{DENSE_TABLE}, 'Proposed (m x n=16)': 1,580,000 TPS, 0.22 ms",
            model=DENSE,
        ),
    ),
    notes=(
        "the paper tests a 4-layer dense and a 4-layer MoE model: the MoE one (moe_every=1, 8 "
        "experts) is the experiment's model, the dense one (moe_every=0, all else the same) is "
        "bounded beside it for its own claims",
        "the dense figures (1,200,000 / 0.35 ms, 1,580,000 / 0.22 ms) are paper 002's for "
        "another model (16 layers, D 4096, B 128)",
        "D = 16 heads x 512 = 8192 (the paper gives heads and head dim only)",
        "the paper never states the expert form; a GELU 2-matrix expert is assumed",
        "top_k and capacity factor unstated: top-2 and 1.25 (GShard) assumed",
        "sequence length unstated: 10,000 as in papers 002 and 003 (strategies.md)",
        "vocabulary unstated: GPT-2's 50257 assumed",
        "'Mixed precision (FP16)': float16 weights and compute",
        "routing groups of 1000 tokens (10 per sequence)",
        "pipeline micro-batches unstated: 4 assumed (bubble 1/5)",
        "hardware: '16 NVIDIA H100 GPUs', no node size: 2 nodes of 8 assumed",
        "baseline expert placement unstated: experts over tensor (tp8_pp2, 1 per GPU) assumed",
        "8 experts do not split 16 ways, so ep16 cannot run this model (the paper does not "
        "compare it)",
        "TPS read as prefill: TPOT is 'synchronization and communication overhead time per "
        "token', and TPS x TPOT (383 and 345 tokens) is not the batch of 1024",
        "at B 1024 x S 10,000 the KV cache (about 1.34 TB) does not fit 16 x 80 GB",
    ),
    phase_of_tps="prefill",
)

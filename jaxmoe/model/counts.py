"""Parameter counts from the config alone: in total, and active per token (the experts a token
is routed to, not all of them), as model cards quote them."""

import dataclasses

from jaxmoe.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # used for one token: every dense weight, top_k of each MoE layer's experts


def attention_params(cfg: ModelConfig) -> int:
    """One layer's attention weights and both its norms."""
    d, h, k = cfg.d_model, cfg.n_heads, cfg.head_dim
    norms = 2 * d
    if not cfg.is_mla:
        return norms + 2 * d * h * k + 2 * d * cfg.kv_heads * k  # q, out; k, v
    r, rq, kr, kv = cfg.kv_lora_rank, cfg.q_lora_rank, cfg.rope_head_dim, cfg.value_head_dim
    queries = (d * rq + rq + rq * h * (k + kr)) if rq else d * h * (k + kr)
    keys_values = d * r + r + d * kr + r * h * (k + kv)  # latent, its norm, rotary key, expansions
    return norms + queries + keys_values + h * kv * d


def mlp_params(cfg: ModelConfig, width: int, form: str) -> int:
    return (3 if form == "swiglu" else 2) * cfg.d_model * width


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, v = cfg.d_model, cfg.padded_vocab
    heads = 1 if cfg.tie_embeddings else 2
    positions = cfg.position_rows * d if cfg.positions == "learned" else 0
    tables = heads * v * d + positions + d  # token and head tables, positions, final norm
    dense = cfg.n_dense_layers * (attention_params(cfg) + mlp_params(cfg, cfg.d_ff, cfg.mlp_form))
    shared = mlp_params(cfg, cfg.shared_hidden, cfg.expert_form) if cfg.n_shared_experts else 0
    moe = cfg.n_moe_layers * (attention_params(cfg) + d * cfg.n_experts + shared)  # + the router
    expert = mlp_params(cfg, cfg.expert_hidden, cfg.expert_form)
    total = tables + dense + moe + cfg.n_moe_layers * cfg.n_experts * expert
    active = tables + dense + moe + cfg.n_moe_layers * cfg.top_k * expert
    return ParamCounts(total, active)

"""Parameter counts from the config alone: in total, and active per token (the experts a token
is routed to, not all of them), as model cards quote them."""

import dataclasses

from jaxmoe.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # used for one token: every dense weight, top_k of each MoE layer's experts


def param_counts(cfg: ModelConfig) -> ParamCounts:
    d, v = cfg.d_model, cfg.padded_vocab
    tables = 2 * v * d + cfg.seq_len * d + d  # token and head tables, positions, final norm
    attention = 4 * d * cfg.n_heads * cfg.head_dim + 2 * d  # q, k, v, out; both norms
    expert = (3 if cfg.expert_form == "swiglu" else 2) * d * cfg.d_ff
    dense = cfg.n_dense_layers * (attention + 2 * d * cfg.d_ff)
    moe = cfg.n_moe_layers * (attention + d * cfg.n_experts)  # the router
    total = tables + dense + moe + cfg.n_moe_layers * cfg.n_experts * expert
    active = tables + dense + moe + cfg.n_moe_layers * cfg.top_k * expert
    return ParamCounts(total, active)

"""Textbook collective volumes (strategies.md): bytes ONE device sends, for a full array of `size`
bytes spread over `n` devices on the axis (ring algorithms); and the arrays layouts move."""

from jaxmoe.config import ModelConfig


def activation_bytes(cfg: ModelConfig) -> float:
    """A whole [B, S, D] activation in the compute dtype."""
    return cfg.tokens * cfg.d_model * cfg.compute_dtype.itemsize


def slots_bytes(cfg: ModelConfig) -> float:
    """The whole dispatched (or returning) expert tensor [E, G, C, D] in the compute dtype."""
    return cfg.n_groups * cfg.n_experts * cfg.capacity * cfg.d_model * cfg.compute_dtype.itemsize


def all_reduce(size: float, n: int) -> float:
    return 2 * size * (n - 1) / n


def all_gather(size: float, n: int) -> float:
    return size * (n - 1) / n


def all_to_all(size: float, n: int) -> float:
    return size * (n - 1) / n**2


def layer_weights(cfg: ModelConfig) -> dict[str, float]:
    """Bytes of one layer's weights in the parameter dtype, by part: attention, the dense MLP,
    all experts, and the rest of an MoE layer (router) and of every layer (norms)."""
    size = cfg.weight_dtype.itemsize
    matrices = 3 if cfg.expert_form == "swiglu" else 2
    return {
        "attention": 4 * cfg.d_model * cfg.n_heads * cfg.head_dim * size,
        "mlp": 2 * cfg.d_model * cfg.d_ff * size,
        "experts": matrices * cfg.n_experts * cfg.d_model * cfg.d_ff * size,
        "router": cfg.d_model * cfg.n_experts * size,
        "norms": 2 * cfg.d_model * size,
    }

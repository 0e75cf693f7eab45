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


def vocabulary_bytes(cfg: ModelConfig, split: int, embed_groups: int, head_groups: int) -> float:
    """A training step's least bytes for a vocabulary split over `split` devices: the embedding's
    partial rows summed to where the batch is (a reduce-scatter over the devices that also split
    the batch, an all-reduce over the rest) and its gradient gathered back, an all-reduce's
    volume in all whatever the batch's split; the LM head's inputs gathered and their gradient
    summed back, the same; and the loss's three float32 statistics per token (the max, the sum
    of exponentials, the target's logit) all-reduced. `embed_groups` and `head_groups`: the
    groups the batch is split into where the embedding and the head run."""
    if split == 1:
        return 0.0
    act = activation_bytes(cfg)
    stats = 3 * 4 * cfg.tokens / head_groups
    return (
        all_reduce(act / embed_groups, split)
        + all_reduce(act / head_groups, split)
        + all_reduce(stats, split)
    )


def gates_bytes(cfg: ModelConfig) -> float:
    """Every token's gate per expert [G, S, E] in float32."""
    return 4 * cfg.tokens * cfg.n_experts


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

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

"""Textbook collective volumes (strategies.md): bytes ONE device sends, for a full array of `size`
bytes spread over `n` devices on the axis (ring algorithms)."""


def all_reduce(size: float, n: int) -> float:
    return 2 * size * (n - 1) / n


def all_gather(size: float, n: int) -> float:
    return size * (n - 1) / n


def all_to_all(size: float, n: int) -> float:
    return size * (n - 1) / n**2

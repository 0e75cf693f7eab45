"""Timing of compiled steps: warm-up calls, then measured calls, each blocked on its result.

Compilation belongs to the caller (`.lower(...).compile()` before timing) or to the warm-up
calls; neither is measured. The statistics are the ones a noisy machine needs: the median, the
standard deviation, and a distribution-free 95% confidence interval of the median (order
statistics of the binomial(n, 1/2) ranks), so no normality is assumed.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax

Z95 = 1.959964  # the two-sided 95% quantile of the standard normal


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds per call of the measured calls, in the order they ran."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a timing needs at least one measured call")

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def std(self) -> float:
        return statistics.stdev(self.samples) if len(self.samples) > 1 else 0.0

    @property
    def ci95(self) -> tuple[float, float]:
        """A 95% confidence interval of the median: the order statistics at ranks
        n/2 -+ 1.96 sqrt(n)/2 (the whole range when n is too small to say more)."""
        ordered = sorted(self.samples)
        n = len(ordered)
        half = Z95 * math.sqrt(n) / 2
        low = max(math.floor(n / 2 - half), 0)
        high = min(math.ceil(n / 2 + half), n - 1)
        return ordered[low], ordered[high]

    def summary(self) -> dict[str, Any]:
        low, high = self.ci95
        return {
            "median_s": self.median,
            "mean_s": self.mean,
            "std_s": self.std,
            "ci95_s": [low, high],
            "calls": len(self.samples),
        }


def time_calls(
    fn: Callable[..., Any],
    *,
    warmup: int,
    iters: int,
    setup: Callable[[], tuple] = tuple,
) -> Timing:
    """Call `fn(*setup())` `warmup` times untimed, then `iters` times timed. `setup` runs before
    each call, untimed (and blocked on), for inputs a call consumes, such as a donated cache.
    Every call blocks until its result is ready: JAX dispatches asynchronously, so an unblocked
    call would time only the dispatch."""
    if warmup < 0 or iters < 1:
        raise ValueError(f"warmup={warmup}, iters={iters}: need warmup >= 0 and iters >= 1")
    samples = []
    for i in range(warmup + iters):
        args = jax.block_until_ready(setup())
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        if i >= warmup:
            samples.append(time.perf_counter() - start)
    return Timing(tuple(samples))

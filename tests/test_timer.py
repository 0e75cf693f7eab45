"""The timer's statistics, on exact samples and on a sleep-based workload (no speed asserted:
sleeping gives each call a floor, never a ceiling)."""

import time

import numpy as np
import pytest

from jaxmoe.timer import Timing, time_calls


def test_statistics_of_known_samples():
    t = Timing(tuple(float(i) for i in range(1, 101)))  # 1 .. 100
    assert t.median == 50.5
    assert t.mean == 50.5
    assert t.std == pytest.approx(np.std(np.arange(1, 101), ddof=1))
    # ranks 50 -+ 1.96 * sqrt(100) / 2 = 40.2 .. 59.8 -> order statistics 40 and 60 (0-based)
    assert t.ci95 == (41.0, 61.0)
    assert Timing((3.0,)).ci95 == (3.0, 3.0) and Timing((3.0,)).std == 0.0


def test_sleep_workload_counts_only_measured_calls_and_blocks():
    calls, setups = [], []
    pattern = [0.01, 0.03]  # alternating short and long calls

    def work(tag):
        calls.append(tag)
        time.sleep(pattern[len(calls) % 2])
        return np.zeros(1)

    def setup():
        setups.append(len(calls))
        return (len(setups),)

    t = time_calls(work, warmup=3, iters=12, setup=setup)
    assert len(t.samples) == 12 and len(calls) == 15 and len(setups) == 15
    assert calls == list(range(1, 16))  # each call got the fresh value its setup made
    assert min(t.samples) >= 0.01  # no sample shorter than its sleep
    assert sorted(t.samples)[6] >= 0.03  # half the measured calls slept 30 ms
    low, high = t.ci95
    assert low <= t.median <= high
    assert t.std > 0.005  # the two kinds of call differ by 20 ms


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="iters"):
        time_calls(lambda: None, warmup=0, iters=0)
    with pytest.raises(ValueError, match="at least one"):
        Timing(())

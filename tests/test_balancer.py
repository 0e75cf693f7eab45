"""The attention/expert balancer, on synthetic measurements from a known cost model.

The cost model mimics the physics of strategy D: attention work splits over its `a` devices;
expert work (top_k expert passes per token) splits over `e` devices, and each micro-batch also
reads the experts' weights once (the decode effect: w / e seconds, whatever the token count).
"""

import numpy as np
import pytest

from jaxmoe.balancer import (
    Rebalancer,
    Sample,
    StepTimeModel,
    choose_split,
    pingpong_step_s,
    recommend_devices,
)
from jaxmoe.config import ConfigError

C0 = 50e-6  # seconds of fixed cost per micro-batch on each side (launch, transfer latency)
C1 = 1e-7  # attention seconds per token on one device
C2 = 2e-7  # expert seconds per token per expert pass on one device
TOP_K = 2
W = 2e-3  # seconds to read every expert's weights on one device
NOISE = 0.02  # multiplicative measurement noise
DEVICES = 16


class TrueCost:
    """The cost model the samples come from, as a predictor."""

    def predict(self, tokens: float, attn_devices: int, expert_devices: int):
        attn = C1 * tokens / attn_devices + C0
        expert = C2 * tokens * TOP_K / expert_devices + W / expert_devices + C0
        return attn, expert


TRUE = TrueCost()


def samples(n: int, seed: int) -> list[Sample]:
    """n micro-batches of 32..65536 tokens (log-uniform) on splits a + e = 16, noisy."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        tokens = int(np.exp(rng.uniform(np.log(32), np.log(65536))))
        a = int(rng.integers(1, DEVICES))
        attn, expert = TRUE.predict(tokens, a, DEVICES - a)
        noise = 1 + NOISE * rng.standard_normal(2)
        out.append(Sample(tokens, a, DEVICES - a, attn * noise[0], expert * noise[1]))
    return out


def true_step_s(plan, total_tokens: int) -> float:
    """The true seconds of a plan's step under the cost model."""
    m = plan.micro_batches
    ta, te = TRUE.predict(total_tokens / m, plan.attn_devices, plan.expert_devices)
    return pingpong_step_s(ta, te, m)


@pytest.fixture(scope="module")
def model() -> StepTimeModel:
    return StepTimeModel.fit(samples(200, seed=0), seed=0)


def test_fit_predicts_held_out_samples(model):
    err = model.relative_error(samples(100, seed=1))
    assert err["attn_median"] < 0.10 and err["expert_median"] < 0.10, f"held-out errors {err}"


def test_fit_is_deterministic(model):
    again = StepTimeModel.fit(samples(200, seed=0), seed=0)
    other = StepTimeModel.fit(samples(200, seed=0), seed=1)
    tokens, a = np.array([64, 1000, 50000]), np.array([12, 8, 3])
    first = model.predict_many(tokens, a, DEVICES - a)
    np.testing.assert_array_equal(first, again.predict_many(tokens, a, DEVICES - a))
    assert not np.array_equal(first, other.predict_many(tokens, a, DEVICES - a))


def test_prefill_wants_more_expert_devices_than_12_to_4(model):
    tokens = 65536
    paper = choose_split(model, tokens)  # the paper's 12:4
    best = recommend_devices(model, tokens)
    optimum = recommend_devices(TRUE, tokens)
    assert best.expert_devices > 4 and best.imbalance < paper.imbalance, (best, paper)
    assert true_step_s(best, tokens) < 1.05 * optimum.step_s, (best, optimum)
    assert true_step_s(best, tokens) < true_step_s(paper, tokens) / 1.5, (best, paper)
    # Once balanced, ping-pong pays: the two sides overlap.
    assert optimum.micro_batches > 1 and best.gain_vs_no_pingpong > 1.1, (best, optimum)
    even = recommend_devices(model, tokens, n_experts=16)
    assert 16 % even.expert_devices == 0 and even.attn_devices + even.expert_devices == DEVICES


def test_pingpong_does_not_pay_when_weight_reads_dominate(model):
    tokens = 256
    _, expert = TRUE.predict(tokens, 12, 4)
    weight_reads = W / 4
    assert weight_reads > 0.8 * expert  # the design: reading weights is most of the expert side
    optimum = choose_split(TRUE, tokens)
    chosen = choose_split(model, tokens)
    assert optimum.micro_batches == 1, optimum  # each micro-batch re-reads the weights
    assert chosen.micro_batches == optimum.micro_batches or chosen.gain_vs_no_pingpong < 1.05
    assert true_step_s(chosen, tokens) < 1.05 * optimum.step_s, (chosen, optimum)


@pytest.mark.parametrize(("expert_s", "fires"), [(1.03, False), (1.10, True)])
def test_rebalancer_checks_every_n_steps_above_threshold(expert_s, fires):
    balancer = Rebalancer(every=10, threshold=0.05)
    fired = [step for step in range(1, 31) if balancer.observe(step, 1.0, expert_s)]
    assert fired == ([10, 20, 30] if fires else [])


def test_rebalancer_window_forgets_old_steps():
    balancer = Rebalancer(every=10, threshold=0.05)
    assert [balancer.observe(s, 1.0, 1.5) for s in range(1, 11)][-1]
    assert not any(balancer.observe(s, 1.0, 1.0) for s in range(11, 21))
    assert balancer.imbalance() == 0.0


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: Rebalancer(every=0), "every"),
        (lambda: Rebalancer(threshold=0.0), "threshold"),
        (lambda: Rebalancer().observe(1, -1.0, 1.0), "attn_s"),
        (lambda: Sample(0, 12, 4, 1.0, 1.0), "tokens"),
        (lambda: Sample(256, 12, 0, 1.0, 1.0), "expert_devices"),
        (lambda: Sample(256, 12, 4, 1.0, float("nan")), "expert_s"),
        (lambda: StepTimeModel.fit([]), "samples"),
        (lambda: choose_split(TRUE, 0), "total_tokens"),
        (lambda: choose_split(TRUE, 256, micro_batches_options=(0, 2)), "micro_batches_options"),
        (lambda: recommend_devices(TRUE, 256, total_devices=1), "total_devices"),
        (lambda: recommend_devices(TRUE, 256, n_experts=0), "n_experts"),
    ],
)
def test_bad_inputs_name_the_field_in_one_line(call, field):
    with pytest.raises(ConfigError, match=f"^{field}=") as err:
        call()
    assert "\n" not in str(err.value) and "; " in str(err.value)

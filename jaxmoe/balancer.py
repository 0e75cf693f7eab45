"""The load balancer of attention/expert separation (paper 001, strategy D), on measurements.

Attention runs on `a` devices and the experts on `e` others; hidden states go from one side to
the other and back each layer, and micro-batches ping-pong so both sides stay busy. Three parts:

- `StepTimeModel`, the paper's small predictor: a 3-layer MLP from (tokens, a, e) to the seconds
  of each side for one micro-batch, fitted to measured `Sample`s.
- `choose_split` / `recommend_devices`: the micro-batch count (and device split) whose predicted
  ping-pong step is shortest, with what ping-pong gains over no overlap.
- `Rebalancer`, the paper's periodic check: every `every` steps, is one side more than
  `threshold` slower than the other?

Nothing here knows about meshes or models: only tokens, device counts and seconds.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxmoe.config import fail

HIDDEN = 32  # units in each of the MLP's two hidden layers
LEARNING_RATE = 1e-2  # Adam, cosine-decayed to 1% of this over the fit
FIELDS = ("tokens", "attn_devices", "expert_devices")  # what the predictor reads


def _positive(field: str, value: float) -> None:
    if not 0 < value < math.inf:  # also catches NaN
        fail(field, value, "must be positive and finite", "pass a measured value above 0")


@dataclasses.dataclass(frozen=True)
class Sample:
    """One measured micro-batch: its tokens, the device split, and each side's seconds."""

    tokens: int
    attn_devices: int
    expert_devices: int
    attn_s: float
    expert_s: float

    def __post_init__(self) -> None:
        for field in (*FIELDS, "attn_s", "expert_s"):
            _positive(field, getattr(self, field))


class Predictor(Protocol):
    """Anything that predicts (attention seconds, expert seconds) of one micro-batch."""

    def predict(
        self, tokens: float, attn_devices: int, expert_devices: int
    ) -> tuple[float, float]: ...


def features(tokens, attn_devices, expert_devices) -> np.ndarray:
    """Raw features [N, 5]: log T, 1/a, 1/e, log(T/a), log(T/e). Logs, not T/a itself: times
    span decades, and the fit is of log-seconds (relative error)."""
    t, a, e = (np.asarray(v, dtype=np.float64) for v in (tokens, attn_devices, expert_devices))
    return np.stack([np.log(t), 1 / a, 1 / e, np.log(t / a), np.log(t / e)], axis=-1)


def _inputs(samples: Sequence[Sample]) -> list[np.ndarray]:
    """Tokens, attention devices and expert devices of the samples, as three arrays."""
    return [np.array([getattr(s, field) for s in samples]) for field in FIELDS]


class _MLP(nnx.Module):
    """Two hidden layers of `HIDDEN` units, SiLU, then 2 outputs (attention, expert)."""

    def __init__(self, n_in: int, *, rngs: nnx.Rngs):
        self.hidden1 = nnx.Linear(n_in, HIDDEN, rngs=rngs)
        self.hidden2 = nnx.Linear(HIDDEN, HIDDEN, rngs=rngs)
        self.out = nnx.Linear(HIDDEN, 2, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:  # [N, 5] -> [N, 2]
        x = nnx.silu(self.hidden1(x))
        x = nnx.silu(self.hidden2(x))
        return self.out(x)


@jax.jit(static_argnames=("graphdef", "steps"))
def _train(graphdef, params, x, y, steps: int):
    """Full-batch Adam on the mean squared error, all `steps` in one compiled scan."""
    tx = optax.adam(optax.cosine_decay_schedule(LEARNING_RATE, steps, alpha=0.01))

    def loss(p):
        return jnp.mean((nnx.merge(graphdef, p)(x) - y) ** 2)

    def step(carry, _):
        p, opt = carry
        value, grads = jax.value_and_grad(loss)(p)
        updates, opt = tx.update(grads, opt, p)
        return (optax.apply_updates(p, updates), opt), value

    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return params, losses


class StepTimeModel:
    """Predicts the seconds of each side for one micro-batch; fit it with `StepTimeModel.fit`."""

    def __init__(self, mlp: _MLP, x_stats: tuple, y_stats: tuple, final_loss: float):
        self._mlp = mlp
        self._x_mean, self._x_std = x_stats
        self._y_mean, self._y_std = y_stats
        self.final_loss = final_loss  # training MSE of the standardised log-seconds

    @classmethod
    def fit(cls, samples: Sequence[Sample], *, steps: int = 2000, seed: int = 0) -> StepTimeModel:
        """Fit log-seconds of both sides; features and targets standardised by the samples'
        own mean and spread. Deterministic given `seed`."""
        if len(samples) < 2:
            fail("samples", len(samples), "need at least 2 to fit", "measure more micro-batches")
        if steps < 1:
            fail("steps", steps, "must be positive", "pass steps=1 or more")
        x = features(*_inputs(samples))
        y = np.log([(s.attn_s, s.expert_s) for s in samples])
        x_stats = x.mean(0), np.where(x.std(0) > 0, x.std(0), 1.0)
        y_stats = y.mean(0), np.where(y.std(0) > 0, y.std(0), 1.0)
        mlp = _MLP(x.shape[1], rngs=nnx.Rngs(seed))
        graphdef, params = nnx.split(mlp)
        xs = jnp.asarray((x - x_stats[0]) / x_stats[1], jnp.float32)
        ys = jnp.asarray((y - y_stats[0]) / y_stats[1], jnp.float32)
        params, losses = _train(graphdef, params, xs, ys, steps)
        return cls(nnx.merge(graphdef, params), x_stats, y_stats, float(losses[-1]))

    def predict_many(self, tokens, attn_devices, expert_devices) -> np.ndarray:
        """Seconds [N, 2] (attention, expert) for arrays of tokens and device counts."""
        x = (features(tokens, attn_devices, expert_devices) - self._x_mean) / self._x_std
        z = np.asarray(self._mlp(jnp.asarray(np.atleast_2d(x), jnp.float32)), np.float64)
        return np.exp(z * self._y_std + self._y_mean)

    def predict(self, tokens: float, attn_devices: int, expert_devices: int) -> tuple[float, float]:
        """Seconds (attention, expert) of one micro-batch of `tokens` tokens."""
        for field, value in zip(FIELDS, (tokens, attn_devices, expert_devices), strict=True):
            _positive(field, value)
        ta, te = self.predict_many([tokens], [attn_devices], [expert_devices])[0]
        return float(ta), float(te)

    def relative_error(self, samples: Sequence[Sample]) -> dict[str, float]:
        """|predicted - measured| / measured of each side on (held-out) samples: median, max."""
        if not samples:
            fail("samples", 0, "nothing to score", "pass held-out samples")
        pred = self.predict_many(*_inputs(samples))
        true = np.array([(s.attn_s, s.expert_s) for s in samples])
        err = np.abs(pred - true) / true
        stats = {"median": np.median, "max": np.max}
        sides = {"attn": err[:, 0], "expert": err[:, 1]}
        return {f"{side}_{k}": float(f(e)) for side, e in sides.items() for k, f in stats.items()}


@dataclasses.dataclass(frozen=True)
class Split:
    """A chosen plan: micro-batches and device split, with the predicted per-micro-batch seconds
    of each side, the step's seconds, the imbalance |ta - te| / max(ta, te), and the step time
    without ping-pong (m = 1, same devices) divided by this one."""

    micro_batches: int
    attn_devices: int
    expert_devices: int
    step_s: float
    attn_s: float
    expert_s: float
    imbalance: float
    gain_vs_no_pingpong: float


def pingpong_step_s(attn_s: float, expert_s: float, micro_batches: int) -> float:
    """A two-stage pipeline of m micro-batches: ta + te + (m - 1) * max(ta, te)."""
    return attn_s + expert_s + (micro_batches - 1) * max(attn_s, expert_s)


def choose_split(
    model: Predictor,
    total_tokens: int,
    *,
    micro_batches_options: Iterable[int] = (1, 2, 4, 8),
    device_splits: Iterable[tuple[int, int]] = ((12, 4),),
) -> Split:
    """The (m, a, e) with the shortest predicted step. Each of the m micro-batches carries
    total_tokens / m tokens; attention and experts form a two-stage pipeline, so the step takes
    ta + te + (m - 1) * max(ta, te). Ties go to the fewer micro-batches."""
    _positive("total_tokens", total_tokens)
    options = sorted(set(micro_batches_options))
    splits = list(device_splits)
    if not options or min(options) < 1:
        fail("micro_batches_options", options, "need positive counts", "pass e.g. (1, 2, 4, 8)")
    if not splits or min(min(s) for s in splits) < 1:
        fail("device_splits", splits, "need (a, e) pairs of positive counts", "e.g. ((12, 4),)")
    best, best_key = None, None
    for (a, e), m in itertools.product(splits, options):
        ta, te = model.predict(total_tokens / m, a, e)
        step = pingpong_step_s(ta, te, m)
        if best_key is None or (step, m) < best_key:
            best_key = (step, m)
            no_overlap = sum(model.predict(total_tokens, a, e))
            best = Split(m, a, e, step, ta, te, abs(ta - te) / max(ta, te), no_overlap / step)
    return best


def recommend_devices(
    model: Predictor,
    total_tokens: int,
    total_devices: int = 16,
    *,
    n_experts: int | None = None,
    micro_batches_options: Iterable[int] = (1, 2, 4, 8),
) -> Split:
    """Beyond the paper: try every a + e = total_devices (both >= 1; e dividing `n_experts`
    when given, so experts spread evenly) and return the best `choose_split`."""
    if total_devices < 2:
        fail("total_devices", total_devices, "need 2 or more", "give each side a device")
    if n_experts is not None and n_experts < 1:
        fail("n_experts", n_experts, "must be positive", "pass the model's expert count or None")
    splits = [
        (total_devices - e, e)
        for e in range(1, total_devices)
        if n_experts is None or n_experts % e == 0
    ]
    return choose_split(
        model, total_tokens, micro_batches_options=micro_batches_options, device_splits=splits
    )


class Rebalancer:
    """The paper's periodic check: every `every` steps, compare the mean seconds of the two
    sides over the last `every` observations; rebalance when they differ by more than
    `threshold` of the larger."""

    def __init__(self, every: int = 100, threshold: float = 0.05):
        if every < 1:
            fail("every", every, "must be a positive step count", "pass every=1 or more")
        if not threshold > 0:
            fail("threshold", threshold, "must be positive", "pass e.g. threshold=0.05")
        self.every = every
        self.threshold = threshold
        self._window: collections.deque[tuple[float, float]] = collections.deque(maxlen=every)

    def imbalance(self) -> float:
        """|mean attention - mean expert| / the larger, over the window (0 when empty)."""
        if not self._window:
            return 0.0
        ta, te = np.mean(self._window, axis=0)
        return float(abs(ta - te) / max(ta, te))

    def observe(self, step: int, attn_s: float, expert_s: float) -> bool:
        """Record one step's seconds of each side; True when `step` is a multiple of `every`
        and the window's imbalance exceeds `threshold`."""
        if step < 0:
            fail("step", step, "must not be negative", "count steps from 0")
        _positive("attn_s", attn_s)
        _positive("expert_s", expert_s)
        self._window.append((attn_s, expert_s))
        return step % self.every == 0 and self.imbalance() > self.threshold

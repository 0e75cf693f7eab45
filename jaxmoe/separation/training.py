"""Training with attention and experts on two sub-meshes: the papers' recipe, and the balancer.

The optimizer is the recipe's (global-norm clipping, then AdamW with its schedule), applied on each
mesh to that mesh's parameters: the global norm is summed from both meshes' squared norms, and
each side's AdamW state lives with its parameters. The step's losses and gradients are those of
the one-device model (`Separated.loss_and_grads`).

The balancer (paper 001): at the start, each side's piece is timed at every micro-batch count that
fits, the 3-layer MLP predictor is fitted to those samples, and the run takes the micro-batch
count it predicts fastest. Every step's timeline gives each mesh's busy time; every
`rebalance_every` steps, when the two sides' mean busy times differ by more than
`rebalance_threshold`, the pieces are timed afresh, the predictor refitted and the micro-batch
count chosen again (the device split is fixed for a run: `bench_separation` and the bound
recommend one).
Changing it changes how the batch is cut, never the model's arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import SingleDeviceSharding

from jaxmoe.balancer import Rebalancer, Sample, StepTimeModel, choose_split
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model import Transformer
from jaxmoe.separation.balance import measure_pieces
from jaxmoe.separation.layout import Separation
from jaxmoe.separation.params import SepParams
from jaxmoe.separation.runner import Separated
from jaxmoe.separation.saved import SavedForm
from jaxmoe.separation.timeline import Timeline
from jaxmoe.sharding import with_shardings
from jaxmoe.train import recipe
from jaxmoe.train.steps import FINITE, all_finite, keep_unless, like_params

MICRO_BATCH_OPTIONS = (1, 2, 4, 8)


class SeparatedTrainer:
    """The `Trainer` interface (`init`, `step`, `evaluate`, `abstract_state`, `batch_sharding`,
    the checkpoints' form: `abstract_saved`, `to_saved`, `from_saved`) for a separated layout."""

    def __init__(
        self,
        cfg: ModelConfig,
        sep: Separation,
        devices: Sequence[jax.Device],
        tc: recipe.TrainConfig,
        *,
        balance: bool = True,
    ):
        if jax.process_count() > 1:
            raise ConfigError(f"{sep.name} trains in one process; run it without --num-processes")
        self.cfg, self.sep, self.tc, self.devices = cfg, sep, tc, list(devices)
        self.run = Separated(cfg, sep, self.devices)
        self.batch_sharding = SingleDeviceSharding(self.devices[0])
        self.schedule = recipe.schedule(tc)
        tx = recipe.adamw(tc)
        self._tx = tx
        self.update = jax.jit(self._apply, donate_argnums=(0, 1))  # one mesh's update
        self._norm_sq = jax.jit(lambda g: sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))
        abstract = self.run.abstract_params()
        opt = tuple(jax.eval_shape(tx.init, side) for side in abstract.sides)
        opt = tuple(_abstract_state(o, side) for o, side in zip(opt, abstract.sides, strict=True))
        self.abstract_state = (abstract, opt)
        self._saved = SavedForm(cfg, sep, tc, self.devices)
        self.rebalancer = Rebalancer(tc.rebalance_every, tc.rebalance_threshold)
        self.balance = balance
        self.samples: list[Sample] = []
        self.predictor: StepTimeModel | None = None

    # ---- the Trainer interface ----------------------------------------------------------------
    def init(self):
        state = nnx.split(Transformer(self.cfg, nnx.Rngs(self.tc.seed)))[1]
        params = self.run.put(state)
        opt = tuple(self._tx.init(side) for side in params.sides)
        if self.balance:
            self._choose_micro_batches(params)
        return params, opt

    def step(self, params: SepParams, opt_state, batch, step: int):
        batch = np.asarray(batch)
        key = None
        if self.cfg.expert_dropout > 0:
            key = jax.random.fold_in(jax.random.key(self.tc.seed + 1), step)
        with Timeline() as timeline:
            metrics, grads, _ = self.run.loss_and_grads(
                params, batch[:, :-1], batch[:, 1:], key, timeline
            )
        norm = math.sqrt(sum(float(self._norm_sq(side)) for side in grads.sides))
        finite = math.isfinite(norm) and math.isfinite(float(metrics["loss"]))
        if finite:  # else the state stays as it was and the step reports it
            scale = self.tc.grad_clip / max(norm, self.tc.grad_clip)
            sides = [
                self.update(p, o, g, scale)
                for p, o, g in zip(params.sides, opt_state, grads.sides, strict=True)
            ]
            finite = all(bool(ok) for _, _, ok in sides)
            params = SepParams.of_sides(sides[0][0], sides[1][0])
            opt_state = (sides[0][1], sides[1][1])
        busy = timeline.overlap().busy_s
        metrics |= {
            "grad_norm": norm,
            "lr": float(self.schedule(step)),
            "micro_batches": self.run.cfg.micro_batches,
            "attention_busy_s": busy["attention"],
            "expert_busy_s": busy["experts"],
            FINITE: finite,
        }
        if self.rebalancer.observe(step + 1, busy["attention"], busy["experts"]):
            metrics["rebalanced_from"] = self.run.cfg.micro_batches
            if self.balance:  # the machine may have changed: time the pieces afresh
                self.samples.clear()
                self._choose_micro_batches(params)
        return params, opt_state, metrics

    def evaluate(self, params: SepParams, batch) -> float:
        batch = np.asarray(batch)
        return self.run.cross_entropy(params, batch[:, :-1], batch[:, 1:])

    # ---- checkpoints, in the one-mesh layouts' form (`saved`) --------------------------------
    @property
    def abstract_saved(self):
        return self._saved.abstract

    def to_saved(self, state):
        return self._saved.save(*state)

    def from_saved(self, saved):
        shardings = jax.tree.map(lambda a: a.sharding, self.abstract_state)
        return jax.device_put(self._saved.restore(saved), shardings)

    # ---- pieces ----------------------------------------------------------------------------------
    def _apply(self, params, opt_state, grads, scale):
        """One side's update, or its state unchanged (and False) if that would not be finite."""
        grads = jax.tree.map(lambda g: g * scale, grads)
        updates, new_opt_state = self._tx.update(grads, opt_state, params)
        new = (optax.apply_updates(params, updates), new_opt_state)
        finite = all_finite(new)
        return (*keep_unless(finite, new, (params, opt_state)), finite)

    def _choose_micro_batches(self, params: SepParams) -> None:
        """Time both pieces at every micro-batch count that fits (once each), fit the predictor
        and run at the count it predicts fastest."""
        known = {s.tokens for s in self.samples}
        options = []
        for m in MICRO_BATCH_OPTIONS:
            try:
                run = Separated(self.cfg.replace(micro_batches=m), self.sep, self.devices)
            except ConfigError:
                continue
            options.append(m)
            if run.rows * self.cfg.seq_len not in known:
                self.samples.append(measure_pieces(run, params, iters=3))
        self.predictor = StepTimeModel.fit(self.samples, steps=500)
        a, x = self.sep.attention.n_devices, self.sep.experts.n_devices
        split = choose_split(
            self.predictor,
            self.cfg.tokens,
            micro_batches_options=options,
            device_splits=((a, x),),
        )
        if split.micro_batches != self.run.cfg.micro_batches:
            self.run = Separated(
                self.cfg.replace(micro_batches=split.micro_batches), self.sep, self.devices
            )


def _abstract_state(opt_state, params):
    """The optimizer state of one mesh's `params` (abstract, with shardings), as abstract
    arrays with shardings: moments like their parameters, step counts replicated."""
    first = jax.tree.leaves(params)[0].sharding
    replicated = jax.sharding.NamedSharding(first.mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda a: a.sharding, params)
    return with_shardings(opt_state, like_params(opt_state, params, shardings, replicated))


__all__ = ["SeparatedTrainer"]

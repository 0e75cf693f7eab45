"""The jitted pieces of training under a strategy: sharded init, train step, evaluation.

Parameters are made where they live (a jitted init with the strategy's output shardings), and
Adam's moments are given their parameters' shardings explicitly (`like_params`), so the
optimizer state is split like the model and checkpoints restore into the same layout. Batches
[B, S + 1] arrive split by rows over every device (each process holds its rows); the model's
constraints lay the tokens out as the strategy wants inside the step.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model import Transformer, loss_fn
from jaxmoe.placement import Placement, place
from jaxmoe.sharding import Strategy, param_shardings, with_shardings
from jaxmoe.train import recipe

FINITE = "finite"  # the step's metric: its loss, gradient norm and new state were all finite


@dataclasses.dataclass(frozen=True)
class Trainer:
    placement: Placement
    tc: recipe.TrainConfig
    batch_sharding: NamedSharding  # [B, S + 1] token rows
    abstract_state: tuple  # (params, opt_state) as ShapeDtypeStructs with shardings
    init: Callable[[], tuple]  # () -> (params, opt_state)
    # (params, opt_state, batch, step) -> (params, opt_state, metrics); a step whose loss,
    # gradient norm or new state is not finite returns the state it was given, and
    # metrics[FINITE] False
    step: Callable
    evaluate: Callable  # (params, batch) -> mean next-token cross-entropy

    @property
    def cfg(self) -> ModelConfig:
        return self.placement.cfg

    # a checkpoint holds the state as it is: the form every one-mesh layout shares (a separated
    # layout converts its own to it)
    @property
    def abstract_saved(self) -> tuple:
        return self.abstract_state

    def to_saved(self, state: tuple) -> tuple:
        return state

    def from_saved(self, saved: tuple) -> tuple:
        return saved


def batch_sharding(placement: Placement) -> NamedSharding:
    """Rows split over every device when they divide, else replicated (one process only)."""
    mesh, cfg = placement.mesh, placement.cfg
    if cfg.batch % mesh.size == 0:
        return NamedSharding(mesh, PartitionSpec(mesh.axis_names))
    if jax.process_count() > 1:
        raise ConfigError(
            f"batch={cfg.batch} does not split over {mesh.size} devices in "
            f"{jax.process_count()} processes; choose batch as a multiple of {mesh.size}"
        )
    return NamedSharding(mesh, PartitionSpec())


def make_trainer(
    cfg: ModelConfig, strategy: Strategy, devices: Sequence[jax.Device], tc: recipe.TrainConfig
) -> Trainer:
    placement = place(cfg, strategy, devices)
    graphdef, tx, schedule = placement.graphdef, recipe.optimizer(tc), recipe.schedule(tc)
    rows = batch_sharding(placement)
    replicated = NamedSharding(placement.mesh, PartitionSpec())

    def make_params():
        return nnx.split(Transformer(cfg, nnx.Rngs(tc.seed)))[1]

    init_params = jax.jit(make_params, out_shardings=placement.shardings)
    opt_shardings = like_params(
        jax.eval_shape(tx.init, placement.abstract),
        placement.abstract,
        param_shardings(placement.abstract, placement.mesh, strategy, optimizer=True),
        replicated,
    )
    opt_init = jax.jit(tx.init, out_shardings=opt_shardings)
    abstract_opt = with_shardings(jax.eval_shape(tx.init, placement.abstract), opt_shardings)

    def init():
        params = init_params()
        return params, opt_init(params)

    def loss_of(params, batch, key):
        model = nnx.merge(graphdef, params)
        return loss_fn(model, batch[:, :-1], batch[:, 1:], key)

    def train_step(params, opt_state, batch, step):
        key = None
        if cfg.is_moe and cfg.expert_dropout > 0:
            key = jax.random.fold_in(jax.random.key(tc.seed + 1), step)
        (_, metrics), grads = jax.value_and_grad(loss_of, has_aux=True)(params, batch, key)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, updates)
        grad_norm = optax.tree.norm(grads)
        metrics |= {"grad_norm": grad_norm, "lr": schedule(step)}
        finite = all_finite((metrics["loss"], grad_norm, new_params, new_opt_state))
        params, opt_state = keep_unless(finite, (new_params, new_opt_state), (params, opt_state))
        return params, opt_state, metrics | {FINITE: finite}

    def evaluate(params, batch):
        return loss_of(params, batch, None)[1]["ce_loss"]

    state_shardings = (placement.shardings, opt_shardings)
    return Trainer(
        placement=placement,
        tc=tc,
        batch_sharding=rows,
        abstract_state=(placement.abstract_params(), abstract_opt),
        init=init,
        step=placement.jit(
            train_step,
            in_shardings=(*state_shardings, rows, replicated),
            out_shardings=(*state_shardings, replicated),
            donate_argnums=(0, 1),
        ),
        evaluate=placement.jit(
            evaluate, in_shardings=(placement.shardings, rows), out_shardings=replicated
        ),
    )


def all_finite(tree) -> jax.Array:
    """True when every floating-point value in `tree` is finite (one boolean scalar)."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in leaves]))


def keep_unless(ok: jax.Array, new, old):
    """`new` where `ok`, else `old` (a step that went non-finite leaves the state as it was)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def like_params(opt_state, abstract, shardings, other):
    """Shardings for the optimizer state of parameters `abstract` (shapes) laid out as
    `shardings` (same tree): a leaf whose path ends with a parameter's path (Adam's moments)
    takes that parameter's sharding, the rest (step counts) `other`. (XLA would leave moments
    made by zeros_like replicated: they do not depend on the parameters' values.)"""
    by_path = {
        tuple(path): (leaf.shape, sharding)
        for (path, leaf), sharding in zip(
            jax.tree_util.tree_leaves_with_path(abstract), jax.tree.leaves(shardings), strict=True
        )
    }

    def sharding_of(path, leaf):
        for start in range(len(path)):
            shape, sharding = by_path.get(tuple(path[start:]), (None, None))
            if shape == leaf.shape:
                return sharding
        return other

    return jax.tree_util.tree_map_with_path(sharding_of, opt_state)


def summarize(metrics: dict) -> dict[str, float]:
    """One step's metrics as floats: losses, gradient norm, learning rate, and for an MoE model
    the dropped fraction and the per-expert load's min, max and std (over layers' mean). The
    step's finiteness flag is not among them (`finite` reads it)."""
    out = {k: float(v) for k, v in metrics.items() if np.ndim(v) == 0 and k != FINITE}
    if "expert_load" in metrics:
        load = np.asarray(metrics["expert_load"])  # [E], the MoE layers' mean
        out |= {
            "expert_load_min": float(load.min()),
            "expert_load_max": float(load.max()),
            "expert_load_std": float(load.std()),
        }
    return out


__all__ = ["FINITE", "Trainer", "all_finite", "keep_unless", "make_trainer", "summarize"]

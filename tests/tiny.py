"""The one shared tiny model of the test suite, and helpers to run it under a strategy."""

import jax
import numpy as np

from jaxmoe.compare import random_tokens
from jaxmoe.config import ModelConfig
from jaxmoe.placement import Placement, init_params, loss_and_grad, place
from jaxmoe.sharding import Strategy

DEVICES = 16


def tiny(moe: bool = True, **changes) -> ModelConfig:
    """A model small enough to compile under every strategy in a few seconds."""
    cfg = ModelConfig(
        name="test_moe" if moe else "test_dense",
        vocab_size=300,  # padded to 384 = 16 x 24
        d_model=64,
        n_heads=16,
        head_dim=4,
        d_ff=128,
        n_layers=2,
        moe_every=1 if moe else 0,
        n_experts=16,
        top_k=2,
        capacity_factor=1.25,
        batch=16,
        seq_len=16,
    )
    return cfg.replace(**changes)


def placed(cfg: ModelConfig, strategy: Strategy) -> Placement:
    return place(cfg, strategy, jax.devices()[: strategy.n_devices])


def forward_hlo(cfg: ModelConfig, strategy: Strategy) -> tuple[Placement, jax.stages.Compiled]:
    run = strategy.lay_out(cfg, jax.devices()[: strategy.n_devices])
    return run.placement, run.compile_forward()


def loss_grads(cfg: ModelConfig, strategy: Strategy | None, seed: int = 0, dropout: bool = False):
    """(loss, grads) as numpy, on one device (strategy None) or laid out by `strategy`; with
    `dropout`, expert dropout on (a fixed key)."""
    graphdef, state = init_params(cfg, seed)
    tokens = np.asarray(random_tokens(cfg, seed + 1))
    inputs, targets = tokens, np.roll(tokens, -1, axis=1)
    key = jax.random.key(seed + 2) if dropout else None
    fn = loss_and_grad(graphdef)
    if strategy is None:
        loss, grads = jax.jit(fn)(state, inputs, targets, key)
    else:
        p = placed(cfg, strategy)
        shard = p.token_sharding
        jitted = p.jit(fn, in_shardings=(p.shardings, shard, shard, None))
        tokens = (jax.device_put(t, shard) for t in (inputs, targets))
        loss, grads = jitted(p.put(state), *tokens, key)
    return float(loss), jax.tree.map(np.asarray, jax.tree.leaves(grads))

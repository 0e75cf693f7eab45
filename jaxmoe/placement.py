"""Lay a model over a mesh: abstract parameters -> shardings -> jitted, compiled programs.

Nothing here allocates weights until asked: shapes come from `nnx.eval_shape`, so a full-size
model can be compiled for 16 devices on a laptop CPU.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.model import Transformer, loss_fn
from jaxmoe.sharding import (
    Strategy,
    check_divisible,
    laid_out_jit,
    param_shardings,
    with_shardings,
)

TOKENS = (Axis.BATCH, Axis.SEQ)  # [B, S]


@dataclasses.dataclass(frozen=True)
class Placement:
    """A model config laid out by a strategy on concrete devices."""

    cfg: ModelConfig
    strategy: Strategy
    mesh: Mesh
    graphdef: nnx.GraphDef
    abstract: nnx.State  # parameter shapes and dtypes
    shardings: nnx.State  # NamedSharding per parameter

    @property
    def token_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, self.strategy.spec(TOKENS))

    def abstract_tokens(self) -> jax.ShapeDtypeStruct:
        shape = (self.cfg.batch, self.cfg.seq_len)
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.token_sharding)

    def abstract_params(self) -> nnx.State:
        return with_shardings(self.abstract, self.shardings)

    def put(self, state: nnx.State) -> nnx.State:
        """Copy parameters (e.g. made on one device) into this placement's layout."""
        return jax.device_put(state, self.shardings)

    def jit(self, fn: Callable, **kwargs) -> Callable:
        """`jax.jit` of `fn`, traced with this strategy's activation constraints in force."""
        return laid_out_jit(self.mesh, self.strategy, fn, **kwargs)


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State]:
    return nnx.split(nnx.eval_shape(lambda: Transformer(cfg, nnx.Rngs(0))))


def init_params(cfg: ModelConfig, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """Parameters made on the default device (the one-device reference)."""
    return nnx.split(Transformer(cfg, nnx.Rngs(seed)))


def place(cfg: ModelConfig, strategy: Strategy, devices: Sequence[jax.Device]) -> Placement:
    """Check the config against the strategy, build its mesh and the parameter shardings.

    Raises ConfigError (one line, with the fix) before anything is compiled.
    """
    check_divisible(cfg, strategy)
    mesh = strategy.make_mesh(devices)
    graphdef, abstract = abstract_model(cfg)
    shardings = param_shardings(abstract, mesh, strategy)
    return Placement(cfg, strategy, mesh, graphdef, abstract, shardings)


def forward(graphdef: nnx.GraphDef) -> Callable[[nnx.State, jax.Array], jax.Array]:
    """(params, tokens [B, S]) -> logits [B, S, V]."""

    def fn(state: nnx.State, tokens: jax.Array) -> jax.Array:
        return nnx.merge(graphdef, state)(tokens)[0]

    return fn


def loss_and_grad(graphdef: nnx.GraphDef) -> Callable:
    """(params, inputs, targets, dropout key or None) -> (loss, grads)."""

    def fn(state: nnx.State, inputs: jax.Array, targets: jax.Array, key: jax.Array | None = None):
        def loss_of(s):
            return loss_fn(nnx.merge(graphdef, s), inputs, targets, key)[0]

        return jax.value_and_grad(loss_of)(state)

    return fn


def compiled_param_shardings(
    compiled: jax.stages.Compiled, abstract: nnx.State
) -> dict[str, tuple[jax.ShapeDtypeStruct, jax.sharding.Sharding]]:
    """Each parameter's path (`blocks/moe/attn/wq`), its shape and dtype, and the sharding the
    compiled program gives it (read from the program's input shardings, not from the rules)."""
    shardings = jax.tree.leaves(compiled.input_shardings[0][0])
    with_paths = jax.tree_util.tree_leaves_with_path(abstract)
    return {
        path_name(path): (leaf, sharding)
        for (path, leaf), sharding in zip(with_paths, shardings, strict=True)
    }


def path_name(path: tuple) -> str:
    """A parameter's tree path as `blocks/moe/attn/wq` (the Variable's `value` left out)."""
    names = (str(getattr(k, "key", getattr(k, "name", k))) for k in path)
    return "/".join(names).removesuffix("/value")


def param_specs(compiled: jax.stages.Compiled, abstract: nnx.State) -> dict[str, PartitionSpec]:
    """Each parameter's path and the partition spec the compiled program uses."""
    return {p: s.spec for p, (_, s) in compiled_param_shardings(compiled, abstract).items()}


def param_bytes_per_device(compiled: jax.stages.Compiled, abstract: nnx.State) -> int:
    """Bytes of parameters one device holds, read from the compiled program's input shardings."""
    return sum(
        math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
        for a, s in compiled_param_shardings(compiled, abstract).values()
    )


def shard_bytes(tree) -> int:
    """Bytes one device holds of these abstract arrays, from their shardings."""
    return sum(
        math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(tree)
    )


def param_bytes_total(abstract: nnx.State) -> int:
    return sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(abstract))

"""A separated training state in the form one-mesh layouts save: the model's own parameters
(heads unpadded, blocks stacked) and the optimizer state of `recipe.optimizer` over them, so a
checkpoint moves between ma_separation and every SPMD layout.

The separated state keeps each mesh's parameters apart, with an AdamW state per mesh
(`SeparatedTrainer`). Saved, the two AdamW states become one: each moment (a tree shaped like a
mesh's parameters) is joined into the model's form, and each step count, the same on both
meshes, is kept once; the clipping's empty state goes in front. Restored, the moments are cut
again (masked heads' moments zero, as a fresh state has them). The conversion goes through the
host's memory (ma_separation trains in one process), like the separated parameters' first
placement.
"""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmoe.config import ModelConfig
from jaxmoe.placement import abstract_model
from jaxmoe.separation import params as sp
from jaxmoe.separation.layout import Separation
from jaxmoe.train import recipe


class SavedForm:
    """Between `cfg`'s separated training state under `sep` and the one-mesh form."""

    def __init__(self, cfg: ModelConfig, sep: Separation, tc: recipe.TrainConfig, devices):
        self.cfg, self.sep = cfg, sep
        self.pieces = sp.parts(cfg, sep)
        self.model = abstract_model(cfg)[1]
        self._model_tree = jax.tree.structure(self.model)
        sides = (self.pieces.outer[1], (self.pieces.attention[1],) * cfg.n_blocks)
        self._side_tree = jax.tree.structure(sides)
        mesh = Mesh(np.asarray(devices), ("all",))
        n = len(devices)

        def spread(a):  # every array's first axis over all the devices, where it divides
            split = a.ndim and a.shape[0] % n == 0
            spec = PartitionSpec("all") if split else PartitionSpec()
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

        opt = jax.eval_shape(recipe.optimizer(tc).init, self.model)
        self.abstract = jax.tree.map(spread, (self.model, opt))

    def _join(self, params: sp.SepParams) -> nnx.State:
        return sp.join(params, self.cfg, self.sep, self.model)

    def _cut(self, state: nnx.State) -> sp.SepParams:
        return sp.split(state, self.cfg, self.sep, self.pieces)

    def save(self, params: sp.SepParams, opt_state: tuple) -> tuple:
        """The separated state (parameters, (attention mesh's AdamW state, expert mesh's)) in
        the one-mesh form, on the host."""

        def merge(a, b):
            if jax.tree.structure(a) == self._side_tree:
                return self._join(sp.SepParams.of_sides(a, b))
            if isinstance(a, tuple):
                kids = [merge(x, y) for x, y in zip(a, b, strict=True)]
                return type(a)(*kids) if hasattr(a, "_fields") else tuple(kids)
            return np.asarray(a)  # a step count: the same on both meshes

        return self._join(params), (optax.EmptyState(), merge(*opt_state))

    def restore(self, saved: tuple) -> tuple:
        """The one-mesh form back as (separated parameters, the two meshes' AdamW states), on
        the host (the trainer places them)."""

        def cut(x):
            if jax.tree.structure(x) == self._model_tree:
                return self._cut(x).sides
            if isinstance(x, tuple):
                pairs = [cut(k) for k in x]
                make = (lambda *k: type(x)(*k)) if hasattr(x, "_fields") else (lambda *k: k)
                return make(*(a for a, _ in pairs)), make(*(b for _, b in pairs))
            return x, x

        state, (_, adamw) = saved
        return self._cut(state), cut(adamw)

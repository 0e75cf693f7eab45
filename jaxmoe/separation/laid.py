"""A separated layout's model: the `LaidOut` of a `Separation` (jaxmoe.layout).

Its programs are pieces (embedding, attention, experts, LM head, their gradients, each mesh's
optimizer update), each compiled for its own mesh on abstract inputs. A phase's collectives are
its pieces' times the calls one pass makes of each; counts are what one device of the mesh issuing
them does, bytes are averaged over all the devices (attention devices send the all-reduces,
expert devices the all-to-alls, both the transfers), as is the least volume they are held
against. Transfers between the meshes are those a run moved (`run_forward`) or, compiled only,
what the layout moves by construction: each token's state once each way per MoE layer, then
copied on inside its replica group.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.analysis.collectives import Inventory
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.explain import collectives_by_place, named, parameters
from jaxmoe.inference import Decoder
from jaxmoe.layout import Phase, ProgramCost, minimum_per_layer
from jaxmoe.placement import abstract_model, init_params, param_bytes_total, shard_bytes
from jaxmoe.report import human_bytes
from jaxmoe.separation import cost
from jaxmoe.separation.layout import Separation
from jaxmoe.separation.runner import INTER_MESH, Separated
from jaxmoe.spmd import gradient_sync_bytes
from jaxmoe.timer import Timing, time_calls
from jaxmoe.train.recipe import TrainConfig


class SeparatedRun:
    """`cfg` laid out by `sep` on the first devices of `devices` (attention, then experts)."""

    def __init__(self, cfg: ModelConfig, sep: Separation, devices: Sequence[jax.Device]):
        self.cfg, self.sep, self.devices = cfg, sep, list(devices)
        self.run = Separated(cfg, sep, self.devices)

    def put(self, state):
        return self.run.put(state)

    def abstract_params(self):
        return self.run.abstract_params()

    def decoder(self) -> Decoder:
        return self.run.decoder()

    def trainer(self, tc: TrainConfig):
        from jaxmoe.separation.training import SeparatedTrainer  # it builds on this package

        return SeparatedTrainer(self.cfg, self.sep, self.devices, tc)

    # ---- what the programs do ------------------------------------------------------------------
    def run_forward(self, params, tokens) -> tuple[np.ndarray, ProgramCost]:
        done = self.run.forward(params, tokens)
        return done.logits.astype(np.float32), self._cost("forward", done.moved)

    def cost(self, phase: Phase) -> ProgramCost:
        return self._cost(phase, self._moved(phase))

    def _moved(self, phase: Phase) -> dict[str, float]:
        """Bytes one call of `phase` moves between programs, by construction: each token's state
        once each way per MoE layer (twice in training: the cotangents go back), copied on to the
        rest of its replica group."""
        cfg, sep = self.cfg, self.sep
        tokens = cfg.batch * (1 if phase == "decode" else cfg.seq_len)
        once = sep.transfer_bytes(cfg, tokens) * cfg.n_moe_layers * (2 if phase == "train" else 1)
        return {"to_experts": once, "to_attention": once, "fanout": (sep.group_size - 1) * once}

    def _cost(self, phase: Phase, moved: dict[str, float]) -> ProgramCost:
        cfg, sep, run = self.cfg, self.sep, self.run
        train = phase == "train"
        pieces, optimizer = self._pieces(phase)
        inventories = cost.mesh_inventories(run, pieces, cost.calls(run, phase))
        a, x = sep.attention.n_devices, sep.experts.n_devices
        by_mesh = {  # the pieces counted are the layers' (forward) or all (training)
            mesh: {
                k: (t.count / cfg.n_layers, t.bytes / cfg.n_layers)
                for k, t in inv.by_kind().items()
            }
            for mesh, inv in inventories.items()
        }
        per_layer = {}
        for kind in dict.fromkeys([*by_mesh["attention"], *by_mesh["experts"]]):
            count_a, bytes_a = by_mesh["attention"].get(kind, (0.0, 0.0))
            count_x, bytes_x = by_mesh["experts"].get(kind, (0.0, 0.0))
            if count_a + count_x:
                per_layer[kind] = (count_a + count_x, (a * bytes_a + x * bytes_x) / (a + x))
        moved = {k: v / cfg.n_layers for k, v in moved.items()}
        crossing = sum(moved.get(k, 0.0) for k in INTER_MESH)
        passes = 2 if train else 1
        calls_per_layer = passes * cfg.micro_batches * cfg.n_moe_layers / cfg.n_layers
        per_layer["transfer"] = (2.0 * calls_per_layer, crossing / (a + x))
        per_layer["fanout"] = (calls_per_layer, moved.get("fanout", 0.0) / (a + x))
        params = run.abstract_params()
        held = {
            "attention": shard_bytes((params.outer, params.attention)),
            "experts": shard_bytes(params.experts),
        }
        # what the layout moves by construction, against what this call moved
        least = sum(v for k, v in self._moved(phase).items() if k in INTER_MESH) / cfg.n_layers
        sync = gap = 0.0
        if train:
            sync = a * gradient_sync_bytes((params.outer, params.attention))
            sync = (sync + x * gradient_sync_bytes(params.experts)) / (a + x)
            # the backward programs recompute their pieces' forward passes, collectives and
            # all; each micro-batch's attention program sums its weights' gradients itself
            again = cost.mesh_inventories(run, pieces)
            again = a * again["attention"].total_bytes() + x * again["experts"].total_bytes()
            sums = (cfg.micro_batches - 1) * a * gradient_sync_bytes(params.attention)
            recomputed, summed = (again / (a + x) / cfg.n_layers, sums / (a + x) / cfg.n_layers)
            gap = recomputed + summed
        volume = minimum_per_layer(cfg, sep, phase, sync)
        memory = cost.memory(run, pieces, phase, optimizer)
        details = {
            "separation": {
                "attention_mesh": sep.attention.axis_sizes,
                "expert_mesh": sep.experts.axis_sizes,
                "micro_batches": cfg.micro_batches,
                "transfer_bits": sep.transfer_bits,
                "heads": sep.padding(cfg),
                "collectives_per_layer_by_mesh": {
                    mesh: {k: {"count": c, "bytes_per_device": b} for k, (c, b) in per.items() if c}
                    for mesh, per in by_mesh.items()
                },
                "moved_per_layer": moved,
                "transfer_bytes_per_layer": crossing,
                "transfer_minimum_bytes_per_layer": least,
                "transfer_vs_minimum": crossing / least if least else None,
                "param_bytes_per_device_by_mesh": held,
                "memory_per_device_by_mesh": memory.to_json(),
            }
        }
        collectives = [c for inv in inventories.values() for c in inv.collectives]
        return ProgramCost(
            strategy=sep.name,
            mesh=sep.mesh,
            phase=phase,
            inventory=Inventory(tuple(collectives)),
            per_layer=per_layer,
            minimum_bytes_per_layer=volume,
            bubble_fraction=0.0,
            param_bytes_per_device=max(held.values()),
            param_bytes_total=param_bytes_total(abstract_model(cfg)[1]),
            memory=memory.training_parts() if train else memory.to_json(),
            details=details,
            gap=(
                f"its backward programs recompute each piece's forward pass (only what crosses "
                f"between the meshes is kept), collectives and all, {human_bytes(recomputed)} per "
                f"layer; each micro-batch's attention program sums its weights' gradients over "
                f"the replica groups ({cfg.micro_batches} sums a step where one would do), "
                f"{human_bytes(summed)} per layer"
                if train
                else ""
            ),
            gap_bytes_per_layer=gap,
        )

    def _pieces(self, phase: Phase) -> tuple[dict[str, jax.stages.Compiled], tuple[int, int]]:
        """`phase`'s pieces compiled on abstract inputs, and (training) the optimizer state's
        bytes per device on each mesh."""
        pieces = cost.compile_pieces(self.run, "forward" if phase == "train" else phase)
        if phase != "train":
            return pieces, (0, 0)
        return self._training_pieces(pieces)

    def _training_pieces(self, forward: dict) -> tuple[dict, tuple[int, int]]:
        """The training step's programs, compiled on abstract inputs shaped and laid out like
        what the forward pieces give them: the forward pieces, the head's, experts' and
        attention's gradients, the embedding's, the router's losses and each mesh's optimizer
        update; and the optimizer state's bytes per device on each mesh."""
        run, cfg = self.run, self.cfg
        prog, params = run.programs, run.abstract_params()
        x = cost.like(forward["attend"], 0)
        leaving = cost.like(forward["attend"], 1)
        shape = (run.rows, cfg.seq_len, cfg.d_model)
        y = cost.crossing(run, shape, run.exit)  # the experts' output back on the attention mesh
        sums = cost.like(forward["experts"], 1)
        goal = jax.ShapeDtypeStruct((run.rows, cfg.seq_len), jnp.int32, sharding=run.tokens)
        tokens, m = goal, cfg.micro_batches
        at_experts = cost.crossing(run, shape, run.at_experts)
        from jaxmoe.separation.training import SeparatedTrainer  # it builds on this package

        trainer = SeparatedTrainer(cfg, self.sep, self.devices, TrainConfig(), balance=False)
        p_state, o_state = trainer.abstract_state
        sides = ((p_state.outer, p_state.attention), p_state.experts)
        scale = jax.ShapeDtypeStruct((), jnp.float32)
        optimizer = (shard_bytes(o_state[0]), shard_bytes(o_state[1]))
        return forward | {
            "head_grads": prog.head_grads.lower(
                params.outer, *([a] * m for a in (x, y, goal))
            ).compile(),
            "expert_grads": prog.expert_grads.lower(
                params.experts[0], at_experts, None, 0, (at_experts, sums)
            ).compile(),
            "attend_grads": prog.attend_grads.lower(
                params.attention[0], x, y, (x, leaving)
            ).compile(),
            "embed_grads": prog.embed_grads.lower(params.outer, [tokens] * m, [x] * m).compile(),
            "router": prog.router.lower([sums] * cfg.n_blocks).compile(),
            "update_attention": trainer.update.lower(
                sides[0], o_state[0], sides[0], scale
            ).compile(),
            "update_experts": trainer.update.lower(sides[1], o_state[1], sides[1], scale).compile(),
        }, optimizer

    # ---- inference -----------------------------------------------------------------------------
    def phase_cost(self, phase: Phase, hw: Hardware, measure=None):
        """The bound composed from the compiled pieces (`separation.cost`), memory per device on
        the busier mesh."""
        from jaxmoe.phases import PhaseCost  # phases calls this class through the interface

        cfg = self.cfg
        if phase == "train":
            raise ConfigError(
                f"{self.sep.name}: no bound for its training step yet (its pieces' "
                f"collectives and memory are in `compare --phase train`); rank it by prefill "
                f"and decode"
            )
        pieces = cost.compile_pieces(self.run, phase)
        return PhaseCost(
            phase=phase,
            batch=cfg.batch,
            tokens=cfg.batch * (cfg.seq_len if phase == "prefill" else 1),
            bound=cost.separated_bound(self.run, pieces, hw, phase),
            memory=cost.memory(self.run, pieces, phase).to_json(),
            measured=None if measure is None else self._time(phase, measure),
        )

    def _time(self, phase: Phase, measure) -> Timing:
        run, cfg = self.run, self.cfg
        params = run.put(init_params(cfg, 0)[1])
        tokens = jax.random.randint(
            jax.random.key(measure.seed), (cfg.batch, cfg.seq_len), 0, cfg.vocab_size, jnp.int32
        )
        if phase == "prefill":
            return time_calls(
                lambda cache: run.extend(params, tokens, cache, 0),
                warmup=measure.warmup,
                iters=measure.iters,
                setup=lambda: (run.new_cache(),),
            )
        cache = run.new_cache()
        return time_calls(
            lambda: run.extend(params, tokens[:, -1:], cache, cfg.seq_len - 1),
            warmup=measure.warmup,
            iters=measure.iters,
        )

    # ---- explanation ---------------------------------------------------------------------------
    def explain(self, phase: Phase = "forward") -> dict:
        """Per parameter (each block's attention and expert pieces once), the collectives of the
        pieces per layer on each mesh, memory per device on each mesh."""
        run, cfg, sep = self.run, self.cfg, self.sep
        params, collectives = [], []
        placed = run.abstract_params()  # every piece's program takes these as they are
        for mesh, prefix, abstract in (
            ("attention", "", placed.outer),
            ("attention", "blocks/<each>/", placed.attention[0]),
            ("experts", "blocks/<each>/moe/moe/", placed.experts[0]),
        ):
            shardings = {name: (leaf, leaf.sharding) for name, leaf in named(abstract, None)}
            params += [
                {**p, "path": f"{prefix}{p['path']}", "mesh": mesh}
                for p in parameters(abstract, shardings)
            ]
        pieces, optimizer = self._pieces(phase)
        for mesh, inv in cost.mesh_inventories(run, pieces, cost.calls(run, phase)).items():
            collectives += [
                c | {"mesh": mesh} for c in collectives_by_place(inv, cfg.n_layers, True)
            ]
        memory = cost.memory(run, pieces, phase, optimizer)
        return {
            "strategy": sep.name,
            "phase": phase,
            "mesh": sep.mesh,
            "parameters": params,
            "collectives": collectives,
            "memory_per_device": memory.per_mesh_json()
            | {"attention_kv_cache": cost.cache_bytes(run)},  # for `batch` sequences
        }

"""A strategy's model laid out as one SPMD program per phase: the `LaidOut` of a `Strategy`.

Every phase is one program XLA partitions over the strategy's mesh: the forward pass, the
training step (loss, gradients, AdamW), prefill and decode. Each is compiled here, on abstract
inputs where nothing needs running, and read back: its collectives, memory per device, the
parameters' shardings.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxmoe.analysis.collectives import inventory
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.analysis.memory import memory_per_device
from jaxmoe.analysis.roofline import program_bound
from jaxmoe.config import ModelConfig
from jaxmoe.explain import collectives_by_place, parameters
from jaxmoe.inference import Decoder, cache_sharding, compile_phases, decoder, new_cache
from jaxmoe.layout import Phase, ProgramCost, minimum_per_layer, per_layer
from jaxmoe.placement import (
    compiled_param_shardings,
    forward,
    init_params,
    param_bytes_per_device,
    param_bytes_total,
    place,
    shard_bytes,
)
from jaxmoe.platform import compile_program, read_only_config
from jaxmoe.sharding import Strategy, part_axes
from jaxmoe.timer import Timing, time_calls
from jaxmoe.train.recipe import TrainConfig
from jaxmoe.train.steps import Trainer, make_trainer


def gradient_sync_bytes(abstract_params, gathered: Sequence[str] = ()) -> float:
    """Bytes one device sends to sum the gradients of these parameters over the devices that
    computed a share of each: a reduce-scatter over the `gathered` mesh axes that split it (g - 1
    times its block, g their devices), then a ring all-reduce over its r copies (2 (r - 1) / r of
    its block)."""
    sent = 0.0
    for a in jax.tree.leaves(abstract_params):
        sharding = a.sharding
        block_elements = math.prod(sharding.shard_shape(a.shape))
        copies = sharding.mesh.size * block_elements / math.prod(a.shape)
        block = block_elements * a.dtype.itemsize
        spec_axes = {name for part in sharding.spec for name in part_axes(part)}
        g = math.prod(sharding.mesh.shape[name] for name in gathered if name in spec_axes)
        sent += (g - 1) * block + 2 * (copies - 1) / copies * block
    return sent


class SpmdRun:
    """`cfg` laid out by `strategy` on the first `strategy.n_devices` of `devices`."""

    def __init__(self, cfg: ModelConfig, strategy: Strategy, devices: Sequence[jax.Device]):
        self.cfg, self.strategy = cfg, strategy
        self.devices = list(devices)
        self.placement = place(cfg, strategy, self.devices[: strategy.n_devices])

    # ---- parameters --------------------------------------------------------------------------
    def put(self, state):
        return self.placement.put(state)

    def abstract_params(self):
        return self.placement.abstract_params()

    # ---- programs ------------------------------------------------------------------------------
    @functools.cached_property
    def _reader(self) -> SpmdRun:
        """This layout of `platform.read_only_config(cfg)`, which compiles the programs that are
        only read (memory, collectives, FLOPs), never run: itself where the two are the same."""
        twin = read_only_config(self.cfg)
        return self if twin == self.cfg else SpmdRun(twin, self.strategy, self.devices)

    def compile_forward(self, *, read_only: bool = False) -> jax.stages.Compiled:
        """The forward pass compiled for the mesh from abstract inputs (`read_only`: to be read,
        never run)."""
        at = self._reader if read_only else self
        p = at.placement
        fn = p.jit(forward(p.graphdef), in_shardings=(p.shardings, p.token_sharding))
        lowered = fn.lower(p.abstract_params(), p.abstract_tokens())
        return compile_program(lowered, at.cfg.dtype, read_only=read_only)

    def compile_train_step(self, tc: TrainConfig | None = None) -> tuple[Trainer, object]:
        """The training step compiled from abstract inputs, to be read, never run."""
        at = self._reader
        trainer = at.trainer(tc or TrainConfig())
        batch = jax.ShapeDtypeStruct(
            (at.cfg.batch, at.cfg.seq_len + 1), jnp.int32, sharding=trainer.batch_sharding
        )
        lowered = trainer.step.lower(*trainer.abstract_state, batch, 0)
        return trainer, compile_program(lowered, at.cfg.dtype, read_only=True)

    def decoder(self) -> Decoder:
        return decoder(self.cfg, self.placement.graphdef, self.placement)

    def trainer(self, tc: TrainConfig) -> Trainer:
        return make_trainer(self.cfg, self.strategy, self.devices[: self.strategy.n_devices], tc)

    # ---- what the programs do ------------------------------------------------------------------
    def run_forward(self, params, tokens) -> tuple[np.ndarray, ProgramCost]:
        compiled = self.compile_forward()
        logits = compiled(params, jax.device_put(tokens, self.placement.token_sharding))
        return np.asarray(logits).astype(np.float32), self._cost("forward", compiled)

    def cost(self, phase: Phase) -> ProgramCost:
        if phase == "forward":
            return self._cost(phase, self.compile_forward(read_only=True))
        if phase == "train":
            trainer, step = self.compile_train_step()
            return self._cost(phase, step, trainer)
        return self._cost(phase, self._phase_program(phase, allocate=False)[0])

    def _cost(self, phase: Phase, compiled, trainer: Trainer | None = None) -> ProgramCost:
        cfg, s = self.cfg, self.strategy
        inv = inventory(compiled.as_text(), s.axis_sizes)
        abstract = self.placement.abstract
        memory = memory_per_device(compiled)
        sync = 0.0
        if trainer is not None:
            sync = gradient_sync_bytes(self.abstract_params(), s.gathered_axes)
            memory = self._train_memory(trainer, memory)
        minimum = minimum_per_layer(cfg, s, phase, sync)
        return ProgramCost(
            strategy=s.name,
            mesh=s.axis_sizes,
            phase=phase,
            inventory=inv,
            per_layer=per_layer(inv, cfg.n_layers, in_loop=None if trainer else True),
            minimum_bytes_per_layer=minimum,
            bubble_fraction=s.bubble_fraction(cfg),
            param_bytes_per_device=param_bytes_per_device(compiled, abstract),
            param_bytes_total=param_bytes_total(abstract),
            memory=memory,
        )

    def _train_memory(self, trainer: Trainer, xla: dict[str, int]) -> dict[str, int]:
        """The training step's bytes per device: parameters and optimizer state as the step
        takes them, gradients (one per parameter, laid out like it), and the rest of the step's
        temporaries (activations kept for the backward pass, and workspace)."""
        params, opt_state = trainer.abstract_state
        held = shard_bytes(params)
        return {
            "parameters": held,
            "gradients": held,
            "optimizer_state": shard_bytes(opt_state),
            "activations": max(0, xla["temporaries"] - held),
            "total": xla["total"],
        }

    def explain(self, phase: Phase = "forward") -> dict:
        """Per parameter (as `phase`'s compiled program takes it), its collectives, and memory
        per device: for `forward` the parameters, Adam's state as training would hold it, the
        forward pass's activations and the KV cache of `batch` sequences; for `train` the
        training step's parts; for prefill and decode their program's, with the KV cache."""
        trainer, step = self.compile_train_step() if phase == "train" else (None, None)
        if phase == "forward":
            compiled = self.compile_forward(read_only=True)
        else:
            compiled = step or self._phase_program(phase, allocate=False)[0]
        abstract = self.placement.abstract
        params = parameters(abstract, compiled_param_shardings(compiled, abstract))
        xla = memory_per_device(compiled)
        if phase == "train":
            memory = self._train_memory(trainer, xla)
        elif phase == "forward":
            memory = {
                "parameters": sum(p["bytes_per_device"] for p in params),
                "optimizer_state": shard_bytes(self.trainer(TrainConfig()).abstract_state[1]),
                "activations": xla["temporaries"],
                "kv_cache": self.cache_bytes(),
            }
        else:
            memory = {
                "parameters": sum(p["bytes_per_device"] for p in params),
                "kv_cache": self.cache_bytes(),
                "temporaries": xla["temporaries"],
                "total": xla["total"],
            }
        inv = inventory(compiled.as_text(), self.strategy.axis_sizes)
        return {
            "strategy": self.strategy.name,
            "phase": phase,
            "mesh": self.strategy.axis_sizes,
            "parameters": params,
            "collectives": collectives_by_place(inv, self.cfg.n_layers),
            "memory_per_device": memory,
        }

    # ---- inference -----------------------------------------------------------------------------
    def _phase_program(self, phase: Phase, *, allocate: bool):
        """Prefill's or decode's program: for weights to run it on (`allocate`), or only to be
        read, from abstract ones."""
        if allocate:
            dec, params = self.decoder(), self.put(init_params(self.cfg, 0)[1])
        else:
            dec, params = self._reader.decoder(), self._reader.abstract_params()
        programs = compile_phases(dec, params, self.cfg.seq_len, read_only=not allocate)
        return programs[phase], dec, params

    def phase_cost(self, phase: Phase, hw: Hardware, measure=None):
        """Prefill, decode, or (compiled on abstract inputs, never timed) the training step."""
        from jaxmoe.phases import PhaseCost  # phases calls this class through the interface

        cfg = self.cfg
        if phase == "train":
            compiled, timing = self.compile_train_step()[1], None
        else:
            compiled, dec, params = self._phase_program(phase, allocate=measure is not None)
            timing = None if measure is None else _time(phase, compiled, dec, params, measure)
        return PhaseCost(
            phase=phase,
            batch=cfg.batch,
            tokens=cfg.batch * (1 if phase == "decode" else cfg.seq_len),
            bound=program_bound(compiled, self.strategy.axis_sizes, hw, cfg.dtype),
            memory=memory_per_device(compiled),
            measured=timing,
        )

    def cache_bytes(self) -> int:
        """KV cache bytes per device for `batch` sequences of `seq_len`."""
        cache, shardings = new_cache(self.placement), cache_sharding(self.placement)
        return sum(
            math.prod(kv.shard_shape(a.shape)) * a.dtype.itemsize
            for a, kv in zip(jax.tree.leaves(cache), jax.tree.leaves(shardings), strict=True)
        )


def _time(phase: Phase, compiled, dec: Decoder, params, measure) -> Timing:
    cfg = dec.cfg
    tokens = jax.random.randint(
        jax.random.key(measure.seed), (cfg.batch, cfg.seq_len), 0, cfg.vocab_size, jnp.int32
    )
    if phase == "prefill":
        prompt = dec.put_tokens(tokens)
        return time_calls(
            lambda cache: compiled(params, prompt, cache),
            warmup=measure.warmup,
            iters=measure.iters,
            setup=lambda: (dec.new_cache(),),
        )
    token = dec.put_tokens(tokens[:, -1:])
    position = jnp.asarray(cfg.seq_len - 1, jnp.int32)  # every step attends over the whole cache
    state = {"cache": dec.new_cache()}

    def step():
        logits, state["cache"], _ = compiled(params, token, state["cache"], position)
        return logits

    return time_calls(step, warmup=measure.warmup, iters=measure.iters)

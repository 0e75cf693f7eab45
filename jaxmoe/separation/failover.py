"""Serving through a lost device (paper 001's replicas): greedy generation over a separated layout
that carries on when a device fails mid-run.

`Server.generate` generates as `inference.generate` does and, before decode step `Failure.step`,
marks `Failure.device` lost:

- an attention device: its replica group leaves the layout. The surviving groups keep their
  weights and their sequences' keys and values where they are (read from their own shards, never
  from the lost group's), take the whole batch, and the lost group's sequences are prefilled
  again on them from their tokens so far (prompt and generated tokens), their keys and values
  then joining the cache.
- an expert device: its experts are placed again on the expert devices still alive, from the
  host's copy of the weights, the first devices taking one more where they do not divide (16
  experts on 3 devices: 6, 5, 5). Such a layout is no longer one SPMD program: per block,
  routing runs on the first of them, each device runs its experts on their slots and the first
  combines (`Replaced`).

Every sequence then goes on with the tokens it would have produced without the failure, as long
as routing drops no choice: a prefilled-again sequence is routed as a prefill routes it, not in
the decode steps' groups. Each `Recovery` gives the time from the failure to the next token,
compiling the degraded layout's programs included unless a `Server` compiled them before (a
warm standby: it keeps every layout it has run). `restart` is the alternative, measured the same
way: the model restored from a checkpoint onto a layout of the devices left, every sequence
prefilled again.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.inference import check_prompt
from jaxmoe.separation import params as sp
from jaxmoe.separation.degraded import assemble, laid, without_a_group
from jaxmoe.separation.layout import Separation
from jaxmoe.separation.runner import Separated


@dataclasses.dataclass(frozen=True)
class Failure:
    """`device` (its index in the layout's devices: attention devices, then expert devices) is
    lost before decode step `step` (1: the step that gives the second generated token)."""

    step: int
    device: int


@dataclasses.dataclass(frozen=True)
class Recovery:
    """What was done about a failure, the layout serving after it, and the seconds from the
    failure to the next token."""

    failure: Failure
    side: str  # "attention" or "experts"
    action: str
    layout: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Served:
    """Greedy tokens [B, steps], the recoveries made on the way and the expert choices dropped
    over capacity (prefills, including the ones made again, and decode steps)."""

    tokens: np.ndarray
    recoveries: tuple[Recovery, ...]
    dropped_choices: int


class Server:
    """`cfg` served under `sep` on `devices` from the model's `state` (on the host: the copy
    experts are placed again from). Every layout it degrades to is kept with its compiled
    programs, so a later run meets the same failures warm."""

    def __init__(self, cfg: ModelConfig, sep: Separation, devices: Sequence[jax.Device], state):
        sep.check(cfg, len(devices))
        self.cfg, self.sep = cfg, sep
        a, x = sep.attention.n_devices, sep.experts.n_devices
        self.devices = list(devices[: a + x])
        self.host = sp.split(state, cfg, sep, sp.parts(cfg, sep))
        self._layouts: dict = {}

    def layout(self, cfg: ModelConfig, sep: Separation, attention: list, alive: list) -> Separated:
        """The layout of `cfg` with `sep`'s attention on `attention` and the experts on the
        expert devices `alive` (unevenly where one is lost), made once."""
        experts = self.devices[self.sep.attention.n_devices :]
        key = (cfg, sep.name, tuple(attention), tuple(alive))
        if key not in self._layouts:
            self._layouts[key] = laid(cfg, sep, attention, experts, alive)
        return self._layouts[key]

    def generate(self, prompt, steps: int, failures: Sequence[Failure] = ()) -> Served:
        """Greedy continuation of `prompt` [B, S] (the next `steps` tokens), carrying on
        through `failures`."""
        cfg = self.cfg
        length = check_prompt(cfg, prompt, steps)
        check(cfg, self.sep, len(self.devices), steps, failures)
        serving = _Serving(self)
        tokens = np.asarray(prompt, np.int32)
        logits = serving.step(tokens, 0)
        recoveries = []
        for i in range(steps):
            token = np.asarray(jnp.argmax(logits, axis=-1), np.int32)[:, None]
            tokens = np.concatenate([tokens, token], axis=1)
            if i + 1 == steps:
                break
            started = []
            for f in (f for f in failures if f.step == i + 1):
                t0 = time.perf_counter()
                side, action = serving.lose(self.devices[f.device], tokens[:, :-1])
                started.append((f, side, action, t0))
            logits = serving.step(tokens[:, -1:], length + i)
            jax.block_until_ready(logits)
            done = time.perf_counter()
            recoveries += [
                Recovery(f, side, action, serving.layout_name, done - t0)
                for f, side, action, t0 in started
            ]
        return Served(tokens[:, length:], tuple(recoveries), round(serving.dropped))


class _Serving:
    """One run: the layout serving now, its parameters and cache, and what a lost device does."""

    def __init__(self, server: Server):
        self.server, self.cfg, self.sep = server, server.cfg, server.sep
        a = self.sep.attention.n_devices
        self.attention, self.alive = server.devices[:a], server.devices[a:]
        self.run = server.layout(self.cfg, self.sep, self.attention, self.alive)
        self.params = jax.device_put(server.host, self.run.shardings)
        self.cache = self.run.new_cache()
        self.dropped = 0.0

    def _layout(self, cfg: ModelConfig) -> Separated:
        return self.server.layout(cfg, self.sep, self.attention, self.alive)

    @property
    def layout_name(self) -> str:
        shares = getattr(self.run, "shares", None)
        return self.sep.name + ("" if shares is None else f", {shares}")

    def step(self, tokens, pos: int):
        logits, self.cache, dropped = self.run.extend(self.params, tokens, self.cache, pos)
        self.dropped += dropped
        return logits

    def lose(self, device: jax.Device, so_far: np.ndarray) -> tuple[str, str]:
        """Carry on without `device`; `so_far` [B, L]: every sequence's tokens whose keys and
        values the cache holds. Returns (side, what was done)."""
        if device in self.attention:
            return "attention", self._lose_group(device, so_far)
        return "experts", self._lose_experts(device)

    def _lose_group(self, device, so_far) -> str:
        cfg, grid = self.cfg, self.run.attn_mesh.devices
        r = int(np.argwhere(grid == device)[0][0])
        lost = set(grid[r].flat)
        self.attention = list(np.delete(grid, r, axis=0).flat)
        groups, self.sep = self.sep.replicas, without_a_group(self.sep)
        self.run = run = self._layout(cfg)

        def keep(tree, shardings):
            return jax.tree.map(lambda a, s: assemble([(a, 0)], a.shape, s, lost), tree, shardings)

        outer, attention = run.shardings.outer, run.shardings.attention
        self.params = sp.SepParams(
            keep(self.params.outer, outer),
            tuple(keep(p, s) for p, s in zip(self.params.attention, attention, strict=True)),
            self.params.experts,
        )
        rows = run.rows // groups  # of each micro-batch, per group
        mine = np.concatenate(
            [m * run.rows + r * rows + np.arange(rows) for m in range(cfg.micro_batches)]
        )
        # prefilled again as one batch, micro-batch m's sequences in rows m * rows..
        refill = self._layout(cfg.replace(batch=len(mine), micro_batches=1))
        _, again, dropped = refill.extend(self.params, so_far[mine], refill.new_cache(), 0)
        self.dropped += dropped

        def joined(m):
            def join(old, new):
                new = new[m * rows : (m + 1) * rows]
                return assemble([(old, 0), (new, r * rows)], old.shape, run.cache_sharding, lost)

            return join

        self.cache = [
            [jax.tree.map(joined(m), kv, new[0]) for m, kv in enumerate(old)]
            for old, new in zip(self.cache, again, strict=True)
        ]
        return (
            f"replica group {r} lost: its {len(mine)} sequences prefilled again "
            f"({so_far.shape[1]} tokens each) on the {groups - 1} group(s) left"
        )

    def _lose_experts(self, device) -> str:
        self.alive = [d for d in self.alive if d != device]
        self.run = run = self._layout(self.cfg)
        self.params = self.params._replace(
            experts=tuple(run.put_experts(h) for h in self.server.host.experts)
        )
        return (
            f"expert device lost: {self.cfg.n_experts} experts placed again from the host's "
            f"copy, {run.shares}"
        )


def check(cfg: ModelConfig, sep: Separation, n_devices: int, steps: int, failures) -> None:
    """One-line ConfigError for failures a `Server` cannot carry on through, before anything
    runs."""
    a, x, groups = sep.attention.n_devices, sep.experts.n_devices, sep.replicas
    lost_groups, lost_experts, now = set(), set(), sep
    for f in sorted(failures, key=lambda f: f.step):
        if not 1 <= f.step < steps:
            raise ConfigError(
                f"a failure at decode step {f.step}: choose a step from 1 to {steps - 1}"
            )
        if not 0 <= f.device < a + x:
            raise ConfigError(
                f"device {f.device} is not in {sep.name}'s {a + x} devices; choose 0..{a + x - 1}"
            )
        lost = lost_groups if f.device < a else lost_experts
        which = f.device // sep.group_size if f.device < a else f.device
        count, what = (groups, "replica groups") if f.device < a else (x, "expert devices")
        if which in lost or len(lost) + 1 >= count:
            raise ConfigError(
                f"device {f.device} fails {'already lost' if which in lost else 'as the last'} "
                f"of its kind; {sep.name} survives the loss of {count - 1} of its {count} {what}"
            )
        lost.add(which)
        if f.device < a:
            rows = cfg.batch // now.replicas  # the lost group's sequences, prefilled again
            now = without_a_group(now)
            now.check(cfg, n_devices)
            now.check(cfg.replace(batch=rows, micro_batches=1), n_devices)


def save_model(path, state: nnx.State) -> None:
    """The model's state as an orbax checkpoint at `path` (what `restart` restores)."""
    with ocp.StandardCheckpointer() as saver:
        saver.save(path, nnx.to_pure_dict(state))


def restart(run: Separated, checkpoint, abstract: nnx.State, so_far) -> tuple[np.ndarray, float]:
    """The alternative to failing over, timed from the failure to the next token: the model
    restored from `checkpoint` (`save_model`; `abstract`, its abstract state) onto `run` (a
    layout of the devices left), every sequence's tokens so far [B, L] prefilled. Returns the
    next token of every sequence [B] and the seconds taken."""
    t0 = time.perf_counter()
    device = jax.sharding.SingleDeviceSharding(run.attn_mesh.devices.flat[0])
    target = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
        nnx.to_pure_dict(abstract),
    )
    with ocp.StandardCheckpointer() as reader:
        pure = reader.restore(checkpoint, target)
    logits, _, _ = run.extend(run.put(sp.filled(abstract, pure)), so_far, run.new_cache(), 0)
    token = np.asarray(jnp.argmax(logits, axis=-1), np.int32)
    return token, time.perf_counter() - t0

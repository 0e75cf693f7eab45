"""A model run separated over two meshes: forward pass, training gradients, inference with a cache.

Every block, for every micro-batch in turn: attention on the attention mesh, the experts' input
moved to the expert mesh, experts, their output moved back. Dispatch is asynchronous, so while
the expert mesh works on micro-batch m the attention mesh already runs micro-batch m + 1 (the
ping-pong); `Timeline` records when each program finishes, to show it.

What crosses between the meshes is counted as it is moved (`Pass.moved`, bytes per kind, from the
shardings of the arrays each `device_put` makes): `to_experts` and `to_attention` cross between
the meshes, `fanout` stays inside the attention mesh. Crossing states are cut by sequences into as
many blocks as there are expert devices: expert device i takes block i from a device of the
attention devices' i-th slice and sends its output back to one of them (each token crosses
once), from where it is copied to the rest of the slice (`fanout`); the attention program then
gathers its replica group's blocks (an all-gather over NVLink in a real machine) since every head
slice needs the whole hidden state.

The backward pass runs the blocks in reverse, each piece's backward program recomputing its
forward pass from the inputs saved at its boundary (see `programs`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections import Counter
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.inference import Decoder
from jaxmoe.model import KV
from jaxmoe.model.attention import CORE, RESIDUAL
from jaxmoe.model.moe import dropped_choices
from jaxmoe.placement import TOKENS, abstract_model
from jaxmoe.separation import params as sp
from jaxmoe.separation.layout import Separation
from jaxmoe.separation.programs import Programs
from jaxmoe.separation.timeline import Timeline
from jaxmoe.sharding import param_shardings, with_shardings

INTER_MESH = ("to_experts", "to_attention")


@dataclasses.dataclass(frozen=True)
class Pass:
    """A forward pass's logits [B, S, V] (float32, on the host) and the bytes it moved between
    programs, per kind (`to_experts`, `to_attention`, `fanout`)."""

    logits: np.ndarray
    moved: dict[str, int]


@dataclasses.dataclass
class _Call:
    """What one call records as it goes: bytes moved per kind, the programs it dispatched (on a
    `timeline`, when given), and whether it waits for each program before the next (`serial`)."""

    timeline: Timeline | None = None
    serial: bool = False
    moved: Counter = dataclasses.field(default_factory=Counter)


@functools.lru_cache(maxsize=256)
def _crossing(src: frozenset, dst: NamedSharding, shape: tuple, itemsize: int) -> int:
    """Bytes a device_put to `dst` writes on devices outside `src` (one shard per device)."""
    per_device = math.prod(dst.shard_shape(shape)) * itemsize
    return per_device * len(dst.device_set - src)


class Separated:
    def __init__(self, cfg: ModelConfig, sep: Separation, devices: Sequence[jax.Device]):
        sep.check(cfg, len(devices))
        self.cfg, self.sep = cfg, sep
        self.attn_mesh, self.exp_mesh = sep.make_meshes(devices)
        self.pieces = sp.parts(cfg, sep)
        attn = sep.attention_strategy(cfg)
        n = cfg.n_blocks
        self.shardings = sp.SepParams(
            param_shardings(self.pieces.outer[1], self.attn_mesh, attn),
            (param_shardings(self.pieces.attention[1], self.attn_mesh, attn),) * n,
            (param_shardings(self.pieces.experts[1], self.exp_mesh, sep.experts),) * n,
        )
        # crossing states are split by sequences into as many blocks as there are expert
        # devices, on both sides, so every transfer copies whole shards (JAX then issues it
        # asynchronously; a transfer that must re-cut shards waits for its input on the host)
        crossing = PartitionSpec(sep.crossing_axes)
        self.exit = NamedSharding(self.attn_mesh, crossing)
        landing = Mesh(self.attn_mesh.devices[..., :1], self.attn_mesh.axis_names)
        self.landing = NamedSharding(landing, crossing)
        self.at_experts = NamedSharding(self.exp_mesh, sep.experts.spec(RESIDUAL))
        self.programs = Programs(cfg, sep, self.pieces, self.attn_mesh, self.exp_mesh, self.exit)
        self.residual = NamedSharding(self.attn_mesh, attn.spec(RESIDUAL))
        self.tokens = NamedSharding(self.attn_mesh, attn.spec(TOKENS))
        self.cache_sharding = NamedSharding(self.attn_mesh, attn.spec(CORE))
        self._empty_kv = jax.jit(
            self._zeros_kv, out_shardings=KV(self.cache_sharding, self.cache_sharding)
        )

    @property
    def rows(self) -> int:
        """Sequences per micro-batch."""
        return self.cfg.batch // self.cfg.micro_batches

    # ---- parameters --------------------------------------------------------------------------
    def put(self, state) -> sp.SepParams:
        """A model's state (e.g. made on one device) cut and laid out on the two meshes."""
        return jax.device_put(sp.split(state, self.cfg, self.sep, self.pieces), self.shardings)

    def abstract_params(self) -> sp.SepParams:
        pieces, n = self.pieces, self.cfg.n_blocks
        abstract = sp.SepParams(
            pieces.outer[1], (pieces.attention[1],) * n, (pieces.experts[1],) * n
        )
        return with_shardings(abstract, self.shardings)

    def model_state(self, params: sp.SepParams):
        """Separated parameters (or gradients) as the model's own state, on the host."""
        return sp.join(params, self.cfg, self.sep, abstract_model(self.cfg)[1])

    # ---- moving states between the meshes ----------------------------------------------------
    def _move(self, x, sharding: NamedSharding, kind: str, call: _Call):
        out = jax.device_put(x, sharding)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(out), strict=True):
            src = frozenset(a.sharding.device_set)
            call.moved[kind] += _crossing(src, sharding, b.shape, b.dtype.itemsize)
        return out

    def _to_attention(self, y, call: _Call):
        y = self._move(y, self.landing, "to_attention", call)
        return self._move(y, self.exit, "fanout", call)

    @staticmethod
    def _note(call: _Call, mesh: str, label: str, out, after: str | None = None) -> None:
        if call.timeline is not None:
            call.timeline.dispatched(mesh, label, out, after)
        if call.serial:
            jax.block_until_ready(out)

    # ---- the forward pass over the blocks ------------------------------------------------------
    def _split_rows(self, tokens) -> list[jax.Array]:
        tokens = np.asarray(tokens)
        if tokens.shape[0] != self.cfg.batch:
            raise ConfigError(
                f"{tokens.shape[0]} sequences given but batch={self.cfg.batch}; "
                f"set batch={tokens.shape[0]}"
            )
        r = self.rows
        pieces = [tokens[m * r : (m + 1) * r] for m in range(self.cfg.micro_batches)]
        return [jax.device_put(p, self.tokens) for p in pieces]

    def _blocks(self, call: _Call, params, xs, caches, pos, keys, saved=None):
        """Every block on every micro-batch, layer-major (the ping-pong order). Returns the last
        attention outputs, the last expert outputs (on the attention mesh) and routing sums
        [block][micro-batch]; `saved` collects each piece's inputs for the backward pass."""
        prog, xs = self.programs, list(xs)
        ys: list = [None] * len(xs)
        stats = []
        for i in range(self.cfg.n_blocks):
            row = []
            for m in range(len(xs)):
                x_in, y_in = xs[m], ys[m]
                cache = None if caches is None else caches[i][m]
                xs[m], h, cache = prog.attend(params.attention[i], x_in, y_in, cache, pos)
                if caches is not None:
                    caches[i][m] = cache
                self._note(call, "attention", f"attend {i}.{m}", xs[m], f"experts {i - 1}.{m}")
                h = self._move(h, self.at_experts, "to_experts", call)
                key = None if keys is None else keys[i]
                y, sums = self._experts(params.experts[i], h, key, m * self.rows)
                self._note(call, "experts", f"experts {i}.{m}", y, f"attend {i}.{m}")
                ys[m] = self._to_attention(y, call)
                row.append(sums)
                if saved is not None:
                    saved.append((i, m, x_in, y_in, h))
            stats.append(row)
        return xs, ys, stats

    def _experts(self, state, h, key, first_row: int):
        """One block's experts on what its attention sent (`at_experts`): (what goes back,
        routing sums)."""
        return self.programs.experts(state, h, key, first_row)

    def forward(
        self, params: sp.SepParams, tokens, *, timeline: Timeline | None = None, serial=False
    ) -> Pass:
        """tokens [B, S] -> the pass: logits [B, S, V] and what moved. With a `timeline`, every
        program is recorded on it as dispatched; `serial` waits for each before the next."""
        call = _Call(timeline, serial)
        parts = self._split_rows(tokens)
        xs = [self.programs.embed(params.outer, t, 0) for t in parts]
        xs, ys, _ = self._blocks(call, params, xs, None, 0, None)
        logits = [self.programs.logits(params.outer, x, y) for x, y in zip(xs, ys, strict=True)]
        return Pass(np.concatenate([np.asarray(a) for a in logits]), dict(call.moved))

    # ---- training ------------------------------------------------------------------------------
    def loss_and_grads(
        self, params: sp.SepParams, inputs, targets, dropout_key=None, timeline=None
    ):
        """The training loss (next-token cross-entropy plus the router losses), its metrics and
        the gradients of every separated parameter, as the one-device `loss_fn` defines them,
        and the bytes moved between programs per kind; with a `timeline`, every program is
        recorded on it as dispatched."""
        if self.sep.transfer_bits:
            raise ConfigError(
                f"{self.sep.name}: 8-bit transfers are for inference; train with transfer_bits=0"
            )
        prog, call = self.programs, _Call(timeline)
        parts = self._split_rows(inputs)
        goals = self._split_rows(targets)
        keys = None
        if dropout_key is not None and self.cfg.expert_dropout > 0:
            keys = jax.random.split(dropout_key, self.cfg.n_blocks)
        saved: list = []
        xs = [prog.embed(params.outer, t, 0) for t in parts]
        xs, ys, stats = self._blocks(call, params, xs, None, 0, keys, saved)
        ce, (g_outer, ct_x, ct_y) = prog.head_grads(params.outer, xs, ys, goals)
        ct_x, ct_y = list(ct_x), list(ct_y)
        sums = [functools.reduce(prog.add, row) for row in stats]
        metrics, g_sums = prog.router(sums)

        g_att: list = [None] * self.cfg.n_blocks
        g_exp: list = [None] * self.cfg.n_blocks
        for i, m, x_in, y_in, h in reversed(saved):
            key = None if keys is None else keys[i]
            cy = self._move(ct_y[m], self.at_experts, "to_experts", call)
            g, ct_h = prog.expert_grads(params.experts[i], h, key, m * self.rows, (cy, g_sums[i]))
            self._note(call, "experts", f"experts' {i}.{m}", ct_h, f"attend' {i + 1}.{m}")
            g_exp[i] = g if g_exp[i] is None else prog.add(g_exp[i], g)
            ct_h = self._to_attention(ct_h, call)
            g, ct_x[m], ct_y[m] = prog.attend_grads(
                params.attention[i], x_in, y_in, (ct_x[m], ct_h)
            )
            self._note(call, "attention", f"attend' {i}.{m}", ct_x[m], f"experts' {i}.{m}")
            g_att[i] = g if g_att[i] is None else prog.add(g_att[i], g)
        g_outer = prog.add(g_outer, prog.embed_grads(params.outer, parts, ct_x))

        metrics = {k: np.asarray(v) for k, v in metrics.items()}
        metrics["ce_loss"] = np.asarray(ce)
        metrics["loss"] = metrics["ce_loss"] + metrics["router_loss"]
        return metrics, sp.SepParams(g_outer, tuple(g_att), tuple(g_exp)), dict(call.moved)

    def cross_entropy(self, params: sp.SepParams, inputs, targets) -> float:
        """The mean next-token cross-entropy (evaluation: no router losses, no dropout)."""
        prog, n_micro = self.programs, self.cfg.micro_batches
        xs = [prog.embed(params.outer, t, 0) for t in self._split_rows(inputs)]
        xs, ys, _ = self._blocks(_Call(), params, xs, None, 0, None)
        goals = self._split_rows(targets)
        parts = [
            prog.loss(params.outer, x, y, g, 1.0 / n_micro)
            for x, y, g in zip(xs, ys, goals, strict=True)
        ]
        return float(sum(np.asarray(p) for p in parts))

    # ---- inference -------------------------------------------------------------------------------
    def kv_shape(self) -> tuple[int, ...]:
        """One layer's keys (or values) for one micro-batch: [B / M, T, padded H, K]."""
        cfg = self.cfg
        return (self.rows, cfg.seq_len, self.sep.padded_heads(cfg), cfg.head_dim)

    def _zeros_kv(self) -> KV:
        zeros = jnp.zeros(self.kv_shape(), self.cfg.compute_dtype)
        return KV(zeros, zeros)

    def new_cache(self) -> list[list[tuple[KV, ...]]]:
        """An empty KV cache on the attention mesh: [block][micro-batch] -> one KV per layer."""
        per_block = self.cfg.layers_per_block
        return [
            [
                tuple(self._empty_kv() for _ in range(per_block))
                for _ in range(self.cfg.micro_batches)
            ]
            for _ in range(self.cfg.n_blocks)
        ]

    def extend(self, params: sp.SepParams, tokens, cache, pos):
        """tokens [B, S] at positions pos.. -> (last position's logits [B, V], the cache, expert
        choices dropped over capacity)."""
        pos = np.int32(pos)
        xs = [self.programs.embed(params.outer, t, pos) for t in self._split_rows(tokens)]
        xs, ys, stats = self._blocks(_Call(), params, xs, cache, pos, None)
        last = [self.programs.last_logits(params.outer, x, y) for x, y in zip(xs, ys, strict=True)]
        dropped = sum(float(dropped_choices(sums)) for row in stats for sums in row)
        return np.concatenate([np.asarray(a) for a in last]), cache, dropped

    def decoder(self) -> Decoder:
        """Greedy generation's two phases (for `inference.generate`), run separated."""
        return Decoder(
            self.cfg,
            lambda params, prompt, cache: self.extend(params, prompt, cache, 0),
            self.extend,
            self.new_cache,
        )

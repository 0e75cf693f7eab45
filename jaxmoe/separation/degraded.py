"""Separated layouts after a device is lost: one replica group fewer (`without_a_group`), experts
placed unevenly on the expert devices left (`Replaced`), and arrays rebuilt from the shards still
alive (`assemble`). `failover` serves through them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import SingleDeviceSharding

from jaxmoe.analysis.hardware import Hardware
from jaxmoe.analysis.roofline import Bound, program_bound
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.model.moe import Moe, group_and_route, masks
from jaxmoe.separation import cost
from jaxmoe.separation.layout import Separation
from jaxmoe.separation.programs import receive, send
from jaxmoe.separation.runner import Separated


@dataclasses.dataclass(frozen=True)
class Shares:
    """Experts [first, last) of each device still alive: the first ones take one more."""

    devices: tuple[jax.Device, ...]
    bounds: tuple[tuple[int, int], ...]

    @classmethod
    def even(cls, n_experts: int, devices: Sequence[jax.Device]) -> Shares:
        n, bounds, first = len(devices), [], 0
        for i in range(n):
            count = n_experts // n + (i < n_experts % n)
            bounds.append((first, first + count))
            first += count
        return cls(tuple(devices), tuple(bounds))

    @property
    def counts(self) -> list[int]:
        return [b - a for a, b in self.bounds]

    def __str__(self) -> str:
        return f"experts {','.join(map(str, self.counts))} on {len(self.devices)} devices"


class Replaced(Separated):
    """A separated layout whose experts sit unevenly on the expert devices still alive
    (`Shares`). A block's expert parameters are (router on the first device, each device's
    slice of the expert weights on it). The expert mesh it inherits (the lost device in it) is
    never used: nothing is placed on it and none of its programs runs."""

    @classmethod
    def of(cls, run: Separated, shares: Shares) -> Replaced:
        """`run` (its attention side and compiled programs kept) with its experts on `shares`."""
        new = cls.__new__(cls)
        new.__dict__.update(run.__dict__)
        new.base = run.base if isinstance(run, Replaced) else run  # the layout before the loss
        new.shares = shares
        new.at_experts = SingleDeviceSharding(shares.devices[0])
        cfg, bounds, bits = run.cfg, shares.bounds, run.sep.transfer_bits
        moe = nnx.eval_shape(lambda: Moe(cfg, nnx.Rngs(0)))
        new._names = moe.expert_weight_names
        new._weights = [getattr(moe, n) for n in new._names]  # abstract: shapes and axes
        axes = tuple(tuple(w.get_metadata()["out_sharding"]) for w in new._weights)
        dt = cfg.compute_dtype

        def route(router, h):
            xg, choices, stats = group_and_route(cfg, receive(h, dt), router)
            dispatch, combine = masks(choices, cfg.n_experts, cfg.capacity_for(xg.shape[1]))
            xe = jnp.einsum("GSEC,GSD->EGCD", dispatch.astype(dt), xg)
            return tuple(xe[a:b] for a, b in bounds), combine.astype(dt), stats

        def experts(xe, weights):
            return moe.experts(xe, None, tuple(w.astype(dt) for w in weights), axes, local=True)

        def combine(parts, gates, shape):
            y = jnp.einsum("EGCD,GSEC->GSD", jnp.concatenate(parts), gates)
            return send(y.reshape(shape), bits)

        new._route, new._run = jax.jit(route), jax.jit(experts)
        new._combine = jax.jit(combine, static_argnums=2)
        return new

    def put_experts(self, host: nnx.State) -> tuple:
        """One block's expert parameters (the host's copy) placed on the shares."""
        pure = nnx.to_pure_dict(host)
        first = self.shares.devices[0]
        weights = tuple(
            tuple(jax.device_put(np.asarray(pure[n])[a:b], d) for n in self._names)
            for d, (a, b) in zip(self.shares.devices, self.shares.bounds, strict=True)
        )
        return jax.device_put(np.asarray(pure["router"]), first), weights

    def _experts(self, state, h, key, first_row: int):
        if key is not None:
            raise ConfigError(
                "experts placed again after a failure serve inference only; train under a "
                "layout of the devices left (resume from the checkpoint)"
            )
        router, weights = state
        first = self.shares.devices[0]
        slots, gates, stats = self._route(router, h)
        parts = [
            jax.device_put(self._run(jax.device_put(x, d), w), first)
            for x, d, w in zip(slots, self.shares.devices, weights, strict=True)
        ]
        return self._combine(parts, gates, jax.tree.leaves(h)[0].shape), stats

    def experts_bound(self, hw: Hardware, phase: str) -> tuple[Bound, int]:
        """The bound of one block's experts on one micro-batch, as these programs run them: the
        routing on the first device, the busiest device's experts, the combine on the first
        (each program's compute and memory time added), and the slots sent from the first
        device to the others and back. Returns (bound, the first device's index in the layout)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        seq = 1 if phase == "decode" else cfg.seq_len
        h = jax.ShapeDtypeStruct((self.rows, seq, cfg.d_model), dt, sharding=self.at_experts)
        router = jax.ShapeDtypeStruct(
            (cfg.d_model, cfg.n_experts), cfg.weight_dtype, sharding=self.at_experts
        )
        route = self._route.lower(router, h).compile()
        slots, gates, _ = route.out_info
        runs = []
        for x, d, (a, b) in zip(slots, self.shares.devices, self.shares.bounds, strict=True):
            on = SingleDeviceSharding(d)
            weights = [
                jax.ShapeDtypeStruct((b - a, *w.shape[1:]), w.dtype, sharding=on)
                for w in (w.get_value() for w in self._weights)
            ]
            x = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on)
            runs.append(self._run.lower(x, weights).compile())
        outs = [jax.ShapeDtypeStruct(r.out_info.shape, dt, sharding=self.at_experts) for r in runs]
        combine = self._combine.lower(outs, gates, h.shape).compile()
        bounds = [program_bound(c, {}, hw, cfg.dtype) for c in (route, *runs, combine)]
        busiest = max(bounds[1:-1], key=lambda b: b.overlapped_s)
        chain = (bounds[0], busiest, bounds[-1])
        positions = list(self.base.exp_mesh.devices.flat)
        at = [self.sep.attention.n_devices + positions.index(d) for d in self.shares.devices]
        sent = sum(x.size * x.dtype.itemsize for x in slots[1:])
        moved = 2 * hw.transfer_seconds(sent, at[:1], at[1:]) if sent else 0.0
        return Bound(
            compute_s=sum(b.compute_s for b in chain),
            memory_s=sum(b.memory_s for b in chain),
            comm_s=moved,
            flops=sum(b.flops for b in chain),
            hbm_bytes=sum(b.hbm_bytes for b in chain),
            comm_by={"transfer@experts": moved},
        ), at[0]


def laid(
    cfg: ModelConfig, sep: Separation, attention: list, experts: list, alive: list
) -> Separated:
    """`cfg` with `sep`'s attention on the devices `attention` and its experts on `experts`, or,
    where some of those are lost, unevenly on the ones `alive`."""
    run = Separated(cfg, sep, attention + experts)
    return run if alive == experts else Replaced.of(run, Shares.even(cfg.n_experts, alive))


def bound(run: Separated, hw: Hardware, phase: str) -> cost.SeparatedBound:
    """A separated layout's bound (`cost.separated_bound`), experts placed unevenly or not."""
    if not isinstance(run, Replaced):
        return cost.separated_bound(run, cost.compile_pieces(run, phase), hw, phase)
    whole = bound(run.base, hw, phase)
    experts, first = run.experts_bound(hw, phase)
    seq = 1 if phase == "decode" else run.cfg.seq_len
    size = run.sep.transfer_bytes(run.cfg, run.rows * seq)
    attention = range(run.sep.attention.n_devices)
    transfers = whole.transfer_s | {
        "to_experts": hw.transfer_seconds(size, attention, [first]),
        "to_attention": hw.transfer_seconds(size, [first], attention[:: run.sep.group_size]),
    }
    return dataclasses.replace(
        whole, pieces=whole.pieces | {"experts": experts}, transfer_s=transfers
    )


def without_a_group(sep: Separation) -> Separation:
    """`sep` with one replica group fewer: the same groups (heads and slices as before)."""
    r = sep.replicas
    shape = tuple(
        (axis, size - 1 if axis == sep.replica_axis else size)
        for axis, size in sep.attention.mesh_shape
    )
    attention = dataclasses.replace(
        sep.attention,
        mesh_shape=shape,
        description=f"{r - 1} replica groups x {sep.group_size} devices splitting heads",
        # each group left holds r / (r - 1) times the rows it held
        minimum_bytes=lambda cfg: sep.attention.minimum_bytes(
            cfg.replace(batch=cfg.batch * r // (r - 1))
        ),
    )
    return dataclasses.replace(
        sep,
        name=f"{sep.name} less a replica group",
        attention=attention,
        description=f"{sep.description}; {r - 1} of its {r} replica groups left",
    )


def _bounds(index: tuple, shape: tuple) -> tuple[tuple[int, int], ...]:
    return tuple(sl.indices(n)[:2] for sl, n in zip(index, shape, strict=True))


def assemble(sources, shape: tuple, sharding, lost: set) -> jax.Array:
    """An array of `shape` laid out by `sharding`, each device's shard read from shards of
    `sources` ((array, first row it holds) pairs) on devices not in `lost`, rows gathered along
    axis 0 and every other axis taken whole as the new shard has it (a shard already on the
    device preferred)."""
    blocks = []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        want = _bounds(index, shape)
        lo, hi = want[0] if want else (0, 1)
        pieces, row = [], lo
        while row < hi:
            found = []
            for array, first in sources:
                for shard in array.addressable_shards:
                    have = _bounds(shard.index, array.shape)
                    if shard.device in lost or (have and have[1:] != want[1:]):
                        continue
                    a, b = (have[0][0] + first, have[0][1] + first) if have else (0, 1)
                    if a <= row < b:
                        found.append((shard.device != device, shard, row - a, min(hi, b) - a))
            if not found:
                raise RuntimeError(f"rows {row}.. of a {shape} array are on lost devices only")
            _, shard, start, stop = min(found, key=lambda f: f[0])
            pieces.append(jax.device_put(shard.data[start:stop] if want else shard.data, device))
            row += stop - start
        blocks.append(pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces))
    return jax.make_array_from_single_device_arrays(shape, sharding, blocks)

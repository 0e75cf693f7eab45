"""Attention and experts on two disjoint sub-meshes: the layout value and its checks.

A `Separation` puts the first `attention.n_devices` devices under the `attention` strategy
(replica groups x heads: each replica group holds a whole copy of the attention side and runs its
share of the batch, heads split inside the group) and the next `experts.n_devices` under the
`experts` strategy (expert parallel). The library never imports `meshes/`: the two strategies
come with the value.

Heads that do not divide over a replica group are spread unevenly, the first groups taking one
more (32 heads on 12 devices: 3,3,3,3,3,3,3,3,2,2,2,2), as masked heads padded in: each device
holds the same number of head slots and a device with fewer heads has zero weights in the rest.
A masked head's output projection is zero, so it adds exactly nothing and gets a zero gradient;
its cost (compute and cache) is reported as `padding`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from jaxmoe.axes import Axis
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.sharding import Strategy, check_divisible, split_sizes


@dataclasses.dataclass(frozen=True)
class Separation:
    """Attention/expert separation: two strategies on disjoint devices, joined by transfers.

    The attention mesh has three axes: `replica_axis` (the replica groups), then `slice_axis` and
    `heads_axis`, which together split the heads inside a group. A group's devices are cut into
    slices, as many in all as there are expert devices: the states crossing to and from expert
    device i leave from and land on the i-th slice (split by sequences over replica x slice).
    `transfer_bits` is 0 (hidden states cross in the compute dtype) or 8 (int8, one float32
    scale per token).
    """

    name: str
    attention: Strategy
    experts: Strategy
    replica_axis: str
    slice_axis: str
    heads_axis: str
    description: str
    transfer_bits: int = 0

    @property
    def n_devices(self) -> int:
        return self.attention.n_devices + self.experts.n_devices

    @property
    def replicas(self) -> int:
        return self.attention.axis_sizes[self.replica_axis]

    @property
    def group_size(self) -> int:
        """Devices per attention replica group (heads are split over them)."""
        sizes = self.attention.axis_sizes
        return sizes[self.slice_axis] * sizes[self.heads_axis]

    @property
    def slices(self) -> int:
        """Blocks the crossing states are cut into on the attention side: one per expert device,
        or a divisor of them once a replica group is lost (`separation.failover`), each block
        then re-cut on its way."""
        sizes = self.attention.axis_sizes
        return sizes[self.replica_axis] * sizes[self.slice_axis]

    @property
    def crossing_axes(self) -> tuple[str, str]:
        """The attention mesh's axes the crossing states are split over, by sequences."""
        return (self.replica_axis, self.slice_axis)

    def with_options(self, **changes) -> Separation:
        return dataclasses.replace(self, **changes)

    # ---- the Layout interface (jaxmoe.layout) ------------------------------------------------
    @property
    def mesh(self) -> dict[str, dict[str, int]]:
        return {"attention": self.attention.axis_sizes, "experts": self.experts.axis_sizes}

    @property
    def strategies(self) -> dict[str, Strategy]:
        return {"attention": self.attention, "experts": self.experts}

    def bubble_fraction(self, cfg: ModelConfig) -> float:
        return 0.0  # the ping-pong has no schedule bubble; the bound composes what it hides

    def check_devices(self, n_devices: int) -> None:
        a, x = self.attention.n_devices, self.experts.n_devices
        if a + x > n_devices:
            raise ConfigError(
                f"{self.name}: {a} attention + {x} expert devices exceed the {n_devices} devices "
                f"available; choose sub-meshes of at most {n_devices} devices in all"
            )

    def variants(self, cfg: ModelConfig) -> list[tuple[ModelConfig, str]]:
        """The config with the most ping-pong micro-batches, up to its own, then fewer (halving;
        named in the variant)."""
        out, m = [], cfg.micro_batches
        while m >= 1:
            suffix = "" if m == cfg.micro_batches else f" (micro_batches={m})"
            out.append((cfg.replace(micro_batches=m), self.name + suffix))
            m //= 2
        return out

    def estimate(self, cfg: ModelConfig, hw, phase: str) -> None:
        """None: two meshes joined by transfers have no rule-table estimate; plan compiles it."""
        return None

    def lay_out(self, cfg: ModelConfig, devices: Sequence[jax.Device]):
        from jaxmoe.separation.laid import SeparatedRun  # it builds on this module

        return SeparatedRun(cfg, self, devices)

    def heads_per_device(self, cfg: ModelConfig) -> list[int]:
        """Real heads on each device of a replica group (the first ones take one more)."""
        n, h = self.group_size, cfg.n_heads
        return [h // n + (i < h % n) for i in range(n)]

    def padded_heads(self, cfg: ModelConfig) -> int:
        return math.ceil(cfg.n_heads / self.group_size) * self.group_size

    def head_slots(self, cfg: ModelConfig) -> np.ndarray:
        """For every padded head slot, the real head it holds, or -1 for a masked one."""
        per, slots = self.padded_heads(cfg) // self.group_size, []
        first = 0
        for count in self.heads_per_device(cfg):
            slots += list(range(first, first + count)) + [-1] * (per - count)
            first += count
        return np.asarray(slots)

    def attention_cfg(self, cfg: ModelConfig) -> ModelConfig:
        """The model as the attention mesh runs it: heads padded to fill every device."""
        return cfg.replace(n_heads=self.padded_heads(cfg))

    def attention_strategy(self, cfg: ModelConfig) -> Strategy:
        """The attention strategy, leaving unsplit what does not divide (the vocabulary on a
        group of 5 devices, say): the embedding tables are then whole on every device of a group."""
        vocab = split_sizes(cfg)[Axis.VOCAB][0]
        rules = {
            axis: mesh_axes
            for axis, mesh_axes in self.attention.rules.items()
            if axis != Axis.VOCAB or vocab % self.attention.split_factor(axis) == 0
        }
        return dataclasses.replace(self.attention, rules=rules)

    def transfer_bytes(self, cfg: ModelConfig, tokens: int | None = None) -> float:
        """Bytes of the experts' input (or output) for `tokens` tokens (default: the batch) as
        they cross between the meshes: [tokens, D] in the compute dtype, or int8 values plus a
        float32 scale per token."""
        tokens = cfg.tokens if tokens is None else tokens
        if self.transfer_bits:
            return tokens * (cfg.d_model + 4)
        return tokens * cfg.d_model * cfg.compute_dtype.itemsize

    def minimum_bytes(self, cfg: ModelConfig) -> dict[str, float]:
        """Bytes one device sends per layer, averaged over all the devices: the attention
        mesh's and the expert mesh's collectives (their strategies' formulas) and, in an MoE
        layer, the experts' input and output crossing between the meshes once each, and the
        output then reaching the other devices of each replica group (an all-gather's volume)."""
        a, x = self.attention.n_devices, self.experts.n_devices
        attention, experts = self.attention.minimum_bytes(cfg), self.experts.minimum_bytes(cfg)
        fanout = (self.group_size - 1) * self.transfer_bytes(cfg)  # copies and gathers
        crossing = {"dense": 0.0, "moe": 2 * self.transfer_bytes(cfg) + fanout}
        crossing |= {"vocab": 0.0, "moe_backward": 0.0}
        return {k: (a * attention[k] + x * experts[k] + crossing[k]) / (a + x) for k in crossing}

    def padding(self, cfg: ModelConfig) -> dict:
        return {
            "heads": cfg.n_heads,
            "padded_heads": self.padded_heads(cfg),
            "masked_heads": self.padded_heads(cfg) - cfg.n_heads,
            "heads_per_device": self.heads_per_device(cfg),
        }

    def check(self, cfg: ModelConfig, n_devices: int | None = None) -> None:
        """One-line ConfigError for anything this layout cannot run, before any compiling."""
        x = self.experts.n_devices
        if n_devices is not None:
            self.check_devices(n_devices)
        if x % self.slices:
            raise ConfigError(
                f"{self.name}: the attention mesh must cut into {x} slices (one per expert "
                f"device), not {self.slices}; build it with meshes.ma_separation.separation"
            )
        if not cfg.is_moe:
            raise ConfigError(
                f"{self.name} separates attention from experts and needs an MoE model; "
                f"set moe_every to 1 or more"
            )
        unsupported = [
            field
            for field, used in (
                ("n_kv_heads", cfg.kv_heads != cfg.n_heads),
                ("kv_lora_rank", cfg.is_mla),
                ("positions", cfg.positions != "learned"),
                ("sliding_window", cfg.sliding_window > 0),
                ("first_dense", cfg.first_dense > 0),
                ("n_shared_experts", cfg.n_shared_experts > 0),
                ("tie_embeddings", cfg.tie_embeddings),
            )
            if used
        ]
        if unsupported:
            raise ConfigError(
                f"{self.name} lays out multi-head attention with learned positions and routed "
                f"experts only, not {', '.join(unsupported)}; use a one-mesh layout"
            )
        if cfg.n_experts % x:
            raise ConfigError(
                f"{self.name}: n_experts={cfg.n_experts} does not split over {x} expert devices; "
                f"choose n_experts as a multiple of {x} or another expert-device count"
            )
        if cfg.batch % cfg.micro_batches:
            raise ConfigError(
                f"{self.name}: batch={cfg.batch} does not split into micro_batches="
                f"{cfg.micro_batches}; choose a batch that is a multiple of it or set micro_batches"
            )
        if self.transfer_bits not in (0, 8):
            raise ConfigError(f"{self.name}: transfer_bits={self.transfer_bits}; use 0 or 8")
        piece = cfg.replace(batch=cfg.batch // cfg.micro_batches)
        check_divisible(self.attention_cfg(piece), self.attention_strategy(cfg))
        check_divisible(piece, self.experts)

    def make_meshes(self, devices: Sequence[jax.Device]) -> tuple[Mesh, Mesh]:
        """(attention mesh on the first devices, expert mesh on the next ones)."""
        a, x = self.attention.n_devices, self.experts.n_devices
        self.check_devices(len(devices))
        return self.attention.make_mesh(devices[:a]), self.experts.make_mesh(devices[a : a + x])

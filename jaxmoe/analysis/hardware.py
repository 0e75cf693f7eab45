"""Hardware profiles (the editable `assets/hardware.toml`) and the time a collective takes on them.

Devices of a mesh are the profile's GPUs in order, `per_node` to a node: a collective whose
group stays in one node runs over NVLink, one that spans nodes is timed as NCCL's hierarchical
algorithms run it (inside each node over NVLink, between nodes over the network, one GPU per node
and local rank talking to its peers).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Sequence
from math import inf
from pathlib import Path

from jaxmoe.analysis.collectives import Collective
from jaxmoe.config import ConfigError

PROFILES = Path(__file__).resolve().parent.parent / "assets" / "hardware.toml"


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    description: str
    count: int  # GPUs
    per_node: int
    matmul_flops: dict[str, float]  # peak FLOP/s per compute dtype
    hbm_bytes: float
    hbm_bandwidth: float
    nvlink_bandwidth: float
    network_bandwidth: float

    def peak_flops(self, dtype: str) -> float:
        if dtype not in self.matmul_flops:
            raise ConfigError(
                f"hardware {self.name} has no peak for dtype {dtype}; "
                f"add it to matmul_flops in {PROFILES}"
            )
        return self.matmul_flops[dtype]

    def check_devices(self, n: int, flag: str = "--hardware") -> None:
        """One line when the layouts span more devices than the profile has GPUs (their
        collectives would be timed on links that are not there)."""
        if self.count < n:
            larger = sorted(name for name, p in profiles().items() if p.count >= n)
            raise ConfigError(
                f"{flag} {self.name}: the profile has {self.count} GPU(s), the layouts span {n}; "
                f"choose a profile of {n} or more: {', '.join(larger)}"
            )

    def collective_seconds(self, c: Collective) -> float:
        """Seconds one execution of the collective takes (each device's share in parallel)."""
        if c.kind == "collective-permute":
            moving = [(s, t) for s, t in c.groups if s != t]
            if not moving:
                return 0.0
            across = any(s // self.per_node != t // self.per_node for s, t in moving)
            return c.operand_bytes / (self.network_bandwidth if across else self.nvlink_bandwidth)
        group = max(c.groups, key=len) if c.groups else (0,)
        return self._group_seconds(c.kind, c.operand_bytes, group)

    def transfer_seconds(
        self, size: float, senders: Sequence[int], receivers: Sequence[int]
    ) -> float:
        """Seconds to move `size` bytes spread evenly from the `senders` to the `receivers`
        (GPU indices), each GPU's link carrying its share: NVLink when every receiver shares a
        node with a sender, the network otherwise."""
        sender_nodes = {d // self.per_node for d in senders}
        local = all(d // self.per_node in sender_nodes for d in receivers)
        link = self.nvlink_bandwidth if local else self.network_bandwidth
        return size / min(len(senders), len(receivers)) / link

    def _group_seconds(self, kind: str, size: float, group: Sequence[int]) -> float:
        n = len(group)
        if n <= 1:
            return 0.0
        nodes = len({d // self.per_node for d in group})
        local = n // nodes  # members of the group in each node
        nv, net = self.nvlink_bandwidth, self.network_bandwidth
        if kind == "all-to-all":  # each device keeps 1/n, sends the rest straight to its peers
            on, off = size * (local - 1) / n, size * (n - local) / n
            return max(on / nv, off / net)
        if kind == "all-gather":  # size: one device's shard; between nodes first, then inside
            return (nodes - 1) * size / net + (local - 1) * nodes * size / nv
        if kind == "reduce-scatter":  # size: the whole array; inside nodes first, then between
            return (local - 1) / local * size / nv + (nodes - 1) / nodes * size / local / net
        if kind == "all-reduce":  # reduce-scatter then all-gather, each hierarchical
            return 2 * ((local - 1) / local * size / nv + (nodes - 1) / nodes * size / local / net)
        raise ValueError(f"unknown collective kind {kind!r}")


def profiles(path: Path = PROFILES) -> dict[str, Hardware]:
    """Every profile of the file; a file with a syntax error, a missing or a non-positive figure
    gets one line naming the entry and the key."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"hardware profiles {path}: {err}; fix the file") from None
    gpus = data.get("gpus", {})
    found = {}
    for name, p in data.get("profiles", {}).items():
        if p.get("gpu") not in gpus:
            raise ConfigError(f"profile {name} names gpu {p.get('gpu')!r}, not in [gpus] of {path}")
        gpu = gpus[p["gpu"]]
        figure = _reader(path)
        found[name] = Hardware(
            name=name,
            description=gpu.get("description", p["gpu"]),
            count=int(figure(p, f"profiles.{name}", "count")),
            per_node=int(figure(p, f"profiles.{name}", "per_node")),
            matmul_flops={
                k: figure(gpu["matmul_flops"], f"gpus.{p['gpu']}.matmul_flops", k)
                for k in (gpu.get("matmul_flops") or {})
            },
            **{
                key: figure(gpu, f"gpus.{p['gpu']}", key)
                for key in ("hbm_bytes", "hbm_bandwidth", "nvlink_bandwidth", "network_bandwidth")
            },
        )
    return found


def _reader(path: Path):
    def figure(table: dict, where: str, key: str) -> float:
        value = table.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < inf:
            raise ConfigError(
                f"[{where}] {key}={value!r} in {path}: must be a positive finite number; set it"
            )
        return float(value)

    return figure


def get(name: str) -> Hardware:
    """The named profile, or a one-line ConfigError listing the choices."""
    known = profiles()
    if name not in known:
        raise ConfigError(f"unknown hardware profile {name!r}; choose one of {sorted(known)}")
    return known[name]

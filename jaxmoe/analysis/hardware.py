"""Hardware profiles (the editable `assets/hardware.toml`) and the time a collective takes on them.

Devices of a mesh are the profile's GPUs in order, `per_node` to a node: a collective whose
group stays in one node runs over NVLink, one that spans nodes is timed as NCCL's hierarchical
algorithms run it (inside each node over NVLink, between nodes over the network, one GPU per node
and local rank talking to its peers). Besides the file's fixed profiles, `get` builds a cluster of
any size of a GPU of the file from its name: `h100x64` (nodes of 8), `h100x64n4`, `b200x72n72`.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Sequence
from math import inf
from pathlib import Path

from jaxmoe.analysis.collectives import Collective
from jaxmoe.config import ConfigError

PROFILES = Path(__file__).resolve().parent.parent / "assets" / "hardware.toml"
_CLUSTER = re.compile(r"([a-z][a-z0-9]*?)x(\d+)(?:n(\d+))?")  # <gpu>x<count>[n<per_node>]


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    gpu: str  # its short name, the key of [gpus] in the file
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
            raise ConfigError(
                f"{flag} {self.name}: the profile has {self.count} GPU(s), the layouts span {n}; "
                f"choose a profile of {n} or more, e.g. {_cluster_name(self.gpu, n)}"
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
    """Every fixed profile of the file; a file with a syntax error, a missing or a non-positive
    figure gets one line naming the entry and the key."""
    return _profiles(_load(path), path)


def get(name: str) -> Hardware:
    """The named profile of the file, else the cluster the name spells (`<gpu>x<count>`, nodes of
    min(8, count), or `<gpu>x<count>n<per_node>`); a one-line ConfigError naming the fix."""
    data = _load(PROFILES)
    known = _profiles(data, PROFILES)
    if name in known:
        return known[name]
    gpus = data.get("gpus", {})
    match = _CLUSTER.fullmatch(name)
    if match is None:
        raise ConfigError(
            f"unknown hardware profile {name!r}; choose one of {sorted(known)} or name a cluster "
            "<gpu>x<count>[n<per_node>], e.g. h100x64 or b200x72n72"
        )
    gpu, count = match[1], int(match[2])
    if gpu not in gpus:
        raise ConfigError(
            f"hardware {name!r}: unknown GPU {gpu!r}; choose one of {', '.join(sorted(gpus))} "
            f"or add it to [gpus] of {PROFILES}"
        )
    if count < 1:
        raise ConfigError(f"hardware {name!r}: {count} GPUs; name at least 1, e.g. {gpu}x8")
    per_node = int(match[3]) if match[3] else min(8, count)
    if not 1 <= per_node <= count or count % per_node:
        raise ConfigError(
            f"hardware {name!r}: nodes of {per_node} do not divide {count} GPUs; "
            f"choose e.g. {_cluster_name(gpu, count)}"
        )
    return _hardware(data, PROFILES, name, gpu, count, per_node)


def _cluster_name(gpu: str, count: int) -> str:
    """The name of `count` GPUs in the largest nodes of at most 8 that divide it."""
    per_node = max(d for d in range(1, min(8, count) + 1) if count % d == 0)
    return f"{gpu}x{count}" + ("" if per_node == min(8, count) else f"n{per_node}")


def _load(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"hardware profiles {path}: {err}; fix the file") from None


def _profiles(data: dict, path: Path) -> dict[str, Hardware]:
    gpus, figure, found = data.get("gpus", {}), _reader(path), {}
    for name, p in data.get("profiles", {}).items():
        if p.get("gpu") not in gpus:
            raise ConfigError(f"profile {name} names gpu {p.get('gpu')!r}, not in [gpus] of {path}")
        count, per_node = (int(figure(p, f"profiles.{name}", k)) for k in ("count", "per_node"))
        found[name] = _hardware(data, path, name, p["gpu"], count, per_node)
    return found


def _hardware(data: dict, path: Path, name: str, gpu: str, count: int, per_node: int) -> Hardware:
    table, figure = data["gpus"][gpu], _reader(path)
    return Hardware(
        name=name,
        gpu=gpu,
        description=table.get("description", gpu),
        count=count,
        per_node=per_node,
        matmul_flops={
            k: figure(table["matmul_flops"], f"gpus.{gpu}.matmul_flops", k)
            for k in (table.get("matmul_flops") or {})
        },
        **{
            key: figure(table, f"gpus.{gpu}", key)
            for key in ("hbm_bytes", "hbm_bandwidth", "nvlink_bandwidth", "network_bandwidth")
        },
    )


def _reader(path: Path):
    def figure(table: dict, where: str, key: str) -> float:
        value = table.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < inf:
            raise ConfigError(
                f"[{where}] {key}={value!r} in {path}: must be a positive finite number; set it"
            )
        return float(value)

    return figure

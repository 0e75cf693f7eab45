"""The roofline bound of a compiled, partitioned program on a hardware profile.

Three times per device, each a floor on what the hardware can do:
- compute: the program's matmul FLOPs (every loop iteration counted) at the matmul peak of the
  compute dtype;
- memory: the bytes the program must move to and from HBM at least once (its arguments, the
  weights and KV cache among them, and its outputs that are not updated in place, from XLA's
  memory analysis) at the HBM bandwidth;
- communication: every collective of the program (from its HLO, with its trip counts and device
  groups) at the bandwidth of the links its group spans.

Fully overlapped, a step takes at least the largest of the three; with communication exposed,
at least compute-or-memory plus communication, less what an MoE layer's independent chunks can
hide (`analysis.dependence`: with c chunks only the first dispatch and the last combine need
wait, 1/c of the all-to-alls' time). Neither accounts for the pipeline bubble
separately: a pipelined program's devices run every iteration (the bubble's too), so its FLOPs
already carry it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any

from jaxmoe.analysis.collectives import inventory
from jaxmoe.analysis.dependence import overlap_chunks
from jaxmoe.analysis.flops import matmul_flops
from jaxmoe.analysis.hardware import Hardware
from jaxmoe.analysis.memory import memory_per_device


@dataclasses.dataclass(frozen=True)
class Bound:
    """Lower bounds, in seconds per call of the program, on one hardware profile."""

    compute_s: float
    memory_s: float
    comm_s: float
    flops: float  # per device
    hbm_bytes: float  # per device, moved at least once
    comm_by: dict[str, float]  # seconds per collective kind and mesh axes, e.g. "all-to-all@expert"
    overlap_chunks: int = 1  # independent chunks of an MoE layer's all-to-alls

    @property
    def overlapped_s(self) -> float:
        return max(self.compute_s, self.memory_s, self.comm_s)

    @property
    def hidden_s(self) -> float:
        """All-to-all time that chunks of an MoE layer hide behind one another's work."""
        a2a = sum(s for key, s in self.comm_by.items() if key.startswith("all-to-all"))
        return a2a * (1 - 1 / self.overlap_chunks)

    @property
    def serial_s(self) -> float:
        exposed = max(self.compute_s, self.memory_s) + self.comm_s - self.hidden_s
        return max(exposed, self.overlapped_s)

    @property
    def limit(self) -> str:
        """What bounds the overlapped step: compute, memory, or the costliest collective."""
        terms = {"compute": self.compute_s, "memory": self.memory_s, "communication": self.comm_s}
        which = max(terms, key=terms.get)
        if which == "communication" and self.comm_by:
            return max(self.comm_by, key=self.comm_by.get)
        return which

    def summary(self) -> dict[str, Any]:
        return {
            "compute_s": self.compute_s,
            "memory_s": self.memory_s,
            "comm_s": self.comm_s,
            "overlapped_s": self.overlapped_s,
            "serial_s": self.serial_s,
            "overlap_chunks": self.overlap_chunks,
            "hidden_s": self.hidden_s,
            "limit": self.limit,
            "flops_per_device": self.flops,
            "hbm_bytes_per_device": self.hbm_bytes,
            "comm_s_by_collective": self.comm_by,
        }


def bound(
    flops: float, hbm_bytes: float, collectives, hw: Hardware, dtype: str, chunks: int = 1
) -> Bound:
    """The bound of per-device work `flops` and `hbm_bytes` plus these collectives (each with
    its executions per call) on `hw`, computing in `dtype`; `chunks`: independent chunks of an
    MoE layer's all-to-alls."""
    comm: Counter[str] = Counter()
    for c in collectives:
        key = f"{c.kind}@{'x'.join(c.axes) if c.axes else 'devices'}"
        comm[key] += c.executions * hw.collective_seconds(c)
    return Bound(
        compute_s=flops / hw.peak_flops(dtype),
        memory_s=hbm_bytes / hw.hbm_bandwidth,
        comm_s=sum(comm.values()),
        flops=flops,
        hbm_bytes=hbm_bytes,
        comm_by=dict(comm),
        overlap_chunks=chunks,
    )


def program_bound(
    compiled, axis_sizes: dict[str, int], hw: Hardware, dtype: str, first_device: int = 0
) -> Bound:
    """The bound of a compiled program (`jax.stages.Compiled`) laid over a mesh of these axes,
    whose devices are the profile's GPUs `first_device`, `first_device + 1`, ... (a sub-mesh
    further along the machine has its collectives timed on the nodes it really spans)."""
    text = compiled.as_text()
    mem = memory_per_device(compiled)
    compulsory = mem["arguments"] + mem["outputs"] - mem["aliased"]
    collectives = [
        dataclasses.replace(c, groups=tuple(tuple(d + first_device for d in g) for g in c.groups))
        for c in inventory(text, axis_sizes).collectives
    ]
    return bound(matmul_flops(text), compulsory, collectives, hw, dtype, overlap_chunks(text))

"""When each mesh is busy: completion times of the dispatched programs, and their overlap.

JAX dispatches asynchronously, so the host loop that issues the ping-pong returns long before
the devices finish. A watcher thread per mesh waits on that mesh's programs in the order they
were issued (a mesh runs them in that order) and records when each one's output is ready. A
program is taken to start when both the program before it on its mesh and the program on the
other mesh whose output it consumes have finished (the transfer between them is not counted,
so busy times are slightly overstated). The overlap is the time both meshes are busy at once.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time

import jax


@dataclasses.dataclass(frozen=True)
class Interval:
    mesh: str
    label: str
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class Overlap:
    wall_s: float  # first dispatch to last completion
    busy_s: dict[str, float]  # per mesh
    overlap_s: float  # time both meshes were busy at once
    intervals: tuple[Interval, ...]

    @property
    def overlap_fraction(self) -> float:
        """Share of the less busy mesh's time spent overlapped with the other's."""
        shorter = min(self.busy_s.values(), default=0.0)
        return self.overlap_s / shorter if shorter > 0 else 0.0

    def summary(self) -> dict:
        return {
            "wall_s": self.wall_s,
            "busy_s": self.busy_s,
            "overlap_s": self.overlap_s,
            "overlap_fraction": self.overlap_fraction,
        }


class Timeline:
    """Use as a context: programs noted with `dispatched` inside it are timed."""

    def __init__(self, meshes=("attention", "experts")):
        self._queues = {m: queue.Queue() for m in meshes}
        self._done: dict[str, float] = {}
        self._issued: list[tuple[str, str, str | None, float]] = []
        self._threads = [
            threading.Thread(target=self._watch, args=(q,), daemon=True)
            for q in self._queues.values()
        ]

    def __enter__(self) -> Timeline:
        self._start = time.perf_counter()
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        for q in self._queues.values():
            q.put(None)
        for t in self._threads:
            t.join()

    def dispatched(self, mesh: str, label: str, out, after: str | None) -> None:
        self._issued.append((mesh, label, after, time.perf_counter()))
        self._queues[mesh].put((label, out))

    def _watch(self, q: queue.Queue) -> None:
        while (item := q.get()) is not None:
            label, out = item
            jax.block_until_ready(out)
            self._done[label] = time.perf_counter()

    def overlap(self) -> Overlap:
        """Busy intervals per mesh and their overlap (call after the context has closed)."""
        last: dict[str, float] = {}
        intervals = []
        for mesh, label, after, issued in self._issued:
            start = max(issued, last.get(mesh, self._start), self._done.get(after, self._start))
            end = max(self._done[label], start)
            intervals.append(Interval(mesh, label, start, end))
            last[mesh] = end
        busy = {m: sum(i.end - i.start for i in intervals if i.mesh == m) for m in self._queues}
        meshes = list(self._queues)
        both = sum(
            max(0.0, min(a.end, b.end) - max(a.start, b.start))
            for a in intervals
            if a.mesh == meshes[0]
            for b in intervals
            if b.mesh == meshes[1]
        )
        end = max((i.end for i in intervals), default=self._start)
        return Overlap(end - self._start, busy, both, tuple(intervals))

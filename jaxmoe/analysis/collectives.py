"""Inventory of the collectives in a compiled, SPMD-partitioned HLO module.

Feed it `jax.jit(f).lower(*args).compile().as_text()`; it returns every collective with its
replica groups, how often it runs per call (trip counts of enclosing while loops), and the bytes
one device sends under a ring model.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import ChainMap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BITS = {"pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16}
_DTYPE_BITS |= {"u16": 16, "f16": 16, "bf16": 16, "s32": 32, "u32": 32, "f32": 32, "s64": 64}
_DTYPE_BITS |= {"u64": 64, "f64": 64, "c64": 64, "c128": 128}
_MINIFLOAT_BITS = {"f4": 4, "f6": 6, "f8": 8}

_INSTR_HEAD = re.compile(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_SHAPE = re.compile(r"\(|\S+")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")
_COMP_HEAD = re.compile(r"(ENTRY\s+)?%?([\w.\-]+)\s*(?:\(.*\)\s*->\s*.*)?\{$")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([^\]]*)\]")
_COMMENT = re.compile(r"/\*.*?\*/")
_CALLEE = re.compile(r"\b(calls|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_PAIRS = re.compile(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}")
_IOTA_GROUPS = re.compile(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(((?:[^()]|\([^()]*\))*)\))?\s*\{([^}]*)\}"
)
_LIST_GROUPS = re.compile(r"replica_groups=\{((?:\{[\d,\s]*\},?\s*)*)\}")


@dataclass(frozen=True)
class Collective:
    """One collective instruction of the compiled program.

    `executions` is the product of the known trip counts of the enclosing while loops (unknown
    counts as 1), summed over call sites when a computation is called from several places, and
    `loop_depth` the deepest while nesting. `bytes_sent` is what one device sends per execution
    (ring model); `groups` are partition ids, or (source, target) pairs for collective-permute.
    """

    kind: str
    name: str
    computation: str
    executions: int
    loop_depth: int
    operand_bytes: int
    bytes_sent: int
    groups: tuple[tuple[int, ...], ...]
    axes: tuple[str, ...] | None = None


@dataclass(frozen=True)
class KindTotal:
    """Executions and bytes sent (per device, per call of the program) summed over collectives."""

    count: int
    bytes: int


@dataclass(frozen=True)
class Inventory:
    """All collectives of a program, with per-kind and per-axes totals."""

    collectives: tuple[Collective, ...]

    def _select(self, in_loop: bool | None) -> list[Collective]:
        if in_loop is None:
            return list(self.collectives)
        return [c for c in self.collectives if (c.loop_depth > 0) == in_loop]

    def by_kind(self, *, in_loop: bool | None = None) -> dict[str, KindTotal]:
        """Totals for every kind in KINDS; `in_loop` keeps only collectives inside (True) or
        outside (False) while loops."""
        chosen = self._select(in_loop)
        return {kind: _total(c for c in chosen if c.kind == kind) for kind in KINDS}

    def total_bytes(self, *, in_loop: bool | None = None) -> int:
        """Bytes one device sends per call of the program."""
        return _total(self._select(in_loop)).bytes

    def over_axes(self) -> dict[tuple[str, ...] | None, KindTotal]:
        """Totals per mesh-axes tuple the collectives span."""
        keys = dict.fromkeys(c.axes for c in self.collectives)
        return {k: _total(c for c in self.collectives if c.axes == k) for k in keys}


def _total(collectives: Iterable[Collective]) -> KindTotal:
    runs = [(c.executions, c.bytes_sent) for c in collectives]
    return KindTotal(sum(n for n, _ in runs), sum(n * b for n, b in runs))


@dataclass
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str


@dataclass
class _Module:
    num_partitions: int = 1
    entry: str | None = None
    computations: dict[str, list[_Instr]] = field(default_factory=dict)


def _closing(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at text[start]."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] in "([{":
            depth += 1
        elif text[i] in ")]}":
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO line: {text!r}")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not nested in brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def _parse_instr(line: str) -> _Instr | None:
    head = _INSTR_HEAD.match(line)
    if head is None:
        return None
    i = head.end()
    shape = _SHAPE.match(line, i)
    if shape is None:
        return None
    end = _closing(line, i) if shape.group() == "(" else shape.end()
    op = _OPCODE.match(line, end)
    if op is None:
        return None
    close = _closing(line, op.end() - 1)
    operands = _split_top(_COMMENT.sub("", line[op.end() : close - 1]))
    return _Instr(head.group(1), line[i:end], op.group(1), operands, line[close:])


def _parse_module(hlo_text: str) -> _Module:
    module, current = _Module(), None
    for raw in hlo_text.splitlines():
        line = raw.strip()
        if line.startswith("HloModule"):
            found = re.search(r"\bnum_partitions=(\d+)", line)
            module.num_partitions = int(found.group(1)) if found else 1
        elif line == "}":
            current = None
        elif current is not None:
            instr = _parse_instr(line)
            if instr is not None:
                current.append(instr)
        elif (head := _COMP_HEAD.match(line)) is not None:
            current = module.computations.setdefault(head.group(2), [])
            if head.group(1):
                module.entry = head.group(2)
    if module.entry is None and module.computations:
        module.entry = list(module.computations)[-1]
    return module


def _shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string, tuples summed."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        bits = _DTYPE_BITS.get(dtype, _MINIFLOAT_BITS.get(dtype[:2], 0))
        count = math.prod(int(re.sub(r"\D", "", d) or 0) for d in dims.split(",") if d)
        total += math.ceil(count * bits / 8)
    return total


def _callees(instr: _Instr) -> list[tuple[str, int, bool]]:
    """(computation, trip count, is_loop) for each computation the instruction runs."""
    if instr.opcode.endswith(("-done", "-update")):
        return []
    if instr.opcode == "call":
        found = re.search(r"\bto_apply=%?([\w.\-]+)", instr.attrs)
        return [(found.group(1), 1, False)] if found else []
    if instr.opcode == "while":
        found = _TRIP_COUNT.search(instr.attrs)
        trips = int(found.group(1)) if found else 1
        return [(name, trips, True) for _, name in _CALLEE.findall(instr.attrs)]
    names = [name for _, name in _CALLEE.findall(instr.attrs)]
    for listed in _CALLEE_LIST.findall(instr.attrs):
        names += [n.strip().lstrip("%") for n in listed.split(",") if n.strip()]
    return [(name, 1, False) for name in names]


def _call_counts(module: _Module) -> dict[str, tuple[int, int]]:
    """(executions, loop depth) of every computation reachable from ENTRY."""
    edges = {
        name: [e for instr in body for e in _callees(instr) if e[0] in module.computations]
        for name, body in module.computations.items()
    }
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        seen.add(name)
        for child, _, _ in edges[name]:
            if child not in seen:
                visit(child)
        order.append(name)

    if module.entry is None:
        return {}
    visit(module.entry)
    counts = {module.entry: (1, 0)}
    for name in reversed(order):
        runs, depth = counts[name]
        for child, trips, is_loop in edges[name]:
            child_runs, child_depth = counts.get(child, (0, 0))
            counts[child] = (child_runs + runs * trips, max(child_depth, depth + is_loop))
    return counts


def _iota(dims: str, perm: str | None) -> np.ndarray:
    shape = [int(d) for d in dims.split(",")]
    order = [int(p) for p in perm.split(",")] if perm else list(range(len(shape)))
    return np.arange(math.prod(shape)).reshape(shape).transpose(order)


def _mesh_groups(axes_text: str, device_ids: str | None, refs_text: str) -> np.ndarray:
    """Groups of the `mesh[...] {axes}` form: devices varying along the listed (sub-)axes."""
    axes = [(name, int(size)) for name, size in re.findall(r"'([^']*)'=(\d+)", axes_text)]
    sizes = [size for _, size in axes]
    iota = re.fullmatch(r"\[([\d,]+)\](?:T\(([\d,]+)\))?", (device_ids or "").strip())
    if device_ids is None:
        devices = np.arange(math.prod(sizes))
    elif iota is not None:
        devices = _iota(iota.group(1), iota.group(2))
    else:
        devices = np.array([int(d) for d in re.findall(r"\d+", device_ids)])
    index = {name: i for i, (name, _) in enumerate(axes)}
    refs = [
        (index[name], int(pre) if pre else 1, int(size) if size else sizes[index[name]])
        for name, pre, size in re.findall(r"'([^']*)'(?::\((\d+)\)(\d+))?", refs_text)
    ]
    # Split each mesh axis at the boundaries of its sub-axes (major to minor).
    dims, grouped_at = [], {}
    for axis, size in enumerate(sizes):
        cuts = sorted({1, size} | {c for a, p, s in refs if a == axis for c in (p, p * s)})
        for lo, hi in list(itertools.pairwise(cuts)) or [(1, 1)]:
            grouped_at[(axis, lo)] = len(dims)
            dims.append(hi // lo)
    grouped = [grouped_at[(axis, pre)] for axis, pre, _ in refs]
    rest = [d for d in range(len(dims)) if d not in grouped]
    group_size = math.prod(dims[d] for d in grouped)
    return devices.reshape(dims).transpose(rest + grouped).reshape(-1, group_size)


def _groups(attrs: str, num_partitions: int) -> tuple[tuple[int, ...], ...]:
    """Replica groups (or source-target pairs) of a collective, as partition ids."""
    if (pairs := _PAIRS.search(attrs)) is not None:
        return tuple(tuple(map(int, p)) for p in re.findall(r"\{(\d+),(\d+)\}", pairs.group(1)))
    if (iota := _IOTA_GROUPS.search(attrs)) is not None:
        shape = [int(d) for d in iota.group(1).split(",")]
        array = _iota(iota.group(2), iota.group(3)).reshape(shape)
    elif (mesh := _MESH_GROUPS.search(attrs)) is not None:
        array = _mesh_groups(*mesh.groups())
    elif (listed := _LIST_GROUPS.search(attrs)) is not None and "{" in listed.group(1):
        groups = re.findall(r"\{([\d,\s]*)\}", listed.group(1))
        return tuple(tuple(int(d) for d in re.findall(r"\d+", g)) for g in groups)
    else:
        array = np.arange(num_partitions).reshape(1, -1)
    return tuple(tuple(int(d) for d in row) for row in array)


def _bytes_sent(kind: str, operand_bytes: int, groups: Sequence[Sequence[int]]) -> int:
    """Bytes one device sends per execution under the ring model."""
    if kind == "collective-permute":
        return 0 if all(s == t for s, t in groups) else operand_bytes
    n = max((len(g) for g in groups), default=1)
    factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": n - 1}.get(kind, (n - 1) / n)
    return round(operand_bytes * factor)  # all-gather: result = n * operand


def _operand_bytes(operands: list[str], shapes: Mapping[str, str]) -> int:
    """Operands are printed as `%x` or `f32[4]{0} %x`; look up the shape if it is not inline."""
    split = [operand.rpartition(" ") for operand in operands]
    return sum(_shape_bytes(shape or shapes.get(name.lstrip("%"), "")) for shape, _, name in split)


def parse_collectives(hlo_text: str) -> list[Collective]:
    """Every collective of an HLO module, in text order, with `axes=None`."""
    module = _parse_module(hlo_text)
    counts = _call_counts(module)
    everywhere = {i.name: i.shape for body in module.computations.values() for i in body}
    found = []
    for comp, body in module.computations.items():
        if comp not in counts:
            continue
        runs, depth = counts[comp]
        shapes = ChainMap({i.name: i.shape for i in body}, everywhere)
        for instr in body:
            kind = instr.opcode.removesuffix("-start")
            if kind not in KINDS:
                continue
            groups = _groups(instr.attrs, module.num_partitions)
            size = _operand_bytes(instr.operands, shapes)
            sent = _bytes_sent(kind, size, groups)
            found.append(Collective(kind, instr.name, comp, runs, depth, size, sent, groups))
    return found


def group_axes(
    groups: Sequence[Sequence[int]], mesh_shape: Mapping[str, int], *, permute: bool = False
) -> tuple[str, ...] | None:
    """Mesh axes (in mesh order) the groups span, or None if they match no set of axes.

    With `permute`, `groups` are (source, target) pairs and the result is the axes along which
    some source and its target differ.
    """
    names, sizes = list(mesh_shape), list(mesh_shape.values())
    total = math.prod(sizes)
    if any(not 0 <= p < total for g in groups for p in g):
        return None
    coords = np.stack(np.unravel_index(np.arange(total), sizes), axis=1)
    if permute:
        moved = {a for s, t in groups for a in np.flatnonzero(coords[s] != coords[t])}
        return tuple(names[a] for a in sorted(moved))
    spanned = np.zeros(len(sizes), dtype=bool)
    members = [list(g) for g in groups if len(g) > 0]
    for g in members:
        spanned |= (coords[g] != coords[g[0]]).any(axis=0)
    for g in members:
        same = (coords[:, ~spanned] == coords[g[0], ~spanned]).all(axis=1)
        if len(g) != len(set(g)) or set(np.flatnonzero(same)) != set(g):
            return None
    return tuple(n for n, s in zip(names, spanned, strict=True) if s)


def inventory(hlo_text: str, mesh_shape: Mapping[str, int]) -> Inventory:
    """Parse the collectives and name the mesh axes each one spans."""
    found = []
    for c in parse_collectives(hlo_text):
        axes = group_axes(c.groups, mesh_shape, permute=c.kind == "collective-permute")
        found.append(replace(c, axes=axes))
    return Inventory(tuple(found))

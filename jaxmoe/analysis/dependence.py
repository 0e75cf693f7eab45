"""Which of a compiled program's MoE exchanges could overlap, read from its data dependences.

An MoE layer whose tokens reach the experts by all-to-all (`dispatch`) and return by another
(`combine`) can split its slots into chunks (`ModelConfig.moe_chunks`); a chunk's all-to-alls can
then run while the experts compute another chunk, if nothing in the program makes one chunk wait
for another. `overlap_chunks` finds, in the loop body that holds the all-to-alls, the dispatch
all-to-alls that depend on no other of their layer: one per layer without chunks, `moe_chunks`
with them. A scheduler may still serialise them; the HLO says only that it need not.
"""

from __future__ import annotations

import re
from collections import Counter

_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*)$")
_OPCODE = re.compile(r"\s([a-z][\w-]*)\(")
_NAME = re.compile(r"%([\w.\-]+)")
_ALL_TO_ALL = re.compile(r"\sall-to-all(?:-start)?\(")


def _computations(hlo: str) -> dict[str, list[str]]:
    """Each computation's instruction lines, by its name."""
    found: dict[str, list[str]] = {}
    current = None
    for line in hlo.splitlines():
        if match := _COMPUTATION.match(line):
            current = found.setdefault(match[1], [])
        elif line.startswith("}"):
            current = None
        elif current is not None and _INSTRUCTION.match(line):
            current.append(line)
    return found


def _operands(rest: str) -> list[str]:
    """The instruction names inside the operand list that follows the opcode."""
    opcode = _OPCODE.search(rest)
    if not opcode:
        return []
    args, depth, end = rest[opcode.end() :], 1, 0
    while end < len(args) and depth:
        depth += {"(": 1, ")": -1}.get(args[end], 0)
        end += 1
    return _NAME.findall(args[:end])


def overlap_chunks(hlo: str) -> int:
    """The most dispatch all-to-alls of one MoE layer that do not depend on one another (1 for
    a program without them)."""
    computations = _computations(hlo)
    body = next(
        (lines for lines in computations.values() if any(_ALL_TO_ALL.search(x) for x in lines)),
        None,
    )
    if body is None:
        return 1
    # the dispatch all-to-alls each instruction depends on (the body lists operands first)
    before: dict[str, frozenset[str]] = {}
    counts: Counter[int] = Counter()
    for line in body:
        name, rest = _INSTRUCTION.match(line).groups()
        found: set[str] = set()
        for operand in _operands(rest):
            found |= before.get(operand, frozenset())
        if _ALL_TO_ALL.search(" " + rest) and "/dispatch/" in rest:
            counts[len(found)] += 1  # a layer's dispatches follow as many of earlier layers
            found.add(name)
        before[name] = frozenset(found)
    return max(counts.values(), default=1)

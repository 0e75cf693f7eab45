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

from jaxmoe.analysis.collectives import _parse_module

_NAME = re.compile(r"%([\w.\-]+)")
_ALL_TO_ALL = ("all-to-all", "all-to-all-start")


def overlap_chunks(hlo: str) -> int:
    """The most dispatch all-to-alls of one MoE layer that do not depend on one another (1 for
    a program without them)."""
    computations = _parse_module(hlo).computations.values()
    body = next((c for c in computations if any(i.opcode in _ALL_TO_ALL for i in c)), None)
    if body is None:
        return 1
    # the dispatch all-to-alls each instruction depends on (the body lists operands first)
    before: dict[str, frozenset[str]] = {}
    counts: Counter[int] = Counter()
    for instr in body:
        found: set[str] = set()
        for operand in instr.operands:
            for name in _NAME.findall(operand):
                found |= before.get(name, frozenset())
        if instr.opcode in _ALL_TO_ALL and "/dispatch/" in instr.attrs:
            counts[len(found)] += 1  # a layer's dispatches follow as many of earlier layers
            found.add(instr.name)
        before[instr.name] = frozenset(found)
    return max(counts.values(), default=1)

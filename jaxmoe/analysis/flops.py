"""Matmul FLOPs per device of a compiled, partitioned program, every loop iteration counted.

XLA's cost analysis counts a while loop's body once, whatever its trip count, so a model whose
layers run under `scan` (or a pipeline's iterations) would be undercounted by the layer count.
This reads the compiled HLO instead: each `dot` (inside fusions too) costs 2 x output elements x
contracted elements, times how often its computation runs (the known trip counts of the
enclosing loops, as for the collectives). Elementwise work is not counted: in a transformer it
is a few percent of the matmuls, and the roofline's compute peak is a matmul peak.
"""

from __future__ import annotations

import math
import re
from collections import ChainMap

from jaxmoe.analysis.collectives import _ARRAY, _call_counts, _parse_module

_CONTRACTING = re.compile(r"\blhs_contracting_dims=\{([\d,]*)\}")


def _dims(shape: str) -> list[int]:
    found = _ARRAY.search(shape)
    if found is None:
        return []
    return [int(re.sub(r"\D", "", d) or 0) for d in found.group(2).split(",") if d]


def matmul_flops(hlo_text: str) -> float:
    """FLOPs of every dot in the module, per device, per call of the program."""
    module = _parse_module(hlo_text)
    counts = _call_counts(module)
    everywhere = {i.name: i.shape for body in module.computations.values() for i in body}
    total = 0.0
    for comp, body in module.computations.items():
        if comp not in counts:
            continue
        shapes = ChainMap({i.name: i.shape for i in body}, everywhere)
        for instr in body:
            if instr.opcode != "dot":
                continue
            shape, _, name = instr.operands[0].rpartition(" ")
            lhs = _dims(shape or shapes.get(name.lstrip("%"), ""))
            found = _CONTRACTING.search(instr.attrs)
            contracted = [int(d) for d in found.group(1).split(",") if d] if found else []
            per_call = 2 * math.prod(_dims(instr.shape)) * math.prod(lhs[d] for d in contracted)
            total += counts[comp][0] * per_call
    return total

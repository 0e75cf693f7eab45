"""ep16: large expert parallelism, one expert per device (papers 000 and 003), GShard-style.

Every MoE layer's experts are spread over the 16 devices (E/16 each: one when E = 16); attention,
dense MLPs and router are replicated and the batch (and routing groups) is split over the same
axis. Tokens reach their experts by one all-to-all and come back by another; nothing else moves
in the layers but the router's statistics. The embedding tables, the largest parameters of a
small-width model, are split by vocabulary over the same 16 devices rather than replicated: the
LM head gathers the final activations ([B, S, D], far smaller than the [D, V] table) and each
device computes its slice of the logits, so no device holds, updates or all-reduces a whole table.
"""

from meshes import compose

STRATEGY = compose.compose(
    compose.parse("ep16"),
    description="expert parallel 16: one expert per device, batch split over the same axis",
)

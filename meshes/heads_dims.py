"""heads_dims_4x4: head-group x head-dim slicing of attention (papers 002 and 004).

Mesh (heads=4, dims=4). W_q, W_k, W_v [D, H, K] and W_o [H, K, D] are split 16 ways: heads over
`heads`, head dim over `dims`, so each device holds 1/16 of the attention weights. Each device
projects its [H/4, K/4] slice from the replicated residual; an all-to-all inside each head group
(over `dims`) then rebuilds whole head vectors while splitting the batch 4 ways, so every head of
the group is computed once and no [S, S] tensor crosses devices. Another all-to-all returns the
[H/4, K/4] slices, and W_o's partial sums are all-reduced over `dims` and then over `heads`
(XLA reduces the two split contraction axes one after the other).

The papers do not say how the MLP and experts use the 16 devices. Here: the dense MLP is Megatron
tensor parallel over all 16 (hidden width split 16 ways, one all-reduce); experts are split over
`heads` (E/4 per group) with their hidden width over `dims`, tokens replicated, so each device
holds 1/16 of the expert weights; the expert outputs are all-reduced over `dims` and the combined
tokens over `heads`.
"""

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.sharding import Strategy
from meshes import volumes
from meshes.axes import MeshAxis

GROUPS, SLICES = 4, 4
N = GROUPS * SLICES


def textbook_bytes(cfg: ModelConfig) -> dict[str, float]:
    act = volumes.activation_bytes(cfg)
    heads_act = cfg.tokens * cfg.n_heads * cfg.head_dim * cfg.compute_dtype.itemsize  # q, k, v, o
    attention = (
        4 * volumes.all_to_all(heads_act / GROUPS, SLICES)
        + volumes.all_reduce(act, SLICES)
        + volumes.all_reduce(act, GROUPS)
    )
    dense = attention + volumes.all_reduce(act, N)
    if not cfg.is_moe:
        return {"dense": dense, "moe": 0.0}
    expert_out = volumes.slots_bytes(cfg) / GROUPS  # each head group holds E/4 experts' slots
    moe = attention + volumes.all_reduce(expert_out, SLICES) + volumes.all_reduce(act, GROUPS)
    return {"dense": dense, "moe": moe}


STRATEGY = Strategy(
    name="heads_dims_4x4",
    mesh_shape=((MeshAxis.HEADS, GROUPS), (MeshAxis.DIMS, SLICES)),
    rules={
        Axis.HEADS: (MeshAxis.HEADS,),
        Axis.HEAD_DIM: (MeshAxis.DIMS,),
        Axis.ATTN_BATCH: (MeshAxis.DIMS,),
        Axis.MLP: (MeshAxis.HEADS, MeshAxis.DIMS),
        Axis.EXPERT: (MeshAxis.HEADS,),
        Axis.EXPERT_MLP: (MeshAxis.DIMS,),
        Axis.VOCAB: (MeshAxis.HEADS, MeshAxis.DIMS),
    },
    description="attention heads over 4 groups x head dim over 4 slices; MLP and experts 16-way",
    textbook_bytes=textbook_bytes,
)

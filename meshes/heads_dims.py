"""heads_dims_4x4: head-group x head-dim slicing of attention (papers 002 and 004).

Mesh (heads=4, dims=4). W_q, W_k, W_v [D, H, K] and W_o [H, K, D] are split 16 ways: heads over
`heads`, head dim over `dims`, so each device holds 1/16 of the attention weights. Each device
projects its [H/4, K/4] slice from the replicated residual; an all-to-all inside each head group
(over `dims`) then rebuilds whole head vectors while splitting the batch 4 ways, so every head of
the group is computed once and no [S, S] tensor crosses devices. Another all-to-all returns the
[H/4, K/4] slices, and W_o's partial sums are all-reduced once over all 16 devices
(`partial_sums.project_once`; XLA's partitioner would reduce over `dims`, then over `heads`:
3 activations' bytes per device instead of 1.875).

The papers do not say how the MLP and experts use the 16 devices. Here: the dense MLP is Megatron
tensor parallel over all 16 (hidden width split 16 ways, one all-reduce); experts are split over
`heads` (E/4 per group) with their hidden width over `dims`, tokens replicated, so each device
holds 1/16 of the expert weights. Each device dispatches the tokens to its experts' slots, runs
its slice of their width and combines; the tokens' partial outputs [tokens, D] are all-reduced
once over all 16 (XLA alone would all-reduce the expert outputs [E, G, C, D] over `dims`, then
the tokens over `heads`).
"""

from meshes import compose

STRATEGY = compose.compose(
    compose.parse("heads4_dims4"),
    name="heads_dims_4x4",
    description="attention heads over 4 groups x head dim over 4 slices; MLP and experts 16-way",
)

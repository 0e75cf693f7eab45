"""tp16: Megatron tensor parallelism over 16 devices.

Attention is split by heads (QKV column-parallel, output row-parallel), the MLP by its hidden
width (up column-parallel, down row-parallel), the vocabulary of the embedding and LM head 16
ways. Every expert lives on every device with its hidden width split 16 ways (paper 003's
baseline placement). The residual stream is replicated: one all-reduce of a [tokens, D]
activation after attention and one after the MLP. In an MoE layer too: each device dispatches
the tokens to its width of every expert, runs it and combines, and the tokens' partial outputs
are all-reduced once (`moe.py`). XLA's partitioner alone all-reduces the expert outputs
[E, G, C, D] before the combine, top_k x capacity_factor times the bytes.
"""

from meshes import compose

STRATEGY = compose.compose(
    compose.parse("tp16"),
    description="Megatron tensor parallel 16: heads, MLP and expert width, vocab split 16 ways",
)

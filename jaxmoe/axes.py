"""The logical axis names, the one glossary of dimension letters, used by all model code.

Dimension letters (einsum strings, shape comments and spec names use these and no others):

    B batch          S sequence (T: the attended-to sequence)   D model width
    H heads          K head dim                                 F MLP / expert hidden
    E experts        C capacity (token slots per expert)        G routing groups
    L layers         V vocabulary                               N devices on a mesh axis
    X an expert's slots over all its groups (G and C merged: G*C)
    J key-value heads (grouped-query attention: H = J x the query heads per group)
    R a compressed (latent) width: multi-head latent attention's key-value or query rank
    P a token's routing choices (top_k of them)

Model code names these logical axes only; a strategy (``meshes/``) maps each one to mesh axes.
"""

from enum import StrEnum


class Axis(StrEnum):
    """Logical axes of parameters and activations."""

    BATCH = "batch"  # B, everywhere outside the attention core
    ATTN_BATCH = "attn_batch"  # B inside the attention core (scores, softmax, values)
    LM_BATCH = "lm_batch"  # B in the LM head and the loss (logits [B, S, V])
    SEQ = "seq"  # S
    EMBED = "embed"  # D
    HEADS = "heads"  # H
    KV_HEADS = "kv_heads"  # J: split as HEADS where that divides them, else replicated
    HEAD_DIM = "head_dim"  # K
    MLP = "mlp"  # F of the dense MLP
    EXPERT = "expert"  # E
    EXPERT_MLP = "expert_mlp"  # F inside an expert
    GROUP = "group"  # G, the routing groups of tokens
    CAPACITY = "capacity"  # C
    VOCAB = "vocab"  # V
    LAYERS = "layers"  # L, the stacked-layer axis that scan runs over

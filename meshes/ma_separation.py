"""ma_separation: attention and experts on two disjoint sub-meshes (paper 001, strategy D).

The attention mesh (12 devices by default) is `replica` groups x `heads`: each replica group
holds a whole copy of the attention side (embeddings, norms, attention, LM head) and runs its
share of the batch; inside a group heads are split Megatron-style (one all-reduce after the
output projection), unevenly when they do not divide (masked heads padded in, reported). The
expert mesh (4 devices) is expert parallel: the experts' input arrives split by sequences, one
all-to-all takes tokens to their experts and one brings them back, as in ep16. Per layer the
experts' input [tokens, D] crosses to the expert mesh and their output crosses back.

`separation(12, 4)` is the paper's split; `ma_separation:A+X` names another (e.g. `:8+8`,
`:5+11`), with 2 replica groups where A is even, else 1; `ma_separation:A+X/R` sets R (the paper
lists both a replication factor of 2 and 32 heads spread 3,3,3,3,3,3,3,3,2,2,2,2 over all 12
attention devices, which is `ma_separation:12+4/1`).
"""

from jaxmoe.axes import Axis
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.separation import Separation
from jaxmoe.sharding import Strategy
from meshes import volumes
from meshes.axes import MeshAxis

NAME = "ma_separation"
ATTENTION, EXPERTS, REPLICAS = 12, 4, 2


def _attention_bytes(cfg: ModelConfig, replicas: int, group: int) -> dict[str, float]:
    """Per attention device: one all-reduce of a replica group's [tokens, D] per attention; in
    training, the group's vocabulary-parallel embedding, head and loss."""
    attention = volumes.all_reduce(volumes.activation_bytes(cfg) / replicas, group)
    vocab = volumes.vocabulary_bytes(cfg, group, replicas, replicas)
    return {"dense": 2 * attention, "moe": attention, "vocab": vocab, "moe_backward": 0.0}


def _expert_bytes(cfg: ModelConfig, experts: int) -> dict[str, float]:
    """Per expert device: the all-to-all to the experts and the one back, as in ep16."""
    moe = 2 * volumes.all_to_all(volumes.slots_bytes(cfg), experts)
    return {"dense": 0.0, "moe": moe, "vocab": 0.0, "moe_backward": 0.0}


def separation(
    attention: int = ATTENTION, experts: int = EXPERTS, replicas: int | None = None
) -> Separation:
    if attention < 1 or experts < 1:
        raise ConfigError(
            f"{NAME}:{attention}+{experts}: each sub-mesh needs at least one device; "
            f"use e.g. {NAME}:12+4"
        )
    if replicas is None:
        replicas = REPLICAS if attention % REPLICAS == 0 else 1
    if replicas < 1:
        raise ConfigError(
            f"{NAME}:{attention}+{experts}/{replicas}: needs at least one replica group; "
            f"use e.g. {NAME}:{attention}+{experts}/1"
        )
    if attention % replicas:
        raise ConfigError(
            f"{NAME}: {attention} attention devices do not form {replicas} replica groups; "
            f"choose a multiple of {replicas}"
        )
    if attention % experts or experts % replicas:
        raise ConfigError(
            f"{NAME}:{attention}+{experts}/{replicas}: the attention devices must cut into "
            f"{experts} equal slices, one per expert device, {experts // replicas or 1} per "
            f"replica group; choose attention devices as a multiple of the expert devices and "
            f"expert devices as a multiple of the replica groups (e.g. 12+4, 8+8, 14+2)"
        )
    group = attention // replicas
    slices = experts // replicas  # per replica group
    heads = (MeshAxis.SLICE, MeshAxis.HEADS)
    attn = Strategy(
        name=f"{NAME}/attention",
        mesh_shape=(
            (MeshAxis.REPLICA, replicas),
            (MeshAxis.SLICE, slices),
            (MeshAxis.HEADS, group // slices),
        ),
        rules={
            Axis.BATCH: (MeshAxis.REPLICA,),
            Axis.ATTN_BATCH: (MeshAxis.REPLICA,),
            Axis.LM_BATCH: (MeshAxis.REPLICA,),
            Axis.HEADS: heads,
            Axis.VOCAB: heads,
        },
        description=f"{replicas} replica groups x {group} devices splitting heads",
        minimum_bytes=lambda cfg: _attention_bytes(cfg, replicas, group),
    )
    expert = Strategy(
        name=f"{NAME}/experts",
        mesh_shape=((MeshAxis.EXPERT, experts),),
        rules={
            Axis.BATCH: (MeshAxis.EXPERT,),
            Axis.GROUP: (MeshAxis.EXPERT,),
            Axis.EXPERT: (MeshAxis.EXPERT,),
        },
        description=f"expert parallel {experts}",
        minimum_bytes=lambda cfg: _expert_bytes(cfg, experts),
    )
    name = f"{NAME}:{attention}+{experts}/{replicas}"
    if (attention, experts, replicas) == (ATTENTION, EXPERTS, REPLICAS):
        name = NAME
    return Separation(
        name=name,
        attention=attn,
        experts=expert,
        replica_axis=MeshAxis.REPLICA,
        slice_axis=MeshAxis.SLICE,
        heads_axis=MeshAxis.HEADS,
        description=(
            f"attention on {attention} devices ({replicas} replicas x {group} heads-split), "
            f"experts on {experts} (EP {experts}); [tokens, D] crosses each way per MoE layer"
        ),
    )


def parse(name: str) -> Separation:
    """`ma_separation`, `ma_separation:A+X` or `ma_separation:A+X/R` (R replica groups)."""
    if name == NAME:
        return separation()
    spec = name.removeprefix(f"{NAME}:")
    try:
        devices, _, replicas = spec.partition("/")
        attention, experts = (int(part) for part in devices.split("+"))
        groups = int(replicas) if replicas else None
    except ValueError:
        raise ConfigError(
            f"{name!r}: expected {NAME}:A+X or {NAME}:A+X/R (A attention devices in R replica "
            f"groups, X expert devices), e.g. {NAME}:12+4 or {NAME}:12+4/1"
        ) from None
    return separation(attention, experts, groups)

"""tp8_pp2: the papers' baseline, tensor parallel 8 inside each of 2 pipeline stages.

Mesh (pipe=2, tensor=8). The stacked layers are split over `pipe` (stage 0 holds the first half)
and run by the GPipe schedule of `meshes/pipeline.py` (`micro_batches` from the config); inside
a stage, Megatron tensor parallelism over `tensor` as in tp16. Embeddings and LM head are split
by vocabulary over `tensor` and replicated over `pipe`. MoE layers have two placements:

- `tp8_pp2`: experts split over `tensor` (paper 000: 16 experts -> 2 per device), tokens
  replicated inside the stage; the combine's partial sums are all-reduced over `tensor`.
- `tp8_pp2:experts_tp`: every expert on every device of the stage with its hidden width split
  over `tensor` (paper 003); the expert outputs are all-reduced before the combine.

In progress (issue 4): the schedule computes the same logits, loss and gradients as one device
(tests/test_pipeline.py), but these strategies join the registry only once `textbook_bytes`
below is held to the compiled program: today it counts the Megatron all-reduces of the whole
batch and one stage-boundary crossing, not the per-iteration traffic of the schedule (bubble
iterations, micro-batch injection and output collection).
"""

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.sharding import Strategy
from meshes import pipeline, volumes
from meshes.axes import MeshAxis

STAGES, TP = 2, 8

MEGATRON = {
    Axis.LAYERS: (MeshAxis.PIPE,),
    Axis.HEADS: (MeshAxis.TENSOR,),
    Axis.MLP: (MeshAxis.TENSOR,),
    Axis.VOCAB: (MeshAxis.TENSOR,),
}


def textbook(experts_split: bool):
    def textbook_bytes(cfg: ModelConfig) -> dict[str, float]:
        act = volumes.activation_bytes(cfg)
        attention = volumes.all_reduce(act, TP)
        moe = attention + volumes.all_reduce(act if experts_split else volumes.slots_bytes(cfg), TP)
        # a micro-batch of activations crosses to the next stage once per stage boundary:
        # spread over the layers, (P - 1) / P of [tokens, D] per stage's L/P layers
        shift = act * (STAGES - 1) / cfg.n_layers
        return {"dense": 2 * attention + shift, "moe": moe + shift}

    return textbook_bytes


def _check(cfg: ModelConfig) -> None:
    pipeline.check(cfg, STAGES)


STRATEGY = Strategy(
    name="tp8_pp2",
    mesh_shape=((MeshAxis.PIPE, STAGES), (MeshAxis.TENSOR, TP)),
    rules={**MEGATRON, Axis.EXPERT: (MeshAxis.TENSOR,)},
    description="tensor parallel 8 x pipeline parallel 2 (GPipe); experts split over tensor",
    textbook_bytes=textbook(experts_split=True),
    run_layers=pipeline.gpipe(MeshAxis.PIPE),
    check=_check,
)

EXPERTS_TP = Strategy(
    name="tp8_pp2:experts_tp",
    mesh_shape=STRATEGY.mesh_shape,
    rules={**MEGATRON, Axis.EXPERT_MLP: (MeshAxis.TENSOR,)},
    description="tensor parallel 8 x pipeline parallel 2; every expert's width split over tensor",
    textbook_bytes=textbook(experts_split=False),
    run_layers=STRATEGY.run_layers,
    check=_check,
)

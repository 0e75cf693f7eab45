"""tp8_pp2: the papers' baseline, tensor parallel 8 inside each of 2 pipeline stages.

Mesh (pipe=2, tensor=8). The stacked layers are split over `pipe` (stage 0 holds the first half)
and run by the GPipe schedule of `meshes/pipeline.py` (`micro_batches` from the config); inside
a stage, Megatron tensor parallelism over `tensor` as in tp16. Embeddings and LM head are split
by vocabulary over `tensor` and replicated over `pipe`. MoE layers have two placements:

- `tp8_pp2`: experts split over `tensor` (paper 000: 16 experts -> 2 per device), tokens
  replicated inside the stage; the combine's partial sums are all-reduced over `tensor`.
- `tp8_pp2:experts_tp`: every expert on every device of the stage with its hidden width split
  over `tensor` (paper 003); the expert outputs are all-reduced before the combine.

Per iteration of the schedule (M + P - 1 of them, bubbles included: an idle stage still runs
its layers and collectives on an empty micro-batch) each device all-reduces over `tensor` twice
per layer of its stage, on one micro-batch, and sends that micro-batch to the next stage by one
collective-permute over `pipe`. After the loop one all-reduce over `pipe` hands the last stage's
results to all. Nothing spans all 16 devices. The permute carries the micro-batch whole, as every
device of a stage holds it; sending 1/8 per device and all-gathering over `tensor` on arrival
(Megatron's scatter/gather) would cut the inter-stage bytes 8 times and is not done here.
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
        m, iterations = cfg.micro_batches, cfg.micro_batches + STAGES - 1
        # a device runs its stage's L/P layers once per iteration on 1/M of the batch
        share = iterations / (m * STAGES)
        act = volumes.activation_bytes(cfg)
        attention = volumes.all_reduce(act, TP)
        experts = volumes.all_reduce(act if experts_split else volumes.slots_bytes(cfg), TP)
        # one micro-batch to the next stage per iteration, spread over the layers
        shift = iterations * (act / m) / cfg.n_layers
        return {
            "dense": share * 2 * attention + shift,
            "moe": share * (attention + experts) + shift,
        }

    return textbook_bytes


def _check(cfg: ModelConfig) -> None:
    pipeline.check(cfg, STAGES)


def _bubble(cfg: ModelConfig) -> float:
    return pipeline.bubble_fraction(STAGES, cfg.micro_batches)


STRATEGY = Strategy(
    name="tp8_pp2",
    mesh_shape=((MeshAxis.PIPE, STAGES), (MeshAxis.TENSOR, TP)),
    rules={**MEGATRON, Axis.EXPERT: (MeshAxis.TENSOR,)},
    description="tensor parallel 8 x pipeline parallel 2 (GPipe); experts split over tensor",
    textbook_bytes=textbook(experts_split=True),
    run_layers=pipeline.gpipe(MeshAxis.PIPE),
    extra_checks=_check,
    bubble_fraction=_bubble,
)

EXPERTS_TP = Strategy(
    name="tp8_pp2:experts_tp",
    mesh_shape=STRATEGY.mesh_shape,
    rules={**MEGATRON, Axis.EXPERT_MLP: (MeshAxis.TENSOR,)},
    description="tensor parallel 8 x pipeline parallel 2; every expert's width split over tensor",
    textbook_bytes=textbook(experts_split=False),
    run_layers=STRATEGY.run_layers,
    extra_checks=_check,
    bubble_fraction=_bubble,
)

"""tp8_pp2: the papers' baseline, tensor parallel 8 inside each of 2 pipeline stages.

Mesh (pipe=2, tensor=8). The stacked layers are split over `pipe` (stage 0 holds the first half)
and run by the GPipe schedule of `meshes/pipeline.py` (`micro_batches` from the config); inside
a stage, Megatron tensor parallelism over `tensor` as in tp16. Embeddings and LM head are split
by vocabulary over `tensor` and replicated over `pipe`. MoE layers have two placements:

- `tp8_pp2`: experts split over `tensor` (paper 000: 16 experts -> 2 per device), tokens
  replicated inside the stage; the combine's partial sums are all-reduced over `tensor`.
- `tp8_pp2:experts_tp`: every expert on every device of the stage with its hidden width split
  over `tensor` (paper 003); each device combines its width's partial outputs locally and the
  tokens [tokens, D] are all-reduced over `tensor` once (as the dense MLP's), not the expert
  outputs [E, G, C, D] (k x capacity_factor times the bytes) before the combine.

Per iteration of the schedule (M + P - 1 of them, bubbles included: an idle stage still runs
its layers and collectives on an empty micro-batch) each device all-reduces over `tensor` twice
per layer of its stage, on one micro-batch, and sends that micro-batch to the next stage by one
collective-permute over `pipe`. After the loop one reduce-scatter over `pipe` hands each stage
its share of the last stage's results, on which it runs the LM head (the head's batch is split
over `pipe`). Nothing spans all 16 devices. The permute carries the micro-batch whole, as every
device of a stage holds it; sending 1/8 per device and all-gathering over `tensor` on arrival
(Megatron's scatter/gather) would cut the inter-stage bytes 8 times and is not done here.
"""

from meshes import compose

COMPOSITION = compose.Composition({"tp": 8, "pp": 2}, experts_over_tp=True)
STRATEGY = compose.compose(
    COMPOSITION,
    name="tp8_pp2",
    description="tensor parallel 8 x pipeline parallel 2 (GPipe); experts split over tensor",
)

EXPERTS_TP = compose.compose(
    compose.parse("tp8_pp2"),
    name="tp8_pp2:experts_tp",
    description="tensor parallel 8 x pipeline parallel 2; every expert's width split over tensor",
)

"""Layouts composed from parallelism axes: `dp2_ep8`, `fsdp4_tp4`, `dp2_tp4_pp2`, `heads4_dims8`.

A name is underscore-joined tokens `<axis><size>`, any order; the sizes multiply to the device
count. Each axis contributes rules for activations and parameters, its checks and the least
traffic it needs:

- `dp`   data parallel: the batch split over `data`; parameters and Adam's state replicated, the
         gradients all-reduced once per step. With `pp`, each stacked block's Adam state is
         split over `data` (ZeRO-1): its gradient reduce-scattered, its new weights all-gathered.
- `fsdp` fully sharded data parallel (ZeRO-3): the batch split over `fsdp`, and every weight's
         model width (D) too; a layer's weights are all-gathered where they are used and their
         gradients reduce-scattered, so each device holds 1/fsdp of parameters and Adam's state.
- `tp`   Megatron tensor parallel over `tensor`: heads, the MLP's and every expert's hidden
         width, the vocabulary; one all-reduce after attention and one after the MLP.
- `pp`   pipeline stages over `pipe` (the GPipe schedule of `meshes/pipeline.py`).
- `ep`   expert parallel over `expert`: experts split, and the batch with them (one all-to-all
         to the experts and one back); with `tp`, each expert's width is split over `tensor`
         (expert-tensor parallelism), and the vocabulary over both.
- `heads`, `dims` (together): attention's heads over `heads` and head dim over `dims`, the
         batch over `dims` inside the attention core; the MLP and the vocabulary over both,
         experts over `heads` with their width over `dims` (papers 002 and 004).

Mesh axes run outermost first as pipe, data, fsdp, expert, heads, dims, tensor, so tensor
parallel groups are neighbours (one node) and pipeline stages the farthest apart. A name may end
in `@` and its axes outermost first (`heads4_dims4@dims-heads`: heads innermost) to lay them over
the devices in another order; `orders` gives the orders that put different axes inside a node,
which `plan` tries.
"""

from __future__ import annotations

import dataclasses
import math
import re

from jaxmoe.axes import Axis
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.sharding import Strategy
from meshes import pipeline, volumes
from meshes.axes import MeshAxis

# name token -> mesh axis, in mesh order (outermost first)
AXES = {
    "pp": MeshAxis.PIPE,
    "dp": MeshAxis.DATA,
    "fsdp": MeshAxis.FSDP,
    "ep": MeshAxis.EXPERT,
    "heads": MeshAxis.HEADS,
    "dims": MeshAxis.DIMS,
    "tp": MeshAxis.TENSOR,
}
NAME_ORDER = ("dp", "fsdp", "ep", "heads", "dims", "tp", "pp")  # how a name is written
EXAMPLES = "e.g. dp2_ep8, fsdp4_tp4, dp2_tp4_pp2, ep8_tp2, heads4_dims4, tp8_pp2"
_TOKEN = re.compile(r"([a-z]+)(\d+)")


@dataclasses.dataclass(frozen=True)
class Composition:
    """Axis sizes (name token -> size; absent axes are 1). `experts_over_tp`: experts split over
    `tensor` with tokens replicated there (the papers' tp8_pp2) instead of each expert's width."""

    sizes: dict[str, int]
    experts_over_tp: bool = False
    order: tuple[str, ...] = ()  # the axes' tokens outermost first; () = AXES's order

    def __getitem__(self, token: str) -> int:
        return self.sizes.get(token, 1)

    @property
    def default_order(self) -> tuple[str, ...]:
        """The tokens of the axes of size > 1 in AXES's order, outermost first."""
        return tuple(t for t in AXES if self[t] > 1)

    @property
    def axes_order(self) -> tuple[str, ...]:
        """The tokens of the axes of size > 1, outermost first."""
        return self.order or self.default_order

    @property
    def name(self) -> str:
        name = "_".join(f"{t}{self[t]}" for t in NAME_ORDER if self[t] > 1) or "dp1"
        order = self.axes_order
        return name if order == self.default_order else f"{name}@{'-'.join(order)}"

    @property
    def n_devices(self) -> int:
        return math.prod(self.sizes.values())

    @property
    def batch_split(self) -> int:
        """Devices the batch is split over outside the attention core."""
        return self["dp"] * self["fsdp"] * self["ep"]

    @property
    def vocab_split(self) -> int:
        """Devices the vocabulary (embedding and LM head) is split over."""
        return self["ep"] * self["heads"] * self["dims"] * self["tp"]

    @property
    def model_split(self) -> int:
        """Devices a layer's attention and MLP weights are split over (FSDP aside)."""
        return self["tp"] * self["heads"] * self["dims"]


def looks_composed(name: str) -> bool:
    """Whether the name is written as axes with sizes (known or not)."""
    return all(_TOKEN.fullmatch(token) for token in name.split("@")[0].split("_"))  # not `a:b`


def parse(name: str) -> Composition:
    """A composition from its name, or a one-line ConfigError naming the fix."""
    name, _, order = name.partition("@")
    c = _parse_sizes(name)
    if not order:
        return c
    tokens = tuple(order.split("-"))
    if sorted(tokens) != sorted(c.axes_order):
        raise ConfigError(
            f"layout {name}@{order}: the order must name each of its axes {', '.join(c.axes_order)}"
            f" once, outermost first, e.g. {name}@{'-'.join(reversed(c.axes_order))}"
        )
    return dataclasses.replace(c, order=tokens)


def _parse_sizes(name: str) -> Composition:
    sizes: dict[str, int] = {}
    for token in name.split("_"):
        match = _TOKEN.fullmatch(token)
        if not match or match[1] not in AXES:
            raise ConfigError(
                f"layout {name!r}: {token!r} is not an axis with a size; write axes from "
                f"{', '.join(NAME_ORDER)} each with its size, {EXAMPLES}"
            )
        axis, size = match[1], int(match[2])
        if axis in sizes or size < 1:
            why = "names it twice" if axis in sizes else "gives it size 0"
            raise ConfigError(f"layout {name!r} {why}; give each axis once, a size of 1 or more")
        sizes[axis] = size
    sizes = {t: s for t, s in sizes.items() if s > 1}
    if ("heads" in sizes) != ("dims" in sizes):
        raise ConfigError(
            f"layout {name!r}: heads and dims slice attention together; give both, "
            f"e.g. heads4_dims4"
        )
    if "heads" in sizes and ({"tp", "ep"} & set(sizes)):
        raise ConfigError(
            f"layout {name!r}: heads x dims already splits the MLP and the experts; compose it "
            f"with dp, fsdp or pp, not tp or ep"
        )
    return Composition(sizes)


def _rules(c: Composition) -> tuple[dict, dict]:
    """(activation rules, the parameters' where they differ)."""
    present = [AXES[t] for t in AXES if c[t] > 1]

    def on(*tokens: str) -> tuple[MeshAxis, ...]:
        return tuple(a for a in present if a in {AXES[t] for t in tokens})

    batch = on("dp", "fsdp", "ep")
    rules = {
        Axis.BATCH: batch,
        Axis.ATTN_BATCH: on("dp", "fsdp", "ep", "dims"),
        Axis.LM_BATCH: on("dp", "fsdp", "pp"),
        Axis.GROUP: batch,
        Axis.LAYERS: on("pp"),
        Axis.HEADS: on("heads", "tp"),
        Axis.HEAD_DIM: on("dims"),
        Axis.MLP: on("heads", "dims", "tp"),
        Axis.EXPERT: on("ep", "heads", "tp") if c.experts_over_tp else on("ep", "heads"),
        Axis.EXPERT_MLP: () if c.experts_over_tp else on("dims", "tp"),
        Axis.VOCAB: on("ep", "heads", "dims", "tp"),
    }
    return {k: v for k, v in rules.items() if v}, {Axis.EMBED: on("fsdp")} if c["fsdp"] > 1 else {}


def minimum_bytes(c: Composition, cfg: ModelConfig) -> dict[str, float]:
    """The least bytes one device sends per layer in the forward pass (strategies.md's ring
    formulas), each collective on the share of the batch its group holds:

    - tp: one all-reduce of the tokens [B, S, D] after attention and one after the MLP or the
      experts; heads x dims: four all-to-alls over dims (q, k, v to whole heads, the output
      back) and one all-reduce over all h x d devices for each of W_o, the MLP, the experts;
    - ep: the dispatched slots [E, G, C, D] to the experts and back, an all-to-all each way
      (with tp too, the expert outputs summed over tensor where they are);
    - fsdp: each layer's weights all-gathered where used (the block the model axes leave);
    - pp: a device runs its stage's L/P layers once over its batch and sends its activations to
      the next stage once; the schedule's idle iterations, which still send, are the bubble's
      (x (M + P - 1) / M in the compiled program), not counted here.

    The training step's backward pass moves what the forward pass does (each collective's
    transpose) and adds: where tokens stay in place and the experts' width is split ("local"
    below), each token's gate per expert [G, S, E] summed with its input gradient ("moe_backward",
    per MoE layer); the vocabulary-parallel embedding, LM head and loss (`volumes.vocabulary_bytes`,
    "vocab", per step), the head's batch split over data, fsdp and pipe; and a pipeline's ends
    (`_pipeline_ends`).

    One exception is XLA's, kept because the one-sum region cannot take it: under FSDP, expert
    outputs split by width are all-reduced as [E, G, C, D] before the combine (moe.py)."""
    ar, ag, a2a = volumes.all_reduce, volumes.all_gather, volumes.all_to_all
    act = volumes.activation_bytes(cfg) / c.batch_split  # a [B, S, D] of one batch group
    slots = volumes.slots_bytes(cfg) / (c["dp"] * c["fsdp"])  # [E, G, C, D] of an ep group
    tp, ep, h, d = c["tp"], c["ep"], c["heads"], c["dims"]
    if h > 1:
        # q, k, v to whole head vectors and the output back: four all-to-alls over dims; the
        # output projection, the MLP and the experts each sum their partial outputs over all
        # h x d devices in one all-reduce
        heads_act = cfg.tokens * cfg.n_heads * cfg.head_dim * cfg.compute_dtype.itemsize
        attention = 4 * a2a(heads_act / c.batch_split / h, d) + ar(act, h * d)
        mlp = experts = ar(act, h * d)
        local, summed_over = True, h * d
    else:
        attention = mlp = ar(act, tp)
        # without ep, each device's experts (or expert width) combine their slots locally and
        # the tokens' outputs are summed once; with ep, tokens go to the experts' devices and
        # back, and the expert outputs [E, G, C, D] are summed over tensor where they are
        local, summed_over = ep == 1 and c["fsdp"] == 1, tp
        experts = ar(act if local else slots / ep, tp) + 2 * a2a(slots, ep)
    # each token's gates: summed over the devices that split the experts' width, gathered
    # over those that split the experts whole
    gates = volumes.gates_bytes(cfg) / c.batch_split
    gates = (ag(gates, tp) if c.experts_over_tp else ar(gates, summed_over)) if local else 0.0
    outside = c["dp"] * c["fsdp"]  # the batch's split outside the vocabulary's devices
    vocab = volumes.vocabulary_bytes(cfg, c.vocab_split, outside, outside * c["pp"])
    if c["pp"] > 1:
        vocab += _pipeline_ends(c, cfg, act)
    # FSDP gathers each layer's weights (the block its model axes leave each device) where used
    w, split = volumes.layer_weights(cfg), c.model_split
    gather = {
        "dense": (w["attention"] + w["mlp"]) / split + w["norms"],
        "moe": w["attention"] / split + w["experts"] / (split * ep) + w["router"] + w["norms"],
    }
    dense = attention + mlp + volumes.all_gather(gather["dense"], c["fsdp"])
    moe = attention + experts + volumes.all_gather(gather["moe"], c["fsdp"])
    train = {"vocab": vocab, "moe_backward": gates if cfg.is_moe else 0.0}
    if c["pp"] == 1:
        return {"dense": dense, "moe": moe if cfg.is_moe else 0.0, **train}
    # a device runs its stage's L/P layers over its batch and sends it on once (spread over the
    # layers); the compiled schedule runs M + P - 1 iterations of 1/M of the batch
    stages, shift = c["pp"], act / cfg.n_layers
    return {
        "dense": dense / stages + shift,
        "moe": moe / stages + shift if cfg.is_moe else 0.0,
        "vocab": vocab,
        "moe_backward": train["moe_backward"] / stages,
    }


def _pipeline_ends(c: Composition, cfg: ModelConfig, act: float) -> float:
    """A pipeline's training step at its ends: the last stage hands each stage its share of the
    batch for the LM head and takes the gradient back (a reduce-scatter and an all-gather over
    pipe); the embedding, run on every stage, gets the first stage's input gradient summed
    over pipe, so every stage's token table has the same gradient: the table's gradient, which
    `gradient_sync_bytes` counts as summed over pipe, is not (a tied table's still is, the
    head's share of it differing by stage)."""
    p = c["pp"]
    ends = 2 * volumes.all_gather(act, p) + volumes.all_reduce(act, p)
    if cfg.tie_embeddings:
        return ends
    table = cfg.padded_vocab * cfg.d_model * cfg.weight_dtype.itemsize / c.vocab_split / c["fsdp"]
    return ends - 2 * table / c["dp"] * (p - 1) / p


def _checks(c: Composition):
    def check(cfg: ModelConfig) -> None:
        if c["pp"] > 1:
            pipeline.check(cfg, c["pp"])
            if (cfg.batch // cfg.micro_batches) % c.batch_split:
                raise ConfigError(
                    f"layout {c.name}: a micro-batch of {cfg.batch // cfg.micro_batches} "
                    f"sequences (batch {cfg.batch} / micro_batches {cfg.micro_batches}) does not "
                    f"split over {c.batch_split} devices; choose batch as a multiple of "
                    f"{cfg.micro_batches * c.batch_split}"
                )

    return check


def compose(c: Composition, name: str | None = None, description: str | None = None) -> Strategy:
    """The strategy of a composition (named `name`, its canonical name by default)."""
    rules, params = _rules(c)
    pp = c["pp"]
    return Strategy(
        name=name or c.name,
        mesh_shape=tuple((AXES[t], c[t]) for t in c.axes_order) or ((MeshAxis.DATA, 1),),
        rules=rules,
        param_rules=params,
        state_axes=(MeshAxis.DATA,) if pp > 1 and c["dp"] > 1 else (),
        description=description or _describe(c),
        minimum_bytes=lambda cfg: minimum_bytes(c, cfg),
        extra_checks=_checks(c),
        **(
            {
                "run_layers": pipeline.gpipe(MeshAxis.PIPE),
                "bubble_fraction": lambda cfg: pipeline.bubble_fraction(pp, cfg.micro_batches),
            }
            if pp > 1
            else {}
        ),
    )


WORDS = {
    "dp": "data parallel",
    "fsdp": "fully sharded data parallel",
    "ep": "expert parallel",
    "heads": "head groups",
    "dims": "head-dim slices",
    "tp": "tensor parallel",
    "pp": "pipeline stages",
}


def _describe(c: Composition) -> str:
    return " x ".join(f"{WORDS[t]} {c[t]}" for t in NAME_ORDER if c[t] > 1) or "one device"


def compositions(n_devices: int) -> list[Composition]:
    """Every composition of `n_devices` devices: each way to write it as a product of axis sizes
    (sizes above 1; heads and dims together, never with tp or ep)."""
    families = (("dp", "fsdp", "ep", "tp", "pp"), ("dp", "fsdp", "heads", "dims", "pp"))
    found: dict[str, Composition] = {}
    for tokens in families:
        for sizes in _factorisations(n_devices, len(tokens)):
            c = Composition({t: s for t, s in zip(tokens, sizes, strict=True) if s > 1})
            if ("heads" in c.sizes) == ("dims" in c.sizes):
                found.setdefault(c.name, c)
    return list(found.values())


def orders(c: Composition, per_node: int) -> list[Composition]:
    """The composition in each device order that puts a different set of its axes wholly inside
    a node of `per_node` devices: AXES's order first, then each axis moved innermost (the axis
    whose traffic should stay on NVLink). One order when the composition fits in a node."""
    if c.n_devices <= per_node:
        return [c]
    default = c.default_order
    found: dict[frozenset[str], Composition] = {}
    for inner in (None, *default):
        order = default if inner is None else (*[t for t in default if t != inner], inner)
        inside, span = set(), 1
        for token in reversed(order):
            span *= c[token]
            if span > per_node:
                break
            inside.add(token)
        option = dataclasses.replace(c, order=() if order == default else order)
        found.setdefault(frozenset(inside), option)
    return list(found.values())


def _factorisations(n: int, parts: int) -> list[tuple[int, ...]]:
    """Ordered tuples of `parts` positive integers whose product is n."""
    if parts == 1:
        return [(n,)]
    return [
        (d, *rest)
        for d in range(1, n + 1)
        if n % d == 0
        for rest in _factorisations(n // d, parts - 1)
    ]


def layout(name: str) -> Strategy:
    return compose(parse(name))

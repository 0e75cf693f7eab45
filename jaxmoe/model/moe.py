"""Mixture-of-Experts layer: router, top-k with capacity, dispatch, experts, combine.

Tokens are routed in groups of `group_size` tokens (G groups; one group per sequence by default),
GShard-style: every token's first choice is placed before any second choice, in sequence order,
and an expert takes at most C = ceil(k * group_size * capacity_factor / E) tokens per group. A
token that finds its expert full is dropped for that choice (counted) and keeps its residual.
A decode step (one new token a sequence) routes the new tokens of `cfg.decode_group` sequences
together, with the same capacity rule, so the experts do k x capacity_factor / E of a dense
pass's work over them (not a slot per expert per token); choices over capacity are counted as
dropped, as in training.

Dispatch and combine are one-hot einsums. The dispatched tensor [E, G, C, D] is laid out by
experts and the returning one [G, E, C, D] by groups, so a strategy that maps experts and groups
to the same mesh axis gets exactly one all-to-all each way. A strategy that keeps the tokens
where they are and splits the experts or their width over mesh axes (tp, heads x dims, experts
over tp) runs dispatch, experts and combine on each device's experts and width, all linear
after the activation, as gathers by the routing choices' indices (no one-hot masks: every
device there repeats the routing), and sums the tokens' outputs [G, S, D] once over those axes
(`local_then_sum`): Megatron's one all-reduce of the tokens, where XLA's partitioner would
all-reduce the expert outputs [E, G, C, D] (k x capacity_factor times the tokens' bytes) before
the combine, over each axis in turn.

Top-k is k rounds of argmax rather than `lax.top_k`: XLA's SPMD partitioner replicates the
operand of the TopK custom call, while argmax is a reduction it partitions like any other.

Router scores are a softmax over the experts (Mixtral, Qwen, gpt-oss) or each expert's sigmoid
(DeepSeek-V3), the chosen ones' weights renormalised to sum to 1 or not, then scaled by
`routed_scale`. Group-limited routing (DeepSeek-V3) first keeps the `router_group_top` groups of
experts whose two best scores sum highest. Shared experts (`n_shared_experts`) are one gated MLP
every token passes through beside its routed experts.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmoe.axes import Axis
from jaxmoe.config import ModelConfig
from jaxmoe.model.mlp import Mlp
from jaxmoe.model.params import axes_of, weight
from jaxmoe.partial_sums import local_then_sum, mesh_axes_of, project
from jaxmoe.sharding import active_layout, constrain, part_axes, sent

TOKENS = (Axis.GROUP, None, Axis.EMBED)  # [G, S, D]
AT_EXPERTS = (Axis.EXPERT, Axis.GROUP, Axis.CAPACITY, Axis.EMBED)  # [E, G, C, D]
HIDDEN = (Axis.EXPERT, Axis.GROUP, Axis.CAPACITY, Axis.EXPERT_MLP)  # [E, G, C, F]
SLOTS_IN = (Axis.EXPERT, Axis.GROUP, Axis.EMBED)  # an expert's slots [E, X, D], split as G
SLOTS_HIDDEN = (Axis.EXPERT, Axis.GROUP, Axis.EXPERT_MLP)  # [E, X, F]
AT_GROUPS = (Axis.GROUP, Axis.EXPERT, Axis.CAPACITY, Axis.EMBED)  # [G, E, C, D]
ROUTED = (Axis.GROUP, None, None)  # router logits, probabilities [G, S, E]; choices [G, S, P]
SLOTS = (Axis.GROUP, None, None, None)  # dispatch and combine masks: [G, S, E, C]
COMBINE = (
    Axis.GROUP,
    None,
    Axis.EXPERT,
    None,
)  # combine weights met by expert outputs: [G, S, E, C]


class Choices(NamedTuple):
    """Each token's top-k choices [G, S, P]: the expert, its slot in the expert's capacity (C
    where over capacity: dropped) and the gate (0 where dropped)."""

    expert: jax.Array
    slot: jax.Array
    gate: jax.Array


def choose(logits: jax.Array, cfg: ModelConfig, capacity: int) -> tuple[Choices, dict]:
    """Top-k routing with capacity: logits [G, S, E] float32 -> each token's `Choices` and
    token sums for `router_metrics`."""
    n_experts, top_k = logits.shape[-1], cfg.top_k
    if cfg.router_score == "sigmoid":
        scores = constrain(jax.nn.sigmoid(logits), ROUTED)
        probs = scores / jnp.sum(scores, axis=-1, keepdims=True)  # for the balance loss
    else:
        scores = probs = constrain(jax.nn.softmax(logits, axis=-1), ROUTED)  # [G, S, E]
    remaining = scores if not cfg.router_groups else limit_groups(scores, cfg)
    experts, picks, gates = [], [], []
    for _ in range(top_k):
        experts.append(jnp.argmax(remaining, axis=-1).astype(jnp.int32))  # [G, S]
        onehot = constrain(jax.nn.one_hot(experts[-1], n_experts), ROUTED)  # [G, S, E]
        picks.append(onehot)
        gates.append(jnp.sum(scores * onehot, axis=-1))  # [G, S]
        remaining = jnp.where(onehot > 0, -1.0, remaining)
    if cfg.norm_top_k and top_k > 1:
        total = sum(gates)
        gates = [g / total for g in gates]
    gates = [g * cfg.routed_scale for g in gates]

    filled = jnp.zeros(logits.shape[:1] + logits.shape[2:])  # [G, E] slots taken so far
    slots, kept = [], 0.0
    for j, onehot in enumerate(picks):
        position = jnp.cumsum(onehot, axis=1) - onehot + filled[:, None, :]  # [G, S, E]
        slot = jnp.sum(position * onehot, axis=-1)  # [G, S]: its place at its expert
        keep = slot < capacity
        slots.append(jnp.where(keep, slot, capacity).astype(jnp.int32))
        gates[j] = jnp.where(keep, gates[j], 0.0)
        filled = filled + jnp.sum(onehot, axis=1)
        kept = kept + jnp.sum(keep.astype(jnp.float32))

    assigned = jnp.sum(sum(picks), axis=(0, 1))  # [E] choices made per expert
    stats = {  # sums over tokens, so micro-batches add up to the whole batch
        "tokens": jnp.asarray(probs.shape[0] * probs.shape[1], jnp.float32),
        "assigned": assigned,
        "kept": kept,
        "prob_sum": jnp.sum(probs, axis=(0, 1)),  # [E]
        "z_sum": jnp.sum(jax.nn.logsumexp(logits, axis=-1) ** 2),
    }
    choices = Choices(*(constrain(jnp.stack(a, axis=-1), ROUTED) for a in (experts, slots, gates)))
    return choices, stats


def masks(choices: Choices, n_experts: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """The dispatch [G, S, E, C] (0/1) and combine (gate weights) one-hot masks of `choices`."""
    picks = choices.expert.shape[-1]
    dispatch = combine = 0.0
    for j in range(picks):
        at = jax.nn.one_hot(choices.expert[..., j], n_experts)[..., None]  # [G, S, E, 1]
        slot = at * jax.nn.one_hot(choices.slot[..., j], capacity)[..., None, :]  # C: none
        dispatch = dispatch + slot
        combine = combine + choices.gate[..., j, None, None] * slot
    return constrain(dispatch, SLOTS), constrain(combine, SLOTS)


def group_and_route(
    cfg: ModelConfig, x: jax.Array, router: jax.Array, router_axes=(Axis.EMBED, None)
) -> tuple[jax.Array, Choices, dict]:
    """x [B, S, D] -> (its tokens in routing groups [G, S, D], their `Choices` and routing
    sums, from `choose`), with router weights [D, E]."""
    b, s, d = x.shape
    group = math.gcd(cfg.group_for(s), b * s)
    xg = constrain(x.reshape(b * s // group, group, d), TOKENS)  # decoding: rows together
    w = router.astype(jnp.float32)
    logits = project("GSD,DE->GSE", xg.astype(jnp.float32), TOKENS, w, router_axes)
    return xg, *choose(constrain(logits, ROUTED), cfg, cfg.capacity_for(group))


def limit_groups(scores: jax.Array, cfg: ModelConfig) -> jax.Array:
    """scores [G, S, E] with every expert outside a token's `router_group_top` best groups (by
    the sum of each group's two best scores) set to -1, below any score."""
    g, s, e = scores.shape
    grouped = scores.reshape(g, s, cfg.router_groups, e // cfg.router_groups)
    best = jnp.sort(grouped, axis=-1)[..., -2:]
    group_scores = jnp.sum(best, axis=-1)  # [G, S, groups]
    kept = 0.0
    for _ in range(cfg.router_group_top):
        onehot = jax.nn.one_hot(jnp.argmax(group_scores, axis=-1), cfg.router_groups)
        kept = kept + onehot
        group_scores = jnp.where(onehot > 0, -jnp.inf, group_scores)
    keep = jnp.repeat(kept > 0, e // cfg.router_groups, axis=-1)  # [G, S, E]
    return jnp.where(keep, scores, -1.0)


def dropped_choices(sums) -> jax.Array:
    """Choices over capacity in routing sums (any leading axes, summed; 0 without MoE layers)."""
    if not sums:
        return jnp.zeros((), jnp.float32)
    return jnp.sum(sums["assigned"]) - jnp.sum(sums["kept"])


def router_metrics(sums: dict) -> dict:
    """Router losses and load from `choose`'s sums (any leading axes, e.g. layers, are kept).

    load_balance_loss = E * sum_e f_e * P_e (Switch/GShard), f_e the fraction of choices sent to
    expert e before capacity, P_e its mean router probability; router_z_loss the mean squared
    log-sum-exp of the router logits; dropped_fraction the share of choices over capacity.
    """
    n_experts = sums["assigned"].shape[-1]
    choices = jnp.sum(sums["assigned"], axis=-1)  # [...] top_k per token
    load = sums["assigned"] / choices[..., None]  # [..., E]
    mean_prob = sums["prob_sum"] / sums["tokens"][..., None]
    return {
        "load_balance_loss": n_experts * jnp.sum(load * mean_prob, axis=-1),
        "router_z_loss": sums["z_sum"] / sums["tokens"],
        "dropped_fraction": 1.0 - sums["kept"] / choices,
        "expert_load": load,
    }


class Moe(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        e, d, f = cfg.n_experts, cfg.d_model, cfg.expert_hidden
        std_out = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        up_axes = (Axis.EXPERT, Axis.EMBED, Axis.EXPERT_MLP)
        self.router = weight(rngs, cfg, (d, e), (Axis.EMBED, None), cfg.init_std)  # [D, E]
        self.w_in = weight(rngs, cfg, (e, d, f), up_axes, cfg.init_std)  # [E, D, F]
        if cfg.expert_form == "swiglu":
            self.w_gate = weight(rngs, cfg, (e, d, f), up_axes, cfg.init_std)
        self.w_out = weight(
            rngs, cfg, (e, f, d), (Axis.EXPERT, Axis.EXPERT_MLP, Axis.EMBED), std_out
        )
        self.shared = (
            Mlp(cfg, rngs, cfg.shared_hidden, cfg.expert_form) if cfg.n_shared_experts else None
        )
        self.cfg = cfg

    def dropout_mask(self, key: jax.Array | None, first_group, shape) -> jax.Array | None:
        """Which expert hidden units [E, G, C, F] to keep, or None without expert dropout.

        Each routing group's mask is drawn from the layer's key and the group's index in the
        whole batch (`first_group` onwards), so a layout that runs the batch in pieces (a
        pipeline's micro-batches) or splits it over devices drops exactly the same units.
        """
        cfg = self.cfg
        if key is None or cfg.expert_dropout <= 0:
            return None
        e, g, c, f = shape
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, first_group + jnp.arange(g))
        return jax.vmap(
            lambda key: jax.random.bernoulli(key, 1.0 - cfg.expert_dropout, (e, c, f)),
            out_axes=1,
        )(keys)

    @property
    def expert_weight_names(self) -> tuple[str, ...]:
        """w_in, w_gate where gated, w_out."""
        return (
            ("w_in", "w_gate", "w_out") if self.cfg.expert_form == "swiglu" else ("w_in", "w_out")
        )

    def expert_weights(self) -> tuple[tuple[jax.Array, ...], tuple]:
        """(w_in, w_gate where gated, w_out) in the compute dtype, and their logical axes."""
        params = [getattr(self, n) for n in self.expert_weight_names]
        dt = self.cfg.compute_dtype
        return tuple(p[...].astype(dt) for p in params), tuple(axes_of(p) for p in params)

    def experts(self, x: jax.Array, keep, weights, axes, *, local: bool = False) -> jax.Array:
        """x: [E, G, C, D] -> [E, G, C, D], each expert applied to its slots; `keep`: the
        dropout mask (or None); `weights`, `axes`: `expert_weights()`. `local`: a device's share
        in a manual region (no sharding constraints)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        pin = (lambda a, _: a) if local else constrain
        e, g, c, d = x.shape
        # the matmuls see each expert's slots as one dimension ([E, G*C, D], a free reshape): with
        # G and C apart, XLA's CPU backend transposes the hidden activations for the weight
        # gradients, which made the experts' backward pass nearly twice as slow
        x = x.reshape(e, g * c, d)
        h = project("EXD,EDF->EXF", x, SLOTS_IN, weights[0], axes[0])
        if cfg.expert_form == "swiglu":
            gate = project("EXD,EDF->EXF", x, SLOTS_IN, weights[1], axes[1])
            h = jax.nn.silu(gate) * h
        else:
            h = jax.nn.gelu(h)
        h = pin(h.reshape(e, g, c, -1), HIDDEN)
        if keep is not None:
            h = jnp.where(keep, h / (1.0 - cfg.expert_dropout), 0).astype(dt)
        h = h.reshape(e, g * c, -1)
        y = project("EXF,EFD->EXD", h, SLOTS_HIDDEN, weights[-1], axes[-1])
        return pin(y.reshape(e, g, c, d), AT_EXPERTS)  # where the experts are, not G's

    def __call__(
        self, x: jax.Array, dropout_key: jax.Array | None = None, first_row=0
    ) -> tuple[jax.Array, dict]:
        """x: [B, S, D], rows first_row.. of the batch -> ([B, S, D], routing statistics)."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        b, s, d = x.shape
        with jax.named_scope("router"):
            xg, choices, stats = group_and_route(cfg, x, self.router[...], axes_of(self.router))
        group = xg.shape[1]
        capacity = cfg.capacity_for(group)
        hidden = (cfg.n_experts, xg.shape[0], capacity, cfg.expert_hidden)
        keep = self.dropout_mask(dropout_key, first_row * s // group, hidden)
        weights, axes = self.expert_weights()
        slots = (cfg.n_experts, xg.shape[0], capacity, d)
        summed = _summed_axes(slots, weights, axes)
        if summed:
            y = self._summed_once(xg, choices, capacity, keep, weights, axes, summed)
        else:
            dispatch, combine = (m.astype(dt) for m in masks(choices, cfg.n_experts, capacity))
            combine = constrain(combine, COMBINE)
            chunks = min(cfg.moe_chunks, capacity)
            picks = [slice(i, None, chunks) for i in range(chunks)] if chunks > 1 else [slice(None)]
            parts = [self._routed(xg, dispatch, combine, keep, weights, axes, p) for p in picks]
            y = constrain(sum(parts[1:], parts[0]), TOKENS)
        y = y.reshape(b, s, d)
        if self.shared is not None:
            with jax.named_scope("shared_experts"):
                y = y + self.shared(x)
        return y, stats

    def _routed(self, xg, dispatch, combine, keep, weights, axes, slots: slice) -> jax.Array:
        """The tokens' outputs [G, S, D] from the capacity slots `slots` picks of every expert
        in every group: to the experts by one all-to-all, back by another. A layer's chunks
        (`moe_chunks`: slots c, c + chunks, ... for each c, so each chunk has its share of the
        first choices) share no data until their outputs are added, so one chunk's all-to-alls
        can run while the experts compute another (the papers' asynchronous routing)."""
        if slots != slice(None):
            dispatch, combine = dispatch[..., slots], combine[..., slots]
            keep = None if keep is None else keep[:, :, slots]
        with jax.named_scope("dispatch"):
            # each group's slots where the group is, then to the experts: one all-to-all
            xe = constrain(jnp.einsum("GSEC,GSD->GECD", dispatch, xg), AT_GROUPS)
            xe = sent(constrain(jnp.transpose(xe, (1, 0, 2, 3)), AT_EXPERTS))
        with jax.named_scope("experts"):
            ye = self.experts(xe, keep, weights, axes)
        with jax.named_scope("combine"):
            ye = sent(constrain(jnp.transpose(ye, (1, 0, 2, 3)), AT_GROUPS))
            return constrain(jnp.einsum("GECD,GSEC->GSD", ye, combine), TOKENS)

    def _summed_once(self, xg, choices: Choices, c: int, keep, weights, axes, summed) -> jax.Array:
        """Dispatch, experts and combine on each device's experts and expert width (mesh axes
        `summed`), the tokens' outputs [G, S, D] then summed once over those axes; `c`: the
        capacity.

        Each device gathers its slots' tokens and each token's outputs from its slots by the
        choices' indices [G, S, P] (a one-hot einsum would multiply by S times the slots' zeros
        and ones, and every device repeats the dispatch in this region). The tokens and gates
        are marked as varying where they enter, taken where the router left them (a constraint
        would split their gradient by experts, which the router then gathers back): the
        backward pass sums their gradients, [G, S, D] and [G, S, P], not those of the
        dispatched slots [E, G, C, D]."""
        cfg, dropout = self.cfg, keep is not None
        # the mesh axes that split the experts' weights (so their shares), in their order
        split = part_axes(active_layout()[1].spec(axes[0], shape=weights[0].shape)[0])

        def local(xg, expert, slot, gate, *rest):
            keep, weights = (rest[0], rest[1:]) if dropout else (None, rest)
            here = weights[0].shape[0]  # this device's experts, from the first of them
            first = jax.lax.axis_index(split) * here if split else 0
            at = expert - first
            held = (at >= 0) & (at < here) & (slot < c)  # [G, S, P]
            index = jnp.where(held, at * c + slot, here * c)  # here * c: nowhere
            with jax.named_scope("dispatch"):
                xe = _gathered(xg, index, here, c)
            with jax.named_scope("experts"):
                ye = self.experts(xe, keep, weights, axes, local=True)
            with jax.named_scope("combine"):
                return _combined(ye, index, jnp.where(held, gate, 0).astype(ye.dtype))

        args = (xg, choices.expert, choices.slot, choices.gate.astype(cfg.compute_dtype))
        args += (*([keep] if dropout else []), *weights)
        args_axes = (TOKENS, ROUTED, ROUTED, ROUTED, *([HIDDEN] if dropout else []), *axes)
        out = (TOKENS, xg.shape)
        y = local_then_sum(local, args, args_axes, out, summed, vary=(0, 3))
        return constrain(y, TOKENS)


def _gathered(xg: jax.Array, index: jax.Array, n_experts: int, capacity: int) -> jax.Array:
    """Each slot's token [E, G, C, D] (zeros in empty slots) from xg [G, S, D] and each token's
    choices' slots `index` [G, S, P] (expert * C + slot; E * C where not here)."""
    g, s = index.shape[:2]
    rows = jnp.arange(g)[:, None, None]
    tokens = jnp.broadcast_to(jnp.arange(s)[None, :, None], index.shape)
    token = jnp.zeros((g, n_experts * capacity), jnp.int32)
    token = token.at[rows, index].set(tokens, mode="drop")  # [G, E*C]: the token in each slot
    filled = jnp.zeros((g, n_experts * capacity), xg.dtype).at[rows, index].set(1, mode="drop")
    picked = jnp.take_along_axis(xg, token[..., None], axis=1) * filled[..., None]
    return jnp.transpose(picked.reshape(g, n_experts, capacity, -1), (1, 0, 2, 3))


def _combined(ye: jax.Array, index: jax.Array, gate: jax.Array) -> jax.Array:
    """The tokens' outputs [G, S, D]: each token's choices' outputs in ye [E, G, C, D], at their
    slots `index` [G, S, P] (E * C: not here), times their gates [G, S, P] (0 where not here)."""
    e, g, c, d = ye.shape
    rows = jnp.transpose(ye, (1, 0, 2, 3)).reshape(g, e * c, d)
    out = 0.0
    for j in range(index.shape[-1]):
        at = jnp.minimum(index[..., j], e * c - 1)  # the gate is 0 where not here
        picked = jnp.take_along_axis(rows, at[..., None], axis=1)  # [G, S, D]
        out = out + picked * gate[..., j, None]
    return out


def _summed_axes(slots: tuple[int, ...], weights, weight_axes) -> tuple[str, ...]:
    """The mesh axes over which an MoE layer sums its tokens' outputs once (see the module's
    docstring): those that split the experts or their width, where the layout keeps tokens
    where they are (experts split alike in [E, G, C, D] and [G, E, C, D], so no all-to-all) and
    gathers no parameters; none otherwise. `slots`: the [E, G, C, D] shape."""
    layout = active_layout()
    if layout is None or layout[1].gathered_axes:
        return ()
    by_groups = slots[1:2] + slots[:1] + slots[2:]
    experts = mesh_axes_of([AT_EXPERTS], [Axis.EXPERT], [slots])
    if experts != mesh_axes_of([AT_GROUPS], [Axis.EXPERT], [by_groups]):
        return ()
    shapes = [slots, *(w.shape for w in weights)]
    summed = mesh_axes_of([AT_EXPERTS, *weight_axes], [Axis.EXPERT, Axis.EXPERT_MLP], shapes)
    # the axes that split the batch route it by all-to-all, not here (a decode step's few
    # routing groups aside, which stay where they are)
    batch = layout[1].rules.get(Axis.GROUP, ())
    return () if set(summed) & set(batch) else summed

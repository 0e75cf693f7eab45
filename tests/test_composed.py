"""Layouts composed from parallelism axes, on 8 and 32 devices: the same model as one device,
names that parse or fail in one line, and what dp and fsdp do in a compiled training step."""

import functools

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P
from tiny import loss_grads, tiny

import meshes
from jaxmoe.analysis import hardware
from jaxmoe.compare import compare_strategies, random_tokens
from jaxmoe.config import ConfigError
from jaxmoe.estimate import estimate
from jaxmoe.layout import minimum_per_layer
from jaxmoe.spmd import gradient_sync_bytes
from jaxmoe.train.recipe import TrainConfig
from jaxmoe.train.steps import make_trainer
from meshes import MeshAxis, compose

# both kinds of layer in one model; on 32 devices the batch and head dim the widest splits need
ON_8 = ["dp2_ep4", "fsdp2_tp4", "tp4_pp2", "dp2_tp2_pp2", "ep4_tp2", "heads2_dims4"]
ON_32 = ["dp2_ep16", "fsdp4_tp8", "dp4_tp4_pp2", "heads4_dims8"]
CONFIGS = {
    8: tiny(moe_every=2, n_layers=4),
    32: tiny(moe_every=2, n_layers=4, batch=32, head_dim=8),
}


@pytest.mark.parametrize("n", [8, 32])
def test_logits_match_one_device(n):
    layouts = [meshes.get(name) for name in (ON_8 if n == 8 else ON_32)]
    assert {s.n_devices for s in layouts} == {n}
    for r in compare_strategies(CONFIGS[n], layouts, jax.devices()):
        assert r.max_abs_err <= 1e-4 * r.logits_scale, (r.strategy, r.max_abs_err)
        measured = r.inventory.total_bytes(in_loop=True) / CONFIGS[n].n_layers
        # the least the layout needs; a pipeline's idle iterations send as its busy ones do
        least = minimum_per_layer(CONFIGS[n], meshes.get(r.strategy)) / (1 - r.bubble_fraction)
        assert 0.9 <= measured / least <= 1.1, (r.strategy, measured, least)


@functools.cache
def _one_device(n: int):
    return loss_grads(CONFIGS[n], None)


@pytest.mark.parametrize("name", ON_8 + ON_32)
def test_loss_and_grads_match_one_device(name):
    strategy = meshes.get(name)
    ref_loss, ref_grads = _one_device(strategy.n_devices)
    loss, grads = loss_grads(CONFIGS[strategy.n_devices], strategy)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    scale = max(float(np.max(np.abs(g))) for g in ref_grads)
    for g, ref in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-4 * scale, rtol=1e-3)


def test_dp_and_fsdp_training_steps():
    """dp sums each gradient once per step (an all-reduce of the parameters' bytes, the LM head's
    included though its loss runs in 4 chunks); fsdp holds 1/N of parameters and Adam's state,
    all-gathers each layer's weights in the layer loop and reduce-scatters their gradients."""
    cfg = tiny(moe_every=2, n_layers=4, loss_chunk_tokens=64)  # 4 chunks of the LM head
    dp, fsdp = compare_strategies(
        cfg, [meshes.get("dp8"), meshes.get("fsdp8")], jax.devices(), phase="train"
    )
    params = dp.param_bytes_total
    assert dp.memory["parameters"] == params and fsdp.memory["parameters"] * 8 == params
    assert fsdp.memory["optimizer_state"] * 8 <= 2 * params + 8 * 64  # moments + step count
    reduced = dp.inventory.by_kind(in_loop=None)["all-reduce"].bytes
    assert 2 * 7 / 8 * params <= reduced <= 1.02 * 2 * 7 / 8 * params  # + the loss's scalars
    assert dp.inventory.by_kind(in_loop=True)["all-gather"].count == 0
    gathered = fsdp.inventory.by_kind(in_loop=True)["all-gather"].bytes
    block_weights = params - 2 * (cfg.padded_vocab + cfg.seq_len + 1) * cfg.d_model  # no tables
    assert gathered >= 7 / 8 * block_weights * 0.99  # each layer's weights, gathered in the loop
    # the gradients: reduce-scattered (the token table's needs nothing: each device adds its
    # slice of every token's row); only the norms' scales, the position table and the router's
    # statistics are all-reduced
    kinds = fsdp.inventory.by_kind(in_loop=None)
    textbook = gradient_sync_bytes(
        meshes.get("fsdp8").lay_out(cfg, jax.devices()).abstract_params(), ("fsdp",)
    )
    assert 0.9 * textbook <= kinds["reduce-scatter"].bytes <= textbook
    assert kinds["all-reduce"].bytes <= 0.01 * params


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("dp2_xp4", "'xp4' is not an axis with a size"),
        ("dp2_dp4", "names it twice"),
        ("heads4", "heads and dims slice attention together"),
        ("heads2_dims2_tp2", "not tp or ep"),
        ("ep7", "needs 7 devices, 8 given; run with --devices 7"),
        ("fsdp3_tp2_pp2", None),  # 12 devices: also refused on 8
        ("tp8", "splits n_heads=12 over mesh axes tensor"),
    ],
)
def test_bad_names_get_one_line(name, message):
    cfg = tiny(n_heads=12, head_dim=4) if name == "tp8" else tiny()
    with pytest.raises(ConfigError) as err:
        meshes.get(name).check(cfg, 8)
    assert "\n" not in str(err.value)
    assert (message or "needs 12 devices") in str(err.value)


def test_names_are_canonical_and_aliases_keep_their_meaning():
    assert meshes.get("tp2_ep4").name == "ep4_tp2"
    assert meshes.get("pp2_tp8") is meshes.get("tp8_pp2")  # the papers' layout, experts over tp
    assert meshes.get("tp16") is meshes.REGISTRY["tp16"]
    assert meshes.get("heads4_dims4").mesh == meshes.get("heads_dims_4x4").mesh
    ep_tp = meshes.get("ep4_tp2")
    assert ep_tp.spec(("expert", "embed", "expert_mlp"), param=True) == P("expert", None, "tensor")
    assert ep_tp.mesh == {"expert": 4, "tensor": 2}  # tensor innermost: neighbouring devices
    fsdp = meshes.get("fsdp2_tp4")
    assert fsdp.spec(("embed", "heads", "head_dim"), param=True) == P("fsdp", "tensor", None)
    assert fsdp.spec(("batch", "seq", "embed")) == P("fsdp", None, None)
    assert fsdp.gathered_axes == ("fsdp",) and not meshes.get("dp8").gathered_axes


def test_minimum_follows_each_axis_size():
    """tp's all-reduce and ep's all-to-all scale as (n - 1) / n of the batch their group holds."""
    cfg = tiny()
    act = cfg.tokens * cfg.d_model * 4
    dense = compose.layout("tp4").minimum_bytes(cfg)["dense"]
    assert dense == pytest.approx(2 * 2 * act * 3 / 4)
    assert compose.layout("dp2_tp4").minimum_bytes(cfg)["dense"] == pytest.approx(dense / 2)
    slots = cfg.n_groups * cfg.n_experts * cfg.capacity * cfg.d_model * 4
    moe = compose.layout("ep8").minimum_bytes(cfg)["moe"]
    assert moe == pytest.approx(2 * slots * 7 / 64)
    assert compose.layout("dp2_ep4").minimum_bytes(cfg)["moe"] == pytest.approx(
        2 * slots / 2 * 3 / 16
    )


def test_pipeline_replicas_sum_gradients_once():
    """dp x pp: each data-parallel replica of the pipeline accumulates its weights' gradients
    over the schedule's iterations and the replicas sum them once, after it: the stacked
    blocks' reduce-scattered (each replica keeps Adam's state of its shard, ZeRO-1) and their
    new weights all-gathered, the rest all-reduced. Nothing crosses `data` in the schedule's
    loop, and the gradients summed over data come to the device's parameters once (XLA's
    partitioner summed each stage's gradients in every iteration)."""
    run = meshes.get("dp2_tp2_pp2").lay_out(CONFIGS[8], jax.devices())
    cost = run.cost("train")
    over_data = [c for c in cost.inventory.collectives if c.axes and MeshAxis.DATA in c.axes]
    assert not [c.name for c in over_data if c.loop_depth > 0]

    def operands(kind: str) -> int:
        return sum(c.executions * c.operand_bytes for c in over_data if c.kind == kind)

    params = cost.param_bytes_per_device
    reduced = operands("all-reduce") + operands("reduce-scatter")
    assert 0.9 * params <= reduced <= params + 1024, (reduced, params)  # + the loss's scalars
    blocks = sum(
        np.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
        for path, a in jax.tree_util.tree_leaves_with_path(run.abstract_params())
        if "blocks" in jax.tree_util.keystr(path)
    )
    assert 0.9 * blocks <= operands("reduce-scatter") <= blocks
    assert 0.45 * blocks <= operands("all-gather") <= 0.5 * blocks  # the new weights' halves


def test_pipeline_replicas_train_like_one_device_with_adams_state_split():
    """dp2_tp2_pp2's compiled step takes each stacked block's Adam moments split over data
    (its arguments under 2.5x the parameters, not 3x; the estimate's memory floor counts them
    so), and three steps under it give one device's losses, moments and weights."""
    cfg, tc = CONFIGS[8], TrainConfig(learning_rate=1e-5, warmup_steps=0, decay_steps=10)
    tokens = np.asarray(random_tokens(cfg.replace(seq_len=cfg.seq_len + 1), 3))
    runs = {}
    for name in ("one_device", "dp2_tp2_pp2"):
        strategy = meshes.get(name)
        trainer = make_trainer(cfg, strategy, jax.devices()[: strategy.n_devices], tc)
        params, opt_state = trainer.init()
        batch = jax.device_put(tokens, trainer.batch_sharding)
        step = trainer.step.lower(params, opt_state, batch, 0).compile()
        losses = []
        for i in range(3):
            params, opt_state, metrics = step(params, opt_state, batch, i)
            losses.append(float(metrics["loss"]))
        runs[name] = (losses, params, opt_state, step)
    (ref_losses, *ref_state, _), (losses, *state, step) = runs.values()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    _, opt_shardings = step.input_shardings[0][:2]
    moments = [
        (path, sharding.spec)
        for (path, _), sharding in zip(
            jax.tree_util.tree_leaves_with_path(state[1]),
            jax.tree.leaves(opt_shardings),
            strict=True,
        )
        if "blocks" in jax.tree_util.keystr(path)
    ]
    assert moments and all(MeshAxis.DATA in str(spec) for _, spec in moments), moments
    held = step.memory_analysis().argument_size_in_bytes
    params_bytes = sum(a.addressable_shards[0].data.nbytes for a in jax.tree.leaves(state[0]))
    assert held < 2.5 * params_bytes, (held, params_bytes)
    moments_bytes = sum(  # as the program takes them (step counts aside)
        np.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
        for a, s in zip(jax.tree.leaves(state[1]), jax.tree.leaves(opt_shardings), strict=True)
        if a.ndim
    )
    floor = estimate(meshes.get("dp2_tp2_pp2"), cfg, hardware.get("h100x16"), "train")
    assert floor.memory_bytes == pytest.approx(2 * params_bytes + moments_bytes, rel=1e-6)
    (ref_params, ref_opt), (params, opt) = ref_state, state
    for ref, got in zip(jax.tree.leaves(ref_opt), jax.tree.leaves(opt), strict=True):
        scale = float(np.max(np.abs(ref))) or 1.0
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-4 * scale, rtol=1e-3)
    # an Adam step moves a weight by about the learning rate at most, whatever its gradient's
    # sign: a shard gathered to the wrong place would be off by the weights' own size (~0.02)
    moved = 3 * tc.learning_rate
    for ref, got in zip(jax.tree.leaves(ref_params), jax.tree.leaves(params), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=4 * moved, rtol=0)


@pytest.mark.parametrize("name", ["dp2_tp2_pp2", "heads2_dims2_pp2"])
def test_pipelined_decode_reads_each_micro_batch_where_its_rows_are(name):
    """A pipeline whose batch is split (over data, or over dims in attention) picks each
    micro-batch and its cache rows in place: no gather in the decode step's layer loop (its
    MoE layers routing the rows a device holds together: 16 / 4 micro-batches / dp2)."""
    cfg = CONFIGS[8].replace(decode_group_size=2)
    cost = meshes.get(name).lay_out(cfg, jax.devices()).cost("decode")
    assert cost.inventory.by_kind(in_loop=True)["all-gather"].count == 0

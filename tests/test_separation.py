"""ma_separation: attention and experts on two sub-meshes compute the same model as one device,
each device holds only its side's weights, and the bytes crossing between the meshes are the
minimum."""

import math

import jax
import numpy as np
import pytest
from tiny import DEVICES, tiny

import meshes
from jaxmoe.compare import compare_strategies, random_tokens
from jaxmoe.config import ConfigError
from jaxmoe.inference import decoder, generate
from jaxmoe.placement import forward, init_params, loss_and_grad, path_name
from jaxmoe.separation import Separated, Timeline, cost
from meshes import ma_separation

SEP = ma_separation.separation()  # 12 attention devices (2 replica groups of 6) + 4 expert


def _run(cfg, sep=SEP):
    return Separated(cfg, sep, jax.devices()[:DEVICES])


def _tokens(cfg):
    tokens = np.asarray(random_tokens(cfg, 1))
    return tokens, np.roll(tokens, -1, axis=1)


def _placed(cfg):
    """The layout on the test devices, the model's parameters put on it, inputs and targets."""
    run = _run(cfg)
    return run, run.put(init_params(cfg, 0)[1]), *_tokens(cfg)


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_logits_match_one_device(micro_batches):
    cfg = tiny(micro_batches=micro_batches)
    graphdef, state = init_params(cfg, 0)
    tokens, _ = _tokens(cfg)
    ref = np.asarray(jax.jit(forward(graphdef))(state, tokens))[..., : cfg.vocab_size]
    run = _run(cfg)
    got = run.forward(run.put(state), tokens).logits[..., : cfg.vocab_size]
    assert np.max(np.abs(got - ref)) <= 1e-5 * np.max(np.abs(ref))


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "expert_dropout"])
def test_loss_and_grads_match_one_device(dropout):
    cfg = tiny(micro_batches=2, expert_dropout=0.1 if dropout else 0.0)
    graphdef, state = init_params(cfg, 0)
    inputs, targets = _tokens(cfg)
    key = jax.random.key(2) if dropout else None
    ref_loss, ref_grads = jax.jit(loss_and_grad(graphdef))(state, inputs, targets, key)
    run = _run(cfg)
    metrics, grads, _ = run.loss_and_grads(run.put(state), inputs, targets, key)
    assert abs(float(metrics["loss"]) - float(ref_loss)) <= 1e-6 * abs(float(ref_loss))
    got = run.model_state(grads)
    want = jax.tree_util.tree_leaves_with_path(ref_grads)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(ref_grads))
    assert len(jax.tree.leaves(got)) == len(want)
    for (path, ref), g in zip(want, jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, ref, atol=1e-5 * scale, rtol=1e-4, err_msg=path_name(path))


def test_generation_matches_one_device():
    cfg = tiny(micro_batches=2)
    graphdef, state = init_params(cfg, 0)
    prompt = _tokens(cfg)[0][:, :10]
    want = generate(decoder(cfg, graphdef), state, prompt, 5)
    run = _run(cfg)
    got = generate(run.decoder(), run.put(state), prompt, 5)
    assert np.array_equal(got.tokens, want.tokens)
    assert got.dropped_choices == want.dropped_choices


def test_eight_bit_transfers_error_is_bounded_and_bytes_shrink():
    cfg = tiny(micro_batches=2)
    graphdef, state = init_params(cfg, 0)
    tokens, _ = _tokens(cfg)
    ref = np.asarray(jax.jit(forward(graphdef))(state, tokens))[..., : cfg.vocab_size]
    run = _run(cfg, SEP.with_options(transfer_bits=8))
    done = run.forward(run.put(state), tokens)
    got = done.logits[..., : cfg.vocab_size]
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert 0 < err <= 2e-2  # int8 with a scale per token: about 1% of the logits' range here
    per_layer = cfg.tokens * (cfg.d_model + 4)  # int8 values and one float32 scale per token
    assert done.moved["to_experts"] == done.moved["to_attention"] == per_layer * cfg.n_layers


def test_training_and_forward_move_tokens_x_d_each_way_per_layer():
    cfg = tiny(micro_batches=2)
    run, params, inputs, targets = _placed(cfg)
    textbook = cfg.tokens * cfg.d_model * cfg.compute_dtype.itemsize * cfg.n_moe_layers
    moved = run.forward(params, inputs).moved
    assert moved["to_experts"] == moved["to_attention"] == textbook
    moved = run.loss_and_grads(params, inputs, targets)[2]  # the cotangents back the same way
    assert moved["to_experts"] == moved["to_attention"] == 2 * textbook


def test_each_device_holds_only_its_sides_weights():
    """Read from the compiled programs' input shardings: expert device d holds experts
    d*E/X .. (d+1)*E/X - 1 and nothing of attention; attention devices hold no expert."""
    cfg = tiny(micro_batches=2)
    run = _run(cfg)
    pieces = cost.compile_pieces(run, "forward")
    attention_devices = set(jax.devices()[:12])
    expert_devices = list(jax.devices()[12:16])
    n_local = cfg.n_experts // len(expert_devices)
    experts = pieces["experts"].input_shardings[0][0]
    abstract = run.pieces.experts[1]
    names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract)]
    assert sorted(names) == ["router", "w_in", "w_out"]
    for name, leaf, sharding in zip(
        names, jax.tree.leaves(abstract), jax.tree.leaves(experts), strict=True
    ):
        assert set(sharding.device_set) == set(expert_devices)
        if name == "router":
            continue
        for device, index in sharding.devices_indices_map(leaf.shape).items():
            first = expert_devices.index(device) * n_local
            assert (index[0].start, index[0].stop) == (first, first + n_local), name
    for name in ("embed", "attend", "head"):
        params = pieces[name].input_shardings[0][0]
        assert all(set(s.device_set) == attention_devices for s in jax.tree.leaves(params))
    attention_names = {
        path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(run.pieces.attention[1])
    }
    assert not {n for n in attention_names if n.rsplit("/", 1)[-1] in ("w_in", "w_out", "router")}
    # memory analysis: an expert device's arguments are its experts, the router and its tokens
    held = n_local * 2 * cfg.d_model * cfg.d_ff * 4 + cfg.d_model * cfg.n_experts * 4
    tokens = cfg.tokens // cfg.micro_batches // len(expert_devices) * cfg.d_model * 4
    args = pieces["experts"].memory_analysis().argument_size_in_bytes
    assert held <= args <= held + tokens + 64


def test_crossing_states_copy_whole_shards_and_never_wait_on_the_host():
    """Every transfer moves whole shards (same shard shape on both sides), the condition for JAX
    to issue it asynchronously; re-cutting shards makes it wait for its input on the host."""
    run = _run(tiny(micro_batches=2))
    shape = (run.rows, 16, 64)
    for src, dst in ((run.exit, run.at_experts), (run.at_experts, run.landing),
                     (run.landing, run.exit)):  # fmt: skip
        assert src.shard_shape(shape) == dst.shard_shape(shape)


def test_uneven_heads_are_spread_as_in_the_paper():
    paper = tiny(n_heads=32, head_dim=2)
    one_group = meshes.get("ma_separation:12+4/1")
    assert one_group.heads_per_device(paper) == [3] * 8 + [2] * 4
    assert one_group.padding(paper)["masked_heads"] == 4
    assert SEP.heads_per_device(tiny()) == [3, 3, 3, 3, 2, 2]  # 16 heads over groups of 6
    slots = SEP.head_slots(tiny())
    assert list(slots[:6]) == [0, 1, 2, 3, 4, 5] and list(slots[12:]) == [12, 13, -1, 14, 15, -1]


@pytest.mark.parametrize(
    ("name", "changes", "message"),
    [
        ("ma_separation:16+4", {}, "exceed the 16 devices"),
        ("ma_separation:8+8", {"n_experts": 12}, "n_experts=12 does not split over 8 expert"),
        ("ma_separation:10+6", {}, "must cut into 6 equal slices"),
        ("ma_separation", {"micro_batches": 3}, "does not split into micro_batches=3"),
        ("ma_separation", {"moe_every": 0}, "needs an MoE model"),
        ("ma_separation:9+4/2", {}, "do not form 2 replica groups"),
    ],
)
def test_bad_layouts_get_one_line_errors(name, changes, message):
    with pytest.raises(ConfigError, match=message) as err:
        _run(tiny(**changes), meshes.get(name))
    assert "\n" not in str(err.value)


def test_timeline_records_every_program_on_its_mesh():
    cfg = tiny(micro_batches=2)
    run, params, inputs, targets = _placed(cfg)
    with Timeline() as timeline:
        run.loss_and_grads(params, inputs, targets, timeline=timeline)
    overlap = timeline.overlap()
    pieces = cfg.n_blocks * cfg.micro_batches * 2  # forward and backward
    assert [i.mesh for i in overlap.intervals].count("attention") == pieces
    assert [i.mesh for i in overlap.intervals].count("experts") == pieces
    assert all(i.end >= i.start for i in overlap.intervals)
    assert 0 <= overlap.overlap_s <= min(overlap.busy_s.values()) + 1e-9
    assert overlap.wall_s >= max(overlap.busy_s.values())


@pytest.mark.parametrize("bits", [0, 8])
def test_compare_reports_transfers_against_the_minimum(bits):
    """With 8-bit transfers the states are gathered inside the attention mesh as int8 too."""
    cfg = tiny(micro_batches=2)
    sep = SEP.with_options(transfer_bits=bits)
    (report,) = compare_strategies(cfg, [sep], jax.devices()[:DEVICES])
    assert report.max_abs_err <= (2e-2 if bits else 1e-5) * report.logits_scale
    details = report.to_json(cfg)["separation"]
    assert details["transfer_vs_minimum"] == 1.0
    assert math.isclose(report.bytes_vs_minimum, 1.0, rel_tol=1e-2)  # router sums aside
    assert report.per_layer["transfer"][0] == 2 * cfg.micro_batches
    assert report.mesh == {
        "attention": {"replica": 2, "slice": 2, "heads": 3},
        "experts": {"expert": 4},
    }


def test_trainer_balances_micro_batches_and_rechecks_every_n_steps():
    from jaxmoe.separation.training import MICRO_BATCH_OPTIONS, SeparatedTrainer
    from jaxmoe.train.recipe import TrainConfig

    cfg = tiny(micro_batches=1)
    tc = TrainConfig(rebalance_every=2, rebalance_threshold=1e-9)
    trainer = SeparatedTrainer(cfg, SEP, jax.devices()[:DEVICES], tc)
    params, opt = trainer.init()
    fits = [m for m in MICRO_BATCH_OPTIONS if cfg.batch // m % 4 == 0]  # 4 expert devices
    assert {s.tokens for s in trainer.samples} == {cfg.tokens // m for m in fits}
    assert trainer.run.cfg.micro_batches in fits  # the predictor's choice
    batch = np.asarray(random_tokens(cfg.replace(seq_len=cfg.seq_len + 1), 3))
    seen = []
    for step in range(2):
        params, opt, metrics = trainer.step(params, opt, batch, step)
        seen.append(metrics)
        assert np.isfinite(float(metrics["loss"])) and metrics["grad_norm"] > 0
        assert metrics["attention_busy_s"] > 0 and metrics["expert_busy_s"] > 0
    assert "rebalanced_from" not in seen[0] and "rebalanced_from" in seen[1]
    assert trainer.evaluate(params, batch) > 0

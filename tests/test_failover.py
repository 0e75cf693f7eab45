"""Serving through a lost device (paper 001): a greedy generation under ma_separation that loses an
attention device and then an expert device gives the tokens of one device's run without failures,
reads nothing from the devices lost, and reports its recoveries; restarting from a checkpoint on
the devices left gives the same next token."""

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tiny import tiny

from jaxmoe.analysis import hardware
from jaxmoe.compare import random_tokens
from jaxmoe.config import ConfigError
from jaxmoe.inference import decoder, generate
from jaxmoe.placement import abstract_model, init_params
from jaxmoe.separation import Separated
from jaxmoe.separation.degraded import Replaced, Shares, assemble, bound, without_a_group
from jaxmoe.separation.failover import Failure, Server, check, restart, save_model
from meshes import ma_separation

SEP = ma_separation.separation()  # 12 attention devices (2 replica groups of 6) + 4 expert
CFG = tiny(micro_batches=2, seq_len=24)
STEPS = 12


def test_serving_carries_on_through_an_attention_and_an_expert_device(tmp_path):
    graphdef, state = init_params(CFG, 0)
    prompt = np.asarray(random_tokens(CFG, 1))[:, :10]
    want = generate(decoder(CFG, graphdef), state, prompt, STEPS)
    devices = jax.devices()[:16]
    server = Server(CFG, SEP, devices, state)
    got = server.generate(prompt, STEPS, [Failure(3, 7), Failure(5, 13)])
    assert np.array_equal(got.tokens, want.tokens)
    attention, experts = got.recoveries
    assert (attention.side, experts.side) == ("attention", "experts")
    assert "replica group 1 lost: its 8 sequences prefilled again (12 tokens each)" in (
        attention.action
    )
    assert experts.layout == "ma_separation less a replica group, experts 6,5,5 on 3 devices"
    assert all(r.seconds > 0 for r in got.recoveries)

    save_model(tmp_path / "model", state)
    left = devices[:6] + devices[12:13] + devices[14:16]  # group 0 and three expert devices
    run = Separated(CFG, ma_separation.separation(4, 4, 2), left[:8])
    so_far = np.concatenate([prompt, want.tokens[:, :5]], axis=1)
    token, seconds = restart(run, tmp_path / "model", abstract_model(CFG)[1], so_far)
    assert np.array_equal(token, want.tokens[:, 5]) and seconds > 0


def test_degraded_decode_bound_reads_the_busiest_devices_experts():
    devices = jax.devices()[:16]
    hw = hardware.get("h100x16")
    smaller = Separated(CFG, without_a_group(SEP), devices[:6] + devices[12:16])
    replaced = Replaced.of(smaller, Shares.even(CFG.n_experts, devices[12:13] + devices[14:16]))
    whole, degraded = bound(smaller, hw, "decode"), bound(replaced, hw, "decode")
    weights = 3 if CFG.expert_form == "swiglu" else 2  # w_in (w_gate), w_out
    per_expert = weights * CFG.d_model * CFG.expert_hidden * 4  # float32
    assert degraded.pieces["experts"].hbm_bytes >= 6 * per_expert
    assert whole.pieces["experts"].hbm_bytes < 6 * per_expert
    assert degraded.overlapped_s > whole.overlapped_s


def test_arrays_are_rebuilt_from_live_shards_only():
    devices = jax.devices()[:4]
    mesh = Mesh(np.asarray(devices), ("rows",))
    by_rows = NamedSharding(mesh, PartitionSpec("rows"))
    old = jax.device_put(np.arange(16.0).reshape(8, 2), by_rows)
    lost = {devices[1]}  # rows 2, 3
    new_rows = jax.device_put(np.full((2, 2), -1.0), devices[0])
    got = assemble([(old, 0), (new_rows, 2)], old.shape, by_rows, lost)
    want = np.arange(16.0).reshape(8, 2)
    want[2:4] = -1
    assert np.array_equal(np.asarray(got), want)
    assert {s.device for s in got.addressable_shards} == set(devices)
    with pytest.raises(RuntimeError, match="on lost devices only"):
        assemble([(old, 0)], old.shape, by_rows, lost)


@pytest.mark.parametrize(
    ("failures", "message"),
    [
        ([Failure(12, 0)], "choose a step from 1 to 11"),
        ([Failure(2, 16)], "not in ma_separation's 16 devices"),
        ([Failure(2, 0), Failure(4, 7)], "survives the loss of 1 of its 2 replica groups"),
        ([Failure(2, 12), Failure(3, 13), Failure(4, 14), Failure(5, 15)], "of its 4 expert"),
    ],
)
def test_failures_it_cannot_survive_get_one_line_errors(failures, message):
    with pytest.raises(ConfigError, match=message) as err:
        check(CFG, SEP, 16, STEPS, failures)
    assert "\n" not in str(err.value)

"""Every layout through the one layout interface, for every phase: the training step's
collectives and memory come from its compiled program(s), and nothing outside the layouts' own
modules asks which kind of layout it holds."""

import re
from pathlib import Path

import jax
import pytest
from tiny import DEVICES, tiny

import meshes
from jaxmoe.compare import compare_strategies
from jaxmoe.explain import explain
from jaxmoe.report import compare_table

ROOT = Path(__file__).resolve().parent.parent
NAMES = list(meshes.LAYOUTS)
# the training steps are compiled once, on one worker, for every test that reads them
pytestmark = pytest.mark.xdist_group("training_steps")


@pytest.fixture(scope="module")
def train_reports():
    cfg = tiny(micro_batches=2)
    layouts = list(meshes.LAYOUTS.values())
    return cfg, {
        r.strategy: r for r in compare_strategies(cfg, layouts, jax.devices(), phase="train")
    }


@pytest.mark.parametrize("name", NAMES)
def test_the_training_step_reduces_gradients_and_holds_adam(train_reports, name):
    _, reports = train_reports
    r = reports[name]
    assert r.phase == "train"
    # every layout keeps a copy of some parameter on several devices (the norms, at least):
    # their gradients are summed by an all-reduce in the compiled step
    assert r.per_layer.get("all-reduce", (0, 0))[0] > 0
    memory = r.memory
    assert memory["gradients"] == memory["parameters"] > 0
    assert memory["optimizer_state"] >= 2 * memory["parameters"]  # Adam's two moments
    assert memory["total"] >= memory["parameters"] + memory["activations"]
    assert r.textbook_bytes_per_layer > 0


def test_the_training_table_shows_every_layouts_step_and_textbook(train_reports):
    cfg, reports = train_reports
    text = compare_table(cfg, list(reports.values()))
    assert "training step" in text and "textbook/layer" in text
    for name in NAMES:  # each row: its collectives, bytes, textbook, memory by part
        row = next(line for line in text.splitlines() if line.startswith(f"{name} "))
        assert row.count("iB") >= 7, row


def test_training_moves_twice_what_the_forward_pass_moves_between_separated_meshes(
    train_reports,
):
    cfg, reports = train_reports
    forward = meshes.get("ma_separation").lay_out(cfg, jax.devices()).cost("forward")
    train = reports["ma_separation"]
    assert train.per_layer["transfer"][0] == 2 * forward.per_layer["transfer"][0]
    assert train.per_layer["transfer"][1] == 2 * forward.per_layer["transfer"][1]


def test_a_strategy_gathers_its_tensor_split_weights_nowhere_in_training(train_reports):
    """tp16 splits every weight matrix: its step's gradients are reduced over small copies only
    (norm scales, biases), far less than data parallelism's whole-model all-reduce (ep16's
    attention weights are copied on every device)."""
    _, reports = train_reports
    tp, ep = reports["tp16"], reports["ep16"]
    assert tp.per_layer["all-reduce"][1] > 0 and ep.per_layer["all-reduce"][1] > 0
    assert ep.memory["parameters"] > tp.memory["parameters"]


@pytest.mark.parametrize(("name", "phase"), [("ep16", "decode"), ("ma_separation", "decode")])
def test_explain_takes_a_phase_for_both_kinds_of_layout(name, phase):
    cfg = tiny(micro_batches=2)
    doc = explain(cfg, meshes.get(name), jax.devices()[:DEVICES], phase).to_json()
    assert doc["phase"] == phase and doc["parameters"] and doc["collectives"]
    parts = " ".join(doc["memory_per_device"])
    assert ("gradients" in parts) == (phase == "train"), parts


def test_nothing_outside_the_layouts_branches_on_their_kind():
    pattern = re.compile(r"isinstance\([^)]*\b(Separation|Strategy|Separated|Placement)\b")
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("jaxmoe", "experiments", "meshes", "tests", "notebooks")
        for path in (ROOT / folder).rglob("*.py*")
        if pattern.search(path.read_text())
    ]
    assert not offenders

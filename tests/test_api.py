"""The public API: the README's example runs as written; results are frozen dataclasses whose
JSON is plain data; the recipe is the command line's; notebooks use the API, not the CLI."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from tiny import DEVICES, tiny

import jaxmoe
import meshes
from jaxmoe.compare import can_split
from jaxmoe.config import ConfigError
from jaxmoe.train.recipe import TINY_LEARNING_RATE, described

ROOT = Path(__file__).resolve().parent.parent


def test_the_readmes_example_runs_as_written():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    example = next(b for b in blocks if "import jaxmoe" in b)
    proc = subprocess.run(
        [sys.executable, "-c", example], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "\nep16 " in out and "max|dlogits|" in out  # compare's table, run
    assert "collectives of the training step" in out and "gradients" in out  # explain, train
    assert "plan for paper000:" in out  # the paper's full-size model, not its tiny one


def test_results_are_frozen_and_their_json_is_plain_data():
    cfg = tiny(micro_batches=2, decode_group_size=1)  # each device's one row routed where it is
    result = jaxmoe.compare(cfg, ["ep16"], phase="decode", devices=jax.devices()[:DEVICES])
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.phase = "train"
    doc = json.loads(json.dumps(result.to_json()))
    assert doc["phase"] == "decode" and doc["config"]["d_model"] == cfg.d_model
    assert doc["strategies"]["ep16"]["collectives_per_layer"]["all-to-all"]["count"] == 2
    assert "ep16" in result.table()


def test_layouts_by_name_and_a_clear_line_for_an_unknown_one():
    assert {"tp16", "ep16", "tp8_pp2", "ma_separation"} <= set(jaxmoe.layouts())
    assert jaxmoe.layout("ma_separation:8+8").n_devices == 16
    assert jaxmoe.layout(jaxmoe.layout("ep16")) is jaxmoe.layout("ep16")
    assert jaxmoe.layout("ep7").n_devices == 7  # any composition of parallelism axes
    with pytest.raises(ConfigError, match="unknown strategy 'nope'; choose from tp16") as err:
        jaxmoe.layout("nope")
    assert "\n" not in str(err.value)
    assert jaxmoe.config("paper000", "full").d_model == 4096
    assert jaxmoe.config("paper000").name == "paper000_tiny"


def test_the_recipe_is_the_command_lines():
    cfg, tc = jaxmoe.recipe(jaxmoe.config("tiny_moe"), 40)
    assert cfg.expert_dropout == 0.1 and (tc.warmup_steps, tc.decay_steps) == (4, 40)
    own = jaxmoe.config("tiny_moe").replace(expert_dropout=0.0)
    cfg, tc = jaxmoe.recipe(own, 40, jaxmoe.TrainConfig(warmup_steps=7), explicit={"warmup_steps"})
    assert cfg.expert_dropout == 0.1 and tc.warmup_steps == 7 and tc.decay_steps == 50000
    cfg, _ = jaxmoe.recipe(own, 40, explicit={"expert_dropout"})
    assert cfg.expert_dropout == 0.0
    _, tc = jaxmoe.recipe(jaxmoe.config("paper000", "full"), 40)
    assert tc.warmup_steps == 5000  # a full-size model keeps the papers' schedule
    assert tc.learning_rate == jaxmoe.TrainConfig().learning_rate == 1e-4  # and learning rate


def test_a_tiny_preset_learns_at_its_own_rate_unless_told_otherwise():
    cfg, tc = jaxmoe.recipe(jaxmoe.config("tiny_moe"), 600)
    assert tc.learning_rate == TINY_LEARNING_RATE != jaxmoe.TrainConfig().learning_rate
    line = described(cfg, tc)
    assert line.startswith("the tiny presets' recipe: AdamW, learning rate 0.003 after 60 ")
    mine = jaxmoe.TrainConfig(learning_rate=1e-2)
    cfg, tc = jaxmoe.recipe(jaxmoe.config("tiny_moe"), 600, mine, explicit={"learning_rate"})
    assert tc.learning_rate == 1e-2 and described(cfg, tc, {"learning_rate"}).endswith(
        "; yours: learning_rate"
    )
    paper = jaxmoe.config("paper000", "full")
    assert described(*jaxmoe.recipe(paper, 600)).startswith("the papers' recipe: AdamW, learning")


def test_notebooks_use_the_api_only():
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        code = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        assert "import jaxmoe" in code, path.name
        assert not re.search(r"^\s*(from|import) (experiments|meshes)\b", code, re.M), path.name


def test_compare_without_layouts_lists_those_that_cannot_split_the_model():
    """No layout named: every registered one that can split the model, each other one listed
    with its one-line reason (checked before anything is compiled)."""
    cfg = tiny(n_heads=8, head_dim=8)  # 8 heads: tp16 cannot split them
    able, refused = can_split(cfg, list(meshes.LAYOUTS.values()))
    assert [name for name, _ in refused] == ["tp16"]
    assert "splits n_heads=8 over mesh axes tensor" in refused[0][1]
    assert [s.name for s in able] == [n for n in meshes.LAYOUTS if n != "tp16"]
    shown = jaxmoe.api.Comparison(cfg, "train", (), refused)
    assert f"cannot split {cfg.name}:\n  tp16 " in shown.table()
    assert shown.to_json()["cannot_split"] == {"tp16": refused[0][1]}

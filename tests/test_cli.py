"""The main job from the command line: its table, its JSON, and one-line errors."""

import json
import subprocess
import sys

import pytest

import meshes

SMALL = ["--set", "vocab_size=300", "--set", "d_model=64", "--set", "seq_len=16"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "experiments.run", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_compare_prints_table_and_writes_json(tmp_path):
    out = tmp_path / "compare.json"
    proc = run("compare", *SMALL, "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    for name in meshes.LAYOUTS:
        assert f"\n{name} " in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["config"]["d_model"] == 64
    assert set(doc["strategies"]) == set(meshes.LAYOUTS) >= {"tp16", "ep16", "ma_separation"}
    for entry in doc["strategies"].values():
        assert entry["max_abs_err"] <= 1e-4 * entry["logits_scale"]
        assert 0.9 <= entry["bytes_vs_textbook"] <= 1.1
        assert entry["n_layers"] == 2 and entry["n_moe_layers"] == 2
        assert 0 < entry["param_bytes_per_device"] <= entry["param_bytes_total"]
        assert set(entry["collectives"]) >= {"all-to-all", "all-reduce", "all-gather"}
    assert doc["strategies"]["ep16"]["collectives"]["all-to-all"]["count"] == 4
    assert doc["strategies"]["ep16"]["mesh"] == {"expert": 16}
    assert doc["strategies"]["ep16"]["bubble_fraction"] == 0
    pipelined = doc["strategies"]["tp8_pp2"]
    assert pipelined["mesh"] == {"pipe": 2, "tensor": 8}
    assert pipelined["bubble_fraction"] == 1 / 5  # 4 micro-batches, 2 stages
    assert pipelined["collectives"]["collective-permute"]["count"] == 5
    separated = doc["strategies"]["ma_separation"]
    assert separated["separation"]["transfer_vs_textbook"] == 1.0
    assert separated["collectives_per_layer"]["transfer"]["count"] == 8  # 4 micro-batches


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--strategies", "nope"], "unknown strategy 'nope'"),
        (["--config", "nope"], "unknown config 'nope'"),
        (["--set", "n_layer=2"], "unknown field"),
        (["--set", "top_k=two"], "expected int"),
        (["--set", "top_k=40"], "top_k=40"),
        (["--set", "capacity_factor=0"], "capacity_factor=0.0"),
        (["--strategies", "tp16", "--set", "n_heads=12"], "splits n_heads=12"),
        (["--strategies", "ep16", "--set", "n_experts=24"], "splits n_experts=24"),
        (["--strategies", "heads_dims_4x4", "--set", "batch=6"], "splits batch=6"),
        (["--strategies", "tp16", "--devices", "8"], "needs 16 devices, 8 given"),
        (["--strategies", "tp8_pp2", "--set", "micro_batches=3"], "micro_batches=3"),
        (["--strategies", "tp8_pp2", "--set", "n_layers=3"], "n_layers=3"),
        (["--strategies", "ma_separation:16+4"], "16 attention + 4 expert devices exceed"),
        (["--strategies", "ma_separation", "--set", "n_experts=6"], "n_experts=6 does not split"),
        (["--strategies", "ma_separation:12"], "expected ma_separation:A+X"),
    ],
)
def test_bad_input_is_one_line_without_traceback(args, needle):
    proc = run(*args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""

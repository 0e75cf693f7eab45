"""The main job from the command line: its table and its JSON (bad input: test_bad_input.py)."""

import json
import subprocess
import sys

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
        # a pipeline's idle iterations send as its busy ones: x 1 / (1 - bubble)
        assert 0.9 <= entry["bytes_vs_minimum"] * (1 - entry["bubble_fraction"]) <= 1.1
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
    assert separated["separation"]["transfer_vs_minimum"] == 1.0
    assert separated["collectives_per_layer"]["transfer"]["count"] == 8  # 4 micro-batches

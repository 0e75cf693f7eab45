"""`experiment`: the papers' setups beside their bounds (full size, compiled on abstract inputs)
and measured on the tiny models, every strategy generating one device's tokens."""

import json

import pytest

from experiments import run


def experiment(tmp_path, *args):
    out = tmp_path / "out.json"
    assert run.main(["experiment", *args, "--json", str(out), "--plots", str(tmp_path)]) == 0
    return json.loads(out.read_text())


def rows_of(doc, strategy, phase):
    found = [r for r in doc["rows"] if r["strategy"] == strategy and r["phase"] == phase]
    assert len(found) == 1
    return found[0]


def test_paper000_full_flags_the_impossible_claims(tmp_path, capsys):
    doc = experiment(tmp_path, "paper000", "--scale", "full")
    assert doc["experiment"] == "paper000" and doc["hardware"] == "h100x16"
    decode = rows_of(doc, "ep16", "decode")
    # B 128 at 10,000 tokens of context: weights and cache read once take ~8 ms (GELU experts)
    assert decode["bound"]["overlapped"] is True and decode["bound"]["tpot_ms"] > 7.0
    assert decode["claimed"]["tpot_ms"] == 2.2 and decode["claim_exceeds_bound"] is True
    assert decode["limit"] == "memory" and decode["measured"] is None
    prefill = rows_of(doc, "ep16", "prefill")
    assert prefill["claimed"]["tps"] == 450_000 and prefill["claim_exceeds_bound"] is False
    assert (
        prefill["bound"]["tps"] > 450_000
        and prefill["bound_serial"]["tps"] < prefill["bound"]["tps"]
    )
    for row in doc["rows"]:
        assert set(row) >= {"strategy", "phase", "measured", "bound", "claimed",
                            "claim_exceeds_bound", "memory_bytes_per_device", "fits"}  # fmt: skip
    out = capsys.readouterr().out
    assert "IMPOSSIBLE" in out and "gelu, 2 matrices" in out
    assert (tmp_path / "paper000_full.png").stat().st_size > 10_000


def test_paper000_tiny_measures_and_matches_one_device(tmp_path):
    doc = experiment(tmp_path, "paper000", "--warmup", "1", "--iters", "3")
    for row in doc["rows"]:
        assert row["same_tokens_as_one_device"] is True
        assert row["measured"]["calls"] == 3 and row["measured"]["tps"] > 0
        low, high = row["measured"]["ci95_s"]
        assert low <= row["measured"]["median_s"] <= high


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["experiment", "paper999"], "unknown paper 'paper999'; choose one of paper000"),
        (["experiment", "paper000", "--hardware", "tpu"], "unknown hardware profile 'tpu'"),
        (["compare", "--config", "nope"], "choose one of bench_moe"),
    ],
)
def test_bad_names_get_one_line(args, message, capsys):
    assert run.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_device_reports_its_share_of_the_bound(tmp_path):
    out = tmp_path / "device.json"
    args = ["device", "--config", "tiny_moe", "--warmup", "1", "--iters", "2", "--json", str(out)]
    assert run.main(args) == 0
    doc = json.loads(out.read_text())
    assert [r["phase"] for r in doc["rows"]] == ["prefill", "decode"]
    for row in doc["rows"]:  # a CPU against an H100's peaks: far below, never above
        assert 0 < row["mfu"] < 1 and 0 < row["hbm_bandwidth_fraction"] < 1
        assert row["fraction_of_bound"] == pytest.approx(
            row["bound"]["seconds"] / row["measured"]["median_s"]
        )


def test_paper001_full_bounds_ma_separation(tmp_path):
    """The paper's own layout gets its bound from its compiled pieces; its claimed decode TPOT
    (1.82 ms at B 1024 x S 2048) is below what the 16 A100s can do."""
    doc = experiment(tmp_path, "paper001", "--scale", "full")
    decode = rows_of(doc, "ma_separation", "decode")
    assert decode["claimed"]["tpot_ms"] == 1.82 and decode["claim_exceeds_bound"] is True
    assert decode["bound"]["tpot_ms"] > 1.82 and decode["fits"] is True
    roofline = decode["roofline"]
    assert set(roofline["pieces"]) == {"embed", "attend", "experts", "head"}
    assert roofline["serial_s"] >= roofline["overlapped_s"] > 0
    assert roofline["limit"].startswith(("attention mesh", "expert mesh", "links", "one micro"))
    prefill = rows_of(doc, "ma_separation", "prefill")
    tp = rows_of(doc, "tp8_pp2", "prefill")
    assert prefill["bound"]["tps"] > 0 and tp["bound"]["tps"] > 0

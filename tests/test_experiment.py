"""`experiment`: the papers' setups beside their bounds (full size, compiled on abstract inputs)
and measured on the tiny models, every strategy generating one device's tokens."""

import json

import pytest

from experiments import run
from tests import forked_cli


def experiment(tmp_path, *args):
    out = tmp_path / "out.json"
    assert run.main(["experiment", *args, "--json", str(out), "--plots", str(tmp_path)]) == 0
    return json.loads(out.read_text())


def rows_of(doc, strategy, phase, model=None):
    """The one row of `strategy` in `phase` on `model` (default: the experiment's own model)."""
    model = model or doc["rows"][0]["model"]
    found = [
        r
        for r in doc["rows"]
        if (r["strategy"], r["phase"], r["model"]) == (strategy, phase, model)
    ]
    assert len(found) == 1
    return found[0]


def assert_claim_beside_bound(row, **claimed):
    """The row's claim is the paper's figures, its bound computed, and the claim flagged exactly
    when it beats the bound."""
    assert {k: row["claimed"][k] for k in claimed} == claimed
    bound = row["bound"]
    assert bound and bound["seconds"] > 0 and row["fits"] is not None
    too_fast = "tps" in claimed and claimed["tps"] > bound["tps"]
    beats = too_fast or ("tpot_ms" in claimed and claimed["tpot_ms"] < bound["tpot_ms"])
    assert row["claim_exceeds_bound"] is beats


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
    # blockwise attention: no [S, S] scores of 8 sequences x 32 heads (51 GB in bf16 alone)
    assert prefill["fits"] is True and prefill["memory_bytes_per_device"] < 50 * 2**30
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
        (["experiment", "paper002", "--devices", "8,x"], "'x' is not a device count"),
        (["experiment", "paper002", "--devices", "0"], "--devices 0: 0 must be at least 1"),
        (["experiment", "paper002", "--devices", "16,8,16"], "16 is given twice"),
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


def test_paper001_full_bounds_ma_separation(tmp_path, capsys):
    """The paper's own layout gets its bound from its compiled pieces; its claimed decode TPOT
    (1.82 ms at B 1024 x S 2048) is below what the 16 A100s can do; so is each TPOT 5.7 claims
    at another sequence length, bounded for that length (decode only: nothing else claimed)."""
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
    assert decode["model"] == "S 2048" and "Table 1" in decode["claimed"]["source"]
    assert "5.7" in decode["claimed"]["source"]  # 5.7's 2048 figure is Table 1's, one row
    bounds = []
    for seq_len, tpot in ((512, 0.89), (1024, 1.21), (2048, 1.82), (4096, 3.41)):
        row = rows_of(doc, "ma_separation", "decode", f"S {seq_len}")
        assert (row["seq_len"], row["batch"]) == (seq_len, 1024)
        assert_claim_beside_bound(row, tpot_ms=tpot)
        bounds.append(row["bound"]["tpot_ms"])
    assert bounds == sorted(bounds)  # a longer cache is never faster to read
    assert len(doc["rows"]) == 4 + 3  # the S 512, 1024 and 4096 models: their decode rows only
    assert {r["seq_len"] for r in doc["rows"] if r["phase"] == "prefill"} == {2048}
    out = capsys.readouterr().out
    assert " model " in out and "S 4096" in out and "3.41 ms" in out


def test_paper004_full_bounds_dense_and_moe(tmp_path, capsys):
    """Both models of the paper's results table: the 4-layer MoE and the same model dense, each
    claim beside the bound compiled for its own model."""
    doc = experiment(tmp_path, "paper004", "--scale", "full")
    assert doc["config"]["moe_every"] == 1
    claims = {
        ("tp8_pp2", "MoE"): (850_000, 0.45),
        ("heads_dims_4x4", "MoE"): (1_150_000, 0.30),
        ("tp8_pp2", "dense"): (1_200_000, 0.35),
        ("heads_dims_4x4", "dense"): (1_580_000, 0.22),
    }
    for (strategy, model), (tps, tpot) in claims.items():
        assert_claim_beside_bound(rows_of(doc, strategy, "prefill", model), tps=tps)
        assert_claim_beside_bound(rows_of(doc, strategy, "decode", model), tpot_ms=tpot)
    assert len(doc["rows"]) == 8
    dense = rows_of(doc, "tp8_pp2", "decode", "dense")
    moe = rows_of(doc, "tp8_pp2", "decode", "MoE")
    assert dense["memory"] != moe["memory"]  # another program: no experts
    assert "dense" in capsys.readouterr().out
    assert (tmp_path / "paper004_full.png").stat().st_size > 10_000


def test_paper002_full_scales_to_8_and_32(tmp_path):
    """Both layouts at 8, 16 and 32 devices, each bounded on as many H100s (nodes of 8); the
    scaling claims derived from the 16-GPU TPS (strong: at 8 on the same batch; weak: at 32 on
    twice the batch, prefilling twice the sequences) beside their bounds and flagged where above;
    the bound's own scaling efficiency beside the claimed one. In a process of its own: the
    command makes the 32 CPU devices it needs (a worker may have started JAX with fewer)."""
    out = tmp_path / "out.json"  # no plot: 8 programs compile already
    done = forked_cli.run(
        "experiment", "paper002", "--scale", "full", "--devices", "8,16,32", "--json", str(out)
    )
    assert done.returncode == 0, done.stderr
    doc = json.loads(out.read_text())
    layouts = {8: ("tp8", "heads4_dims2"), 16: ("tp8_pp2", "heads_dims_4x4"),
               32: ("tp8_pp4", "heads8_dims4")}  # fmt: skip
    derived = {"tp8": 1_200_000 / 1.7, "heads4_dims2": 1_580_000 / 1.7,
               "tp8_pp4": 2_400_000, "heads8_dims4": 3_160_000}  # fmt: skip
    tps, flagged = {}, []
    for n, names in layouts.items():
        for name in names:
            row = rows_of(doc, name, "prefill", "B 256" if n == 32 else "B 128")
            assert (row["devices"], row["hardware"]) == (n, f"h100x{n}")
            assert row["bound"]["seconds"] > 0 and row["fits"] is True
            tps[name] = row["bound"]["tps"]
            if n != 16:  # the scaling claims: derived, beside their bound, flagged if above it
                assert row["claimed"]["tps"] == pytest.approx(derived[name])
                assert row["claimed"]["source"].startswith("derived")
                assert_claim_beside_bound(row, tps=row["claimed"]["tps"])
                flagged += [name] * row["claim_exceeds_bound"]
    assert flagged  # at least one derived claim is above what the H100s allow
    # at 8 and 32 the claims' rows alone (prefill; B 256 at 32), at 16 both phases as ever
    assert sorted((r["devices"], r["phase"]) for r in doc["rows"]) == [
        *[(8, "prefill")] * 2, *[(16, "decode")] * 2, *[(16, "prefill")] * 2,
        *[(32, "prefill")] * 2]  # fmt: skip
    for small, paper in (("tp8", "tp8_pp2"), ("heads4_dims2", "heads_dims_4x4")):
        strong = rows_of(doc, small, "prefill", "B 128")["scaling"]
        assert strong["kind"] == "strong" and strong["devices"] == [8, 16]
        assert strong["batch"] == [128, 128]  # the same batch
        assert strong["claimed_efficiency"] == pytest.approx(0.85)
        assert strong["bound_efficiency"] == pytest.approx(tps[paper] / (2 * tps[small]))
    weak_row = rows_of(doc, "tp8_pp4", "prefill", "B 256")
    assert weak_row["batch"] == 32  # twice the paper's prefill of 16 sequences
    weak = weak_row["scaling"]
    assert (weak["kind"], weak["devices"], weak["batch"]) == ("weak", [16, 32], [128, 256])
    assert weak["claimed_efficiency"] == pytest.approx(1.0)
    assert weak["bound_efficiency"] == pytest.approx(tps["tp8_pp4"] / (2 * tps["tp8_pp2"]))
    assert "bound's efficiency" in done.stdout and "8 (h100x8)" in done.stdout

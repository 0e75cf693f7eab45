"""The papers' experiments: configs construct, claims are the papers' figures (read from their
text), tiny ones run under each of their strategies."""

import dataclasses
import re
from pathlib import Path

import jax
import numpy as np
import pytest

import meshes
from experiments.papers import Claim, registry
from jaxmoe.compare import random_tokens
from jaxmoe.config import ConfigError
from jaxmoe.placement import init_params

EXPERIMENTS = list(registry.EXPERIMENTS.values())
PAIRS = [(e, s) for e in EXPERIMENTS for s in e.strategies]
PAIR_IDS = [f"{e.name}-{s}" for e, s in PAIRS]
PAPERS = Path(__file__).resolve().parents[2] / "shared" / "papers"  # the source documents


def paper_text(exp) -> str:
    path = PAPERS / exp.paper
    if not path.exists():
        pytest.skip(f"the source papers are not here ({path})")
    return path.read_text()


def claims_on(exp, strategy, **fields):
    """The claims for `strategy` on the model with these fields (its own model if none differ)."""
    return [
        c
        for c in exp.claims
        if c.strategy == strategy
        and all(getattr(c.model or exp.full, k) == v for k, v in fields.items())
    ]


def test_five_papers_by_name():
    assert list(registry.EXPERIMENTS) == [f"paper00{i}" for i in range(5)]
    assert registry.get("paper003").full.d_model == 8192


@pytest.mark.parametrize("exp", EXPERIMENTS, ids=lambda e: e.name)
def test_configs_are_named_and_share_structure(exp):
    full, tiny = exp.full, exp.tiny
    assert (full.name, tiny.name) == (exp.name, f"{exp.name}_tiny")
    assert exp.config("full") is full and exp.config("tiny") is tiny
    same = ("moe_every", "n_experts", "top_k", "capacity_factor", "expert_form")
    assert [getattr(tiny, f) for f in same] == [getattr(full, f) for f in same]
    assert full.n_heads * full.head_dim == full.d_model
    assert tiny.n_heads * tiny.head_dim == tiny.d_model
    assert exp.hardware in ("h100x16", "h100x16n4", "a100x16", "a100x16n4")


@pytest.mark.parametrize(("exp", "strategy"), PAIRS, ids=PAIR_IDS)
def test_both_scales_fit_each_strategy(exp, strategy):
    layout = meshes.get(strategy)
    for cfg in (exp.tiny, exp.full):
        layout.check(cfg, 16)


@pytest.mark.parametrize("exp", EXPERIMENTS, ids=lambda e: e.name)
def test_claims_name_compared_strategies(exp):
    assert exp.claims
    for claim in exp.claims:
        assert claim.strategy in exp.strategies_at(exp.devices_of(claim))
        assert claim.tps or claim.tpot_ms
        assert claim.source


def test_scaled_layouts_fit_their_count():
    """Each layout an experiment scales its strategies to spans that count and lays out both
    scales of its model (and a claimed model's batch)."""
    for exp in EXPERIMENTS:
        for n, names in exp.layouts_at:
            assert len(names) == len(exp.strategies) and n != exp.n_devices
            for name in names:
                layout = meshes.get(name)
                assert layout.n_devices == n
                for cfg in (exp.tiny, exp.full, exp.full.replace(batch=2 * exp.full.batch)):
                    layout.check(cfg, n)


def test_claims_for_other_models_fit_their_strategy():
    for exp in EXPERIMENTS:
        for claim in exp.claims:
            if claim.model is not None:
                assert claim.model.name == exp.name  # the same model, another configuration
                for batch in (claim.model.batch, 16):  # decode, and prefill's 16 sequences
                    layout = meshes.get(claim.strategy)
                    layout.check(claim.model.replace(batch=batch), exp.devices_of(claim))


def test_paper004_claims_are_its_results_table():
    """Every row of the paper's results table (dense and MoE, baseline and proposed) is a claim
    on the model it names, read from the paper's text."""
    exp = registry.get("paper004")
    rows = re.findall(
        r"^\| 4-layer (Dense|MoE) \| (Baseline|Proposed) \(.*?\) \| ([\d,]+) \| ([\d.]+) \|$",
        paper_text(exp),
        re.MULTILINE,
    )
    assert len(rows) == 4
    strategy = {"Baseline": "tp8_pp2", "Proposed": "heads_dims_4x4"}
    for kind, method, tps, tpot in rows:
        moe_every = 0 if kind == "Dense" else 1
        claims = claims_on(exp, strategy[method], moe_every=moe_every)
        assert [(c.tps, c.tpot_ms) for c in claims] == [(int(tps.replace(",", "")), float(tpot))]
        assert f"4-layer {kind}" in claims[0].source and method in claims[0].source
    assert len(exp.claims) == 4
    dense = claims_on(exp, "tp8_pp2", moe_every=0)[0].model
    assert dense == exp.full.replace(moe_every=0)  # the same 4 layers, every MLP dense
    assert list(exp.models().values()) == ["MoE", "dense"]


def test_paper002_scaling_claims_are_its_extended_analysis():
    """'Strong Scaling: 85% efficiency at 16 GPUs vs 8 GPUs' and 'Weak Scaling: Performance
    scales linearly to 32 GPUs', read from the paper, applied to its 16-GPU TPS: the TPS they
    imply at 8 GPUs (the same batch) and at 32 (twice the batch), each a claim for the layout
    at that count; the 16-GPU claims stay as the table has them."""
    exp = registry.get("paper002")
    text = paper_text(exp)
    efficiency, large, small = map(
        int,
        re.search(r"Strong Scaling\*\*: (\d+)% efficiency at (\d+) GPUs vs (\d+)", text).groups(),
    )
    linear_to = int(
        re.search(r"Weak Scaling\*\*: Performance scales linearly to (\d+) GPUs", text)[1]
    )
    table = dict(re.findall(r"^\| (Baseline|Proposed) \| ([\d,]+) \|", text, re.MULTILINE))
    tps = {method: int(value.replace(",", "")) for method, value in table.items()}
    assert (efficiency, large, small, linear_to) == (85, 16, 8, 32) and len(tps) == 2
    at = {8: ("tp8", "heads4_dims2"), 16: ("tp8_pp2", "heads_dims_4x4"),
          32: ("tp8_pp4", "heads8_dims4")}  # fmt: skip
    assert exp.n_devices == large and dict(exp.layouts_at) == {8: at[8], 32: at[32]}
    for i, method in enumerate(("Baseline", "Proposed")):
        (own,) = [c for c in exp.claims if c.strategy == at[16][i]]
        assert (own.tps, own.devices, own.model) == (tps[method], None, None)
        (strong,) = [c for c in exp.claims if c.strategy == at[small][i]]
        assert strong.devices == small and strong.model is None  # the same batch
        assert strong.tps == pytest.approx(tps[method] / (large / small * efficiency / 100))
        (weak,) = [c for c in exp.claims if c.strategy == at[linear_to][i]]
        grown = exp.full.replace(batch=exp.full.batch * linear_to // large)  # weak: batch grows
        assert weak.devices == linear_to and weak.model == grown
        assert weak.tps == pytest.approx(tps[method] * linear_to / large)
        for claim in (strong, weak):
            assert claim.source.startswith("derived") and method in claim.source
            assert claim.tpot_ms is None  # TPS scales; nothing said of TPOT
    assert len(exp.claims) == 6
    assert list(exp.models().values()) == ["B 128", "B 256"]
    assert list(exp.models([16]).values()) == [None]  # the 16-GPU run: its own model alone


def test_paper001_claims_its_tpot_by_sequence_length():
    """5.7's TPOT at each sequence length is a claim for MA Separation at that length (B 1024)."""
    exp = registry.get("paper001")
    section = paper_text(exp).split("### 5.7")[1].split("###")[0]
    block = section.split("tpot_ms:")[1].split("scaling_factor")[0]
    found = [(int(s), float(t)) for s, t in re.findall(r"^\s+(\d+): ([\d.]+)", block, re.M)]
    assert [s for s, _ in found] == [512, 1024, 2048, 4096]
    for seq_len, tpot in found:
        claims = [c for c in claims_on(exp, "ma_separation", seq_len=seq_len) if "5.7" in c.source]
        assert [c.tpot_ms for c in claims] == [tpot]
        assert (claims[0].tps, claims[0].model.batch) == (None, 1024)
    assert list(exp.models().values()) == ["S 2048", "S 512", "S 1024", "S 4096"]


def test_claims_models_must_be_told_apart():
    exp = registry.get("paper001")
    other = Claim("tp8_pp2", tpot_ms=1.0, model=exp.full.replace(vocab_size=7))
    odd = dataclasses.replace(exp, claims=(*exp.claims, other))
    with pytest.raises(ConfigError, match="claims' models differ in more than"):
        odd.models()


def test_paper000_claims():
    claims = {c.strategy: c for c in registry.get("paper000").claims}
    assert (claims["ep16"].tps, claims["ep16"].tpot_ms) == (450_000, 2.2)
    assert (claims["tp8_pp2"].tps, claims["tp8_pp2"].tpot_ms) == (120_000, 8.3)


def test_unknown_paper_names_the_choices():
    with pytest.raises(ConfigError, match="paper000, paper001"):
        registry.get("paper999")


@pytest.mark.parametrize(("exp", "strategy"), PAIRS, ids=PAIR_IDS)
def test_tiny_runs_under_each_strategy(exp, strategy):
    cfg, layout = exp.tiny, meshes.get(strategy)
    _, state = init_params(cfg)
    run = layout.lay_out(cfg, jax.devices())
    logits, _ = run.run_forward(run.put(state), random_tokens(cfg, 0))
    assert logits.shape[:2] == (cfg.batch, cfg.seq_len)
    assert np.isfinite(logits).all()

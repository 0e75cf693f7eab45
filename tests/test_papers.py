"""The papers' experiments: configs construct, tiny ones run under each of their strategies."""

import jax
import numpy as np
import pytest

import meshes
from experiments.papers import registry
from jaxmoe.compare import random_tokens
from jaxmoe.config import ConfigError
from jaxmoe.placement import init_params

EXPERIMENTS = list(registry.EXPERIMENTS.values())
PAIRS = [(e, s) for e in EXPERIMENTS for s in e.strategies]
PAIR_IDS = [f"{e.name}-{s}" for e, s in PAIRS]


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
        assert claim.strategy in exp.strategies
        assert claim.tps or claim.tpot_ms
        assert claim.source


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

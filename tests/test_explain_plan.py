"""`explain` reads a layout out of its compiled programs; `plan` ranks layouts by their bound."""

import json
import math

import jax
import pytest
from test_compiled_layouts import GOLDEN
from tiny import DEVICES, tiny

import meshes
from experiments import run
from jaxmoe.explain import explain

STRATEGIES = list(meshes.REGISTRY.values())


@pytest.mark.parametrize("strategy", STRATEGIES, ids=[s.name for s in STRATEGIES])
def test_explain_gives_the_golden_partition_specs(strategy):
    doc = explain(tiny(True, moe_every=2, n_layers=4), strategy, jax.devices()[:DEVICES]).to_json()
    golden = json.loads((GOLDEN / f"{strategy.name.replace(':', '-')}.json").read_text())
    assert {p["path"]: p["spec"] for p in doc["parameters"]} == golden
    by_path = {p["path"]: p for p in doc["parameters"]}
    assert by_path["embed"]["logical_axes"] == ["vocab", "embed"]
    memory = doc["memory_per_device"]
    assert memory["parameters"] == sum(p["bytes_per_device"] for p in doc["parameters"])
    assert memory["optimizer_state"] >= 2 * memory["parameters"]  # Adam's two moments
    assert memory["activations"] > 0 and memory["kv_cache"] > 0
    # the parameter counts (from the config) against the parameters the program holds
    sizes = {p["path"]: math.prod(p["shape"]) for p in doc["parameters"]}
    assert doc["params_total"] == sum(sizes.values())
    experts = sum(n for path, n in sizes.items() if "expert" in by_path[path]["logical_axes"])
    cfg = tiny(True, moe_every=2, n_layers=4)
    assert doc["params_active"] == doc["params_total"] - experts * (1 - cfg.top_k / cfg.n_experts)


def test_explain_ep16_names_its_all_to_alls_per_layer():
    cfg = tiny(True)
    doc = explain(cfg, meshes.get("ep16"), jax.devices()[:DEVICES]).to_json()
    per_layer = [c for c in doc["collectives"] if c["where"] == "per layer"]
    a2a = [c for c in per_layer if c["kind"] == "all-to-all"]
    assert len(a2a) == 1 and a2a[0]["axes"] == "expert" and a2a[0]["count"] == 2


def test_explain_ma_separation_keeps_experts_off_the_attention_mesh(capsys, tmp_path):
    out = tmp_path / "explain.json"
    assert (
        run.main(["explain", "ma_separation", "--set", "micro_batches=2", "--json", str(out)]) == 0
    )
    doc = json.loads(out.read_text())
    meshes_of = {p["path"].rsplit("/", 1)[-1]: p["mesh"] for p in doc["parameters"]}
    assert meshes_of["w_in"] == meshes_of["router"] == "experts"
    assert meshes_of["wq"] == meshes_of["embed"] == "attention"
    assert doc["memory_per_device"]["attention_kv_cache"] > 0
    assert "blocks/<each>/moe/attn/wq" in capsys.readouterr().out


def test_plan_ranks_as_the_experiments_bounds(tmp_path):
    names = "ep16,tp8_pp2,ma_separation"
    plan_json, exp_json = tmp_path / "plan.json", tmp_path / "exp.json"
    args = ["plan", "--config", "paper000", "--hardware", "h100x16", "--strategies", names,
            "--phases", "prefill,decode"]  # fmt: skip
    assert run.main([*args, "--json", str(plan_json)]) == 0
    plan = json.loads(plan_json.read_text())
    assert run.main(["experiment", "paper000", "--scale", "full", "--json", str(exp_json)]) == 0
    rows = json.loads(exp_json.read_text())["rows"]
    for phase, key, sign in (("prefill", "tps", -1), ("decode", "tpot_ms", 1)):
        bounded = [r for r in rows if r["phase"] == phase and r["bound"]]
        order = sorted(bounded, key=lambda r: (not r["fits"], sign * r["bound"][key]))
        expected = [r["strategy"] for r in order]
        assert [s for s in plan["ranking"][phase] if s in expected] == expected
        assert set(plan["ranking"][phase]) == set(names.split(","))
        best = next(r for r in plan["rows"] if r["phase"] == phase and r["rank"] == 1)
        assert best["reason"].startswith("best")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["plan", "--strategies", "nope"], "unknown strategy 'nope'"),
        (["plan", "--hardware", "tpu"], "unknown hardware profile 'tpu'"),
        (["plan", "--config", "nope"], "unknown config 'nope'"),
        (["explain", "nope"], "unknown strategy 'nope'"),
        (["explain", "ep16", "--config", "nope"], "unknown config 'nope'"),
    ],
)
def test_bad_names_get_one_line_listing_the_choices(args, message, capsys):
    assert run.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "choose" in err


def test_the_strategies_page_shows_each_layouts_rules_as_the_code_has_them():
    from experiments.strategy_docs import PAGE, rules_table

    page = PAGE.read_text()
    for name, layout in meshes.LAYOUTS.items():
        assert f"## `{name}`" in page
        for strategy in layout.strategies.values():
            assert rules_table(strategy) in page, name


def test_explain_ma_separation_gives_its_golden_partition_specs():
    """Set JAXMOE_UPDATE_GOLDEN=1 to rewrite the snapshot after an intended change."""
    import os

    cfg = tiny(True, moe_every=2, n_layers=4, micro_batches=2)
    doc = explain(cfg, meshes.get("ma_separation"), jax.devices()[:DEVICES]).to_json()
    specs = {f"{p['path']} [{p['mesh']}]": p["spec"] for p in doc["parameters"]}
    path = GOLDEN / "ma_separation.json"
    if os.environ.get("JAXMOE_UPDATE_GOLDEN"):
        lines = (f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(specs.items()))
        path.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    assert specs == json.loads(path.read_text())

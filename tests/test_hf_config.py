"""Hugging Face config.json files: every shipped model reads, counts what its publisher says it
has, and has a CPU-sized twin of the same structure; bad files are one line naming the field or
the file and the fix; fields that change only numerics are warnings."""

import json
import logging

import pytest

from jaxmoe import catalogue, hf_config
from jaxmoe.config import ConfigError
from jaxmoe.model.counts import param_counts

FULL = [name for name in hf_config.shipped() if not name.endswith("-tiny")]


def raw(name: str) -> dict:
    return json.loads((hf_config.MODELS / f"{name}.json").read_text())


@pytest.mark.parametrize("name", hf_config.shipped())
def test_every_shipped_config_reads(name):
    cfg, warnings = hf_config.load(name)
    assert cfg.name == name
    assert (cfg.positions, cfg.mlp_form, cfg.expert_form) == ("rope", "swiglu", "swiglu")
    assert all(isinstance(w, str) and w and "\n" not in w for w in warnings)
    assert raw(name)["_source"]


# Each publisher's figures, in billions as quoted (a figure matches within 1%, or within one unit
# of its last quoted digit where that is coarser: "37B" is 36.5B..37.5B rounded, 37B..38B cut
# short). Active counts take in the LM head and, unless the publisher leaves it out, the token
# table (`ParamCounts.active` counts both).
PUBLISHED = {
    # https://mistral.ai/news/mixtral-of-experts: "46.7B total parameters but only uses 12.9B
    # parameters per token"
    "mixtral-8x7b": ("46.7", "12.9", True),
    # https://huggingface.co/Qwen/Qwen3-30B-A3B: "30.5B in total and 3.3B activated"
    "qwen3-30b-a3b": ("30.5", "3.3", True),
    # https://huggingface.co/Qwen/Qwen3-235B-A22B: "235B in total and 22B activated"
    "qwen3-235b-a22b": ("235", "22", True),
    # https://huggingface.co/deepseek-ai/DeepSeek-V3 and arXiv:2412.19437: "671B total
    # parameters with 37B activated for each token", the main model without its 14B
    # multi-token-prediction module (the checkpoint's 685B)
    "deepseek-v3": ("671", "37", True),
    # https://huggingface.co/openai/gpt-oss-120b and its model card (arXiv:2508.10925, table 1:
    # 116.83B total, 5.13B active): active parameters count the unembedding, not the embedding
    "gpt-oss-120b": ("116.8", "5.1", False),
    # https://huggingface.co/meta-llama/Llama-3.1-70B: 70.6B parameters (the checkpoint's
    # count; Meta's model card rounds to 70B); dense, so every parameter is active
    "llama-3.1-70b": ("70.6", "70.6", True),
}


def matches(ours: int, quoted: str) -> bool:
    figure = float(quoted) * 1e9
    unit = 10.0 ** -len(quoted.partition(".")[2]) * 1e9
    return abs(ours - figure) <= max(0.01 * figure, unit)


def test_every_full_model_has_published_figures():
    assert sorted(PUBLISHED) == sorted(FULL)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_figures(name):
    total, active, embedding_active = PUBLISHED[name]
    cfg, _ = hf_config.load(name)
    counts = param_counts(cfg)
    table = 0 if embedding_active else cfg.padded_vocab * cfg.d_model
    assert matches(counts.total, total), f"{counts.total / 1e9:.2f}B, published {total}B"
    ours = counts.active - table
    assert matches(ours, active), f"{ours / 1e9:.2f}B active, published {active}B"


def structure(cfg) -> dict:
    """What a tiny twin shares with its model."""
    return {
        "moe": cfg.is_moe,
        "grouped": cfg.n_heads // cfg.kv_heads,
        "own head_dim": cfg.n_heads * cfg.head_dim != cfg.d_model,
        "mla": (cfg.is_mla, cfg.q_lora_rank > 0),
        "fine-grained": cfg.expert_d_ff > 0,
        "shared": cfg.n_shared_experts,
        "first dense": cfg.first_dense > 0,
        "moe every": cfg.moe_every,
        "routing": (cfg.router_score, cfg.norm_top_k, cfg.routed_scale, cfg.router_groups > 0),
        "window": (cfg.sliding_window > 0, cfg.sliding_every),
        "tied": cfg.tie_embeddings,
    }


@pytest.mark.parametrize("name", FULL)
def test_each_model_has_a_tiny_twin_of_the_same_structure(name):
    (full, full_warnings), (tiny, tiny_warnings) = map(hf_config.load, (name, f"{name}-tiny"))
    assert raw(name)["model_type"] == raw(f"{name}-tiny")["model_type"]
    assert structure(tiny) == structure(full)
    # the same numerics-only fields, bar the published weights' storage format
    fields = [w.split(":")[0] for w in full_warnings if not w.startswith("quantization_config")]
    assert [w.split(":")[0] for w in tiny_warnings] == fields
    assert 64 <= tiny.d_model <= 128 and tiny.n_layers <= 4 and tiny.vocab_size == 512
    assert tiny.n_heads % 8 == 0 and tiny.n_heads % tiny.kv_heads == 0
    if tiny.is_moe:  # as many experts as the full model where it has fewer than 16
        assert tiny.n_experts == min(full.n_experts, 16)
    assert param_counts(tiny).total < 4_000_000


def test_mapping_of_deepseek_v3():
    cfg, warnings = hf_config.load("deepseek-v3")
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.kv_heads) == (7168, 61, 128, 128)
    assert (cfg.kv_lora_rank, cfg.q_lora_rank) == (512, 1536)
    assert (cfg.head_dim, cfg.rope_head_dim, cfg.v_head_dim) == (128, 64, 128)
    assert (cfg.first_dense, cfg.moe_every, cfg.n_moe_layers) == (3, 1, 58)
    assert (cfg.n_experts, cfg.top_k, cfg.expert_d_ff, cfg.d_ff) == (256, 8, 2048, 18432)
    assert (cfg.n_shared_experts, cfg.shared_hidden) == (1, 2048)
    assert (cfg.router_score, cfg.norm_top_k, cfg.routed_scale) == ("sigmoid", True, 2.5)
    assert (cfg.router_groups, cfg.router_group_top) == (8, 4)
    assert (cfg.vocab_size, cfg.tie_embeddings, cfg.rope_theta) == (129280, False, 10000.0)
    assert cfg.batch == 16 and cfg.dtype == cfg.param_dtype == "bfloat16"  # torch_dtype
    fields = {w.split(":")[0].split("=")[0] for w in warnings}
    assert fields == {"rope_scaling", "quantization_config", "topk_method"} | {
        "num_nextn_predict_layers"
    }


def test_mapping_of_gpt_oss_mixtral_qwen_and_llama():
    oss, warnings = hf_config.load("gpt-oss-120b")
    assert (oss.n_heads, oss.kv_heads, oss.head_dim, oss.d_model) == (64, 8, 64, 2880)
    assert (oss.sliding_window, oss.sliding_every) == (128, 2)
    assert [oss.window(i) for i in range(4)] == [128, 0, 128, 0]
    assert (oss.n_experts, oss.top_k, oss.expert_hidden, oss.router_aux_coef) == (128, 4, 2880, 0.9)
    assert any(w.startswith("model_type=gpt_oss: attention sinks") for w in warnings)
    assert any(w.startswith("attention_bias=true") and "count omits" in w for w in warnings)
    mixtral, _ = hf_config.load("mixtral-8x7b")
    assert (mixtral.expert_hidden, mixtral.norm_top_k, mixtral.sliding_window) == (14336, True, 0)
    qwen, _ = hf_config.load("qwen3-235b-a22b")
    assert (qwen.head_dim, qwen.expert_d_ff, qwen.n_experts, qwen.top_k) == (128, 1536, 128, 8)
    assert (qwen.moe_every, qwen.first_dense, qwen.n_shared_experts) == (1, 0, 0)
    llama, warnings = hf_config.load("llama-3.1-70b")
    assert (llama.moe_every, llama.kv_heads, llama.d_ff, llama.rope_theta) == (0, 8, 28672, 5e5)
    assert warnings == (
        "rope_scaling: llama3 RoPE scaling is not modelled (plain RoPE at rope_theta): "
        "numerics only, at long contexts",
    )


def test_sliding_windows_and_moe_layer_patterns():
    mistral = {k: v for k, v in raw("llama-3.1-70b-tiny").items() if k != "rope_scaling"}
    mistral |= {"model_type": "mistral", "sliding_window": 16}
    cfg, warnings = hf_config.read(mistral)
    assert (cfg.sliding_window, cfg.sliding_every, cfg.moe_every, warnings) == (16, 1, 0, ())
    assert hf_config.read(mistral | {"sliding_window": None})[0].sliding_window == 0
    qwen = raw("qwen3-30b-a3b-tiny") | {"sliding_window": 16}  # use_sliding_window is false
    assert hf_config.read(qwen)[0].sliding_window == 0
    cfg, _ = hf_config.read(qwen | {"num_hidden_layers": 4, "mlp_only_layers": [0, 2]})
    assert (cfg.first_dense, cfg.moe_every) == (0, 2)
    qwen2 = qwen | {"model_type": "qwen2_moe", "shared_expert_intermediate_size": 96}
    cfg, warnings = hf_config.read(qwen2)
    assert (cfg.n_shared_experts, cfg.shared_hidden) == (1, 96)
    assert any("shared_expert_gate" in w for w in warnings)
    assert any(w.startswith("qkv_bias=true") for w in warnings)


def one_line_error(source, *parts: str) -> str:
    with pytest.raises(ConfigError) as err:
        hf_config.read(source)
    message = str(err.value)
    assert "\n" not in message and "; " in message, message  # the problem; the fix
    for part in parts:
        assert part in message, message
    return message


def without(name: str, key: str) -> dict:
    return {k: v for k, v in raw(name).items() if k != key}


@pytest.mark.parametrize(
    ("source", "parts"),
    [
        (
            raw("mixtral-8x7b-tiny") | {"model_type": "gpt2"},
            ['field model_type="gpt2": is not a model jaxmoe reads', "deepseek_v3, gpt_oss"],
        ),
        (without("mixtral-8x7b-tiny", "model_type"), ["field model_type: is missing"]),
        (without("mixtral-8x7b-tiny", "hidden_size"), ["field hidden_size: is missing", "add it"]),
        (without("deepseek-v3-tiny", "kv_lora_rank"), ["field kv_lora_rank: is missing"]),
        (
            raw("mixtral-8x7b-tiny") | {"num_key_value_heads": 5},
            ["field num_key_value_heads=5: must divide num_attention_heads=16"],
        ),
        (
            raw("mixtral-8x7b-tiny") | {"num_experts_per_tok": 9},
            ["field num_experts_per_tok=9: must be in 1..num_local_experts=8"],
        ),
        (raw("mixtral-8x7b-tiny") | {"hidden_size": "128"}, ['hidden_size="128": must be a whole']),
        (
            raw("deepseek-v3-tiny") | {"num_key_value_heads": 4},
            ["field num_key_value_heads=4: latent attention has one key per query head"],
        ),
        (raw("deepseek-v3-tiny") | {"n_group": 3}, ["field n_group=3: must divide n_routed_exp"]),
        (
            raw("gpt-oss-120b-tiny") | {"layer_types": ["full_attention", "sliding_attention"] * 2},
            ["field layer_types=", "sliding_every"],
        ),
        (
            raw("qwen3-30b-a3b-tiny") | {"mlp_only_layers": [1]},
            ["field mlp_only_layers=[1]: it makes layers 0 of 0..1 MoE"],
        ),
        (
            raw("qwen3-30b-a3b-tiny") | {"use_sliding_window": True},
            ["field use_sliding_window=true", "layer_types"],
        ),
    ],
)
def test_bad_fields_are_one_line_naming_the_field_and_the_fix(source, parts):
    one_line_error(source, *parts)


def test_bad_files_are_one_line_naming_the_file_and_the_fix(tmp_path):
    missing = tmp_path / "nowhere" / "config.json"
    one_line_error(missing, f"{missing}: no such file", "give the path", "mixtral-8x7b")
    broken = tmp_path / "broken.json"
    broken.write_text('{"model_type": "llama",, }')
    one_line_error(broken, f"{broken}: not valid JSON", "line 1 column 24", "fix the file")
    listed = tmp_path / "listed.json"
    listed.write_text("[]")
    one_line_error(listed, f"{listed}: holds a JSON list")
    field = tmp_path / "model" / "config.json"
    field.parent.mkdir()
    field.write_text(json.dumps(raw("mixtral-8x7b-tiny") | {"num_key_value_heads": 5}))
    one_line_error(field.parent, f"{field} field num_key_value_heads=5")


def test_numerics_only_fields_are_warnings_not_errors(tmp_path):
    source = raw("mixtral-8x7b-tiny") | {
        "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        "attention_dropout": 0.1,
        "mlp_bias": True,
        "some_new_field": 1,
    }
    cfg, warnings = hf_config.read(source, name="mine")
    assert cfg.name == "mine" and cfg.d_model == 128
    assert [w.split(":")[0] for w in warnings] == [
        "rope_scaling",
        "attention_dropout=0.1",
        "mlp_bias=true",
        "some_new_field",
    ]
    path = tmp_path / "my-model" / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(source))
    assert hf_config.read(path)[0].name == "my-model"


def test_the_catalogue_resolves_shipped_names_and_paths(tmp_path, caplog):
    assert catalogue.config("mixtral-8x7b-tiny") == hf_config.load("mixtral-8x7b-tiny")[0]
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(raw("llama-3.1-70b-tiny")))
    with caplog.at_level(logging.WARNING, logger="jaxmoe"):
        cfg = catalogue.config(str(path))
    assert cfg.name == "custom" and cfg.d_model == 128
    assert caplog.messages == [
        "custom: rope_scaling: llama3 RoPE scaling is not modelled (plain RoPE at rope_theta): "
        "numerics only, at long contexts"
    ]
    with pytest.raises(ConfigError, match=r"unknown config 'nope'; choose one of bench_moe.*"):
        catalogue.config("nope")
    with pytest.raises(ConfigError, match="mixtral-8x7b-tiny"):
        catalogue.config("nope")

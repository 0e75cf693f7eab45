"""How a Hugging Face config.json's fields become ModelConfig's, per model_type: `Fields`
(typed access to the file, a record of what was read, one-line errors naming its fields) and
`map_fields` (ModelConfig's fields, the config.json field each came from, and a warning for each
field left out that only changes the numerics). `jaxmoe.hf_config` reads the files."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from jaxmoe.config import DTYPES, ConfigError

SLIDING, FULL = "sliding_attention", "full_attention"


# Each model_type's expert-count field, and its Hugging Face class defaults for the fields that
# change only numerics (a file that leaves one out gets what transformers would give it).
_EXPERTS = {
    "mixtral": ("num_local_experts", "num_experts"),
    "gpt_oss": ("num_local_experts", "num_experts"),
    "qwen3_moe": ("num_experts", "num_local_experts"),
    "qwen2_moe": ("num_experts", "num_local_experts"),
    "deepseek_v3": ("n_routed_experts", "num_local_experts"),
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0},
    "mistral": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "sliding_window": 4096},
    "mixtral": {"rms_norm_eps": 1e-5, "rope_theta": 1e6, "router_aux_loss_coef": 0.001},
    "qwen3_moe": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "router_aux_loss_coef": 0.001},
    "qwen2_moe": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "router_aux_loss_coef": 0.001},
    "deepseek_v3": {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "aux_loss_alpha": 0.001},
    "gpt_oss": {
        "rms_norm_eps": 1e-5,
        "rope_theta": 150000.0,
        "router_aux_loss_coef": 0.001,
        "sliding_window": 128,
    },
}
_REQUIRED = object()


class Fields:
    """The config.json being read: typed access to its fields, a record of the fields read, and
    the one-line errors that name them."""

    def __init__(self, raw: Mapping, label: str) -> None:
        self.raw, self.label = raw, label
        self.read: set[str] = set()
        self.model_type = ""

    def fail(self, key: str, problem: str, fix: str) -> NoReturn:
        shown = f"={json.dumps(self.raw[key])}" if key in self.raw else ""
        raise ConfigError(f"{self.label} field {key}{shown}: {problem}; {fix}")

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """The value of `key` (null counts as absent): its default, or an error if it has none."""
        self.read.add(key)
        value = self.raw.get(key)
        if value is not None:
            return value
        if default is _REQUIRED:
            problem = "is null" if key in self.raw else "is missing"
            self.fail(key, problem, f"a {self.model_type} config.json needs it: add it")
        return default

    def default(self, key: str, otherwise: Any = _REQUIRED) -> Any:
        """The model_type's Hugging Face default for `key`."""
        return _DEFAULTS[self.model_type].get(key, otherwise)

    def int(self, key: str, default: Any = _REQUIRED, minimum: int | None = None) -> int:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(key, "must be a whole number", "write it as one, e.g. 8")
        if minimum is not None and value < minimum:
            self.fail(key, f"must be at least {minimum}", f"set it to {minimum} or more")
        return value

    def float(self, key: str, default: Any = _REQUIRED) -> float:
        value = self.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(key, "must be a number", "write it as one, e.g. 1e-06")
        return float(value)

    def bool(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, "must be true or false", "write it as a JSON boolean")
        return value

    def text(self, key: str, default: Any = _REQUIRED) -> str:
        value = self.get(key, default)
        if not isinstance(value, str):
            self.fail(key, "must be a string", 'write it in quotes, e.g. "silu"')
        return value

    def list(self, key: str, default: Any = _REQUIRED) -> list:
        value = self.get(key, default)
        if not isinstance(value, list):
            self.fail(key, "must be a list", "write it as a JSON list, e.g. []")
        return value


# ---- the mapping ---------------------------------------------------------------------------


def map_fields(f: Fields, warnings: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """ModelConfig's fields from the config.json, and the config.json field each came from."""
    fields: dict[str, Any] = {
        "vocab_size": f.int("vocab_size"),
        "d_model": f.int("hidden_size", minimum=1),
        "n_layers": f.int("num_hidden_layers", minimum=1),
        "d_ff": f.int("intermediate_size"),
        "mlp_form": "swiglu",
        "expert_form": "swiglu",
        "tie_embeddings": f.bool("tie_word_embeddings", False),
        "norm_eps": f.float("rms_norm_eps", f.default("rms_norm_eps")),
        "init_std": f.float("initializer_range", 0.02),
    }
    origin = {
        "vocab_size": "vocab_size",
        "d_model": "hidden_size",
        "n_layers": "num_hidden_layers",
        "d_ff": "intermediate_size",
        "norm_eps": "rms_norm_eps",
        "init_std": "initializer_range",
    }
    for part in (_attention, _positions, _sliding, _experts, _numerics):
        more, names = part(f, warnings)
        fields |= more
        origin |= names
    return fields, origin


def _attention(f: Fields, warnings: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    heads = f.int("num_attention_heads", minimum=1)
    origin = {"n_heads": "num_attention_heads"}
    if f.model_type == "deepseek_v3":
        f.read.add("head_dim")  # transformers writes qk_rope_head_dim here
        if "q_lora_rank" not in f.raw:
            f.get("q_lora_rank")  # null means full-rank queries; absent is an error
        kv_heads = f.int("num_key_value_heads", heads)
        if kv_heads != heads:
            f.fail(
                "num_key_value_heads",
                f"latent attention has one key per query head (num_attention_heads={heads})",
                f"set it to {heads}",
            )
        fields = {
            "n_heads": heads,
            "kv_lora_rank": f.int("kv_lora_rank", minimum=1),
            "q_lora_rank": f.int("q_lora_rank", 0),
            "head_dim": f.int("qk_nope_head_dim"),
            "rope_head_dim": f.int("qk_rope_head_dim"),
            "v_head_dim": f.int("v_head_dim"),
        }
        origin |= {
            "kv_lora_rank": "kv_lora_rank",
            "q_lora_rank": "q_lora_rank",
            "head_dim": "qk_nope_head_dim",
            "rope_head_dim": "qk_rope_head_dim",
            "v_head_dim": "v_head_dim",
        }
        return fields, origin
    # null is multi-head attention, and so is an absent field for llama; the other classes
    # default to a grouped count, which a file must state
    absent = heads if f.model_type == "llama" or "num_key_value_heads" in f.raw else _REQUIRED
    kv_heads = f.int("num_key_value_heads", absent)
    head_dim = f.int("head_dim", 0)
    if head_dim:
        origin["head_dim"] = "head_dim"
    else:
        d_model = f.raw["hidden_size"]
        if d_model % heads:
            f.fail(
                "num_attention_heads",
                f"does not divide hidden_size={d_model} and there is no head_dim",
                "add head_dim, or choose a divisor of hidden_size",
            )
        head_dim = d_model // heads
        origin["head_dim"] = "hidden_size/num_attention_heads"
    origin["n_kv_heads"] = "num_key_value_heads"
    return {"n_heads": heads, "n_kv_heads": kv_heads, "head_dim": head_dim}, origin


def _positions(f: Fields, warnings: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Rotary positions at rope_theta (or transformers 5's rope_parameters["rope_theta"]); any
    RoPE scaling is a warning."""
    params = f.get("rope_parameters", None)
    if params is not None and not isinstance(params, dict):
        f.fail("rope_parameters", "must be an object", 'write it as {"rope_theta": 10000.0}')
    if params and all(isinstance(v, dict) for v in params.values()):  # one per layer type
        if len({json.dumps(v, sort_keys=True) for v in params.values()}) > 1:
            warnings.append(
                "rope_parameters: differ by layer type; jaxmoe uses the full-attention layers' "
                "for every layer: numerics only"
            )
        params = params.get(FULL) or next(iter(params.values()))
    params = params or {}
    theta = f.float("rope_theta", params.get("rope_theta", f.default("rope_theta")))
    for key, scaling in (
        ("rope_scaling", f.get("rope_scaling", None)),
        ("rope_parameters", params),
    ):
        kind = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else None
        if kind not in (None, "default"):
            warnings.append(
                f"{key}: {kind} RoPE scaling is not modelled (plain RoPE at rope_theta): "
                "numerics only, at long contexts"
            )
    origin = {"rope_theta": "rope_theta"} if "rope_theta" in f.raw else {}
    return {"positions": "rope", "max_positions": 0, "rope_theta": theta}, origin


def _sliding(f: Fields, warnings: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Which layers attend to a window: mistral and mixtral every layer, gpt-oss alternate
    layers from the first (its layer_types), qwen none unless use_sliding_window."""
    kind, n = f.model_type, f.raw["num_hidden_layers"]
    if kind in ("llama", "deepseek_v3"):
        return {}, {}
    if kind in ("qwen3_moe", "qwen2_moe"):
        f.read |= {"sliding_window", "max_window_layers", "layer_types"}
        if not f.bool("use_sliding_window", False):
            return {}, {}
        if "layer_types" not in f.raw:
            f.fail(
                "use_sliding_window",
                "which layers slide depends on the transformers version (max_window_layers)",
                "list each layer's attention in layer_types",
            )
    # null is no window; a file without the field gets its class's default
    window = f.int(
        "sliding_window", 0 if "sliding_window" in f.raw else f.default("sliding_window", 0)
    )
    default_types = [SLIDING if kind != "gpt_oss" or i % 2 == 0 else FULL for i in range(n)]
    types = f.list("layer_types", default_types)
    if len(types) != n or any(t not in (SLIDING, FULL) for t in types):
        f.fail(
            "layer_types",
            f"must list {n} entries (num_hidden_layers), each {SLIDING!r} or {FULL!r}",
            "fix the list",
        )
    slides = [t == SLIDING for t in types]
    if not window or not any(slides):
        return {}, {}
    every = next(
        (k for k in range(1, n + 1) if all(s == (i % k == 0) for i, s in enumerate(slides))), 0
    )
    if not every:
        f.fail(
            "layer_types",
            "its sliding layers are not every k-th layer from the first, the one pattern jaxmoe "
            "has (sliding_every)",
            "use such a pattern, e.g. alternating from a sliding first layer",
        )
    origin = {"sliding_window": "sliding_window"}
    return {"sliding_window": window, "sliding_every": every}, origin


def _experts(f: Fields, warnings: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    kind, n = f.model_type, f.raw["num_hidden_layers"]
    if kind not in _EXPERTS:
        return {"moe_every": 0}, {}
    experts_key = next((k for k in _EXPERTS[kind] if k in f.raw), _EXPERTS[kind][0])
    fields: dict[str, Any] = {
        "n_experts": f.int(experts_key),
        "top_k": f.int("num_experts_per_tok"),
        "router_score": "softmax",
        "norm_top_k": True,  # mixtral and gpt-oss: softmax over the chosen experts' logits
    }
    origin = {"n_experts": experts_key, "top_k": "num_experts_per_tok"}
    if kind == "gpt_oss" and f.int("experts_per_token", fields["top_k"]) != fields["top_k"]:
        f.fail("experts_per_token", "differs from num_experts_per_tok", "make them equal")
    if kind in ("qwen3_moe", "qwen2_moe"):
        step = f.int("decoder_sparse_step", 1, minimum=1)
        dense = f.list("mlp_only_layers", [])
        blame = "mlp_only_layers" if dense else "decoder_sparse_step"
        moe = [i not in dense and (i + 1) % step == 0 for i in range(n)]
        fields["expert_d_ff"] = f.int("moe_intermediate_size")
        fields["norm_top_k"] = f.bool("norm_topk_prob", False)
        origin |= {"expert_d_ff": "moe_intermediate_size", "norm_top_k": "norm_topk_prob"}
        if kind == "qwen2_moe":
            shared = f.int("shared_expert_intermediate_size")
            if shared:
                fields |= {"n_shared_experts": 1, "shared_d_ff": shared}
                origin["shared_d_ff"] = "shared_expert_intermediate_size"
    elif kind == "deepseek_v3":
        first = f.int("first_k_dense_replace")
        freq = f.int("moe_layer_freq", 1, minimum=1)
        blame = "moe_layer_freq" if freq > 1 else "first_k_dense_replace"
        moe = [i >= first and i % freq == 0 for i in range(n)]
        groups = f.int("n_group", 8)
        fields |= {
            "expert_d_ff": f.int("moe_intermediate_size"),
            "n_shared_experts": f.int("n_shared_experts"),
            "router_score": _score(f, warnings),
            "norm_top_k": f.bool("norm_topk_prob", True),
            "routed_scale": f.float("routed_scaling_factor", 2.5),
            "router_groups": groups if groups > 1 else 0,
            "router_group_top": f.int("topk_group", 4) if groups > 1 else 0,
        }
        origin |= {
            "expert_d_ff": "moe_intermediate_size",
            "n_shared_experts": "n_shared_experts",
            "routed_scale": "routed_scaling_factor",
            "router_groups": "n_group",
            "router_group_top": "topk_group",
        }
    else:  # mixtral, gpt_oss: every layer's MLP is the experts, each as wide as intermediate_size
        blame, moe = experts_key, [True] * n
    first_dense, every = _moe_layers(f, moe, blame)
    return fields | {"first_dense": first_dense, "moe_every": every}, origin


def _score(f: Fields, warnings: list[str]) -> str:
    score = f.text("scoring_func", "sigmoid")
    if score in ("softmax", "sigmoid"):
        return score
    warnings.append(f"scoring_func={json.dumps(score)}: not modelled, jaxmoe scores by sigmoid")
    return "sigmoid"


def _moe_layers(f: Fields, moe: list[bool], blame: str) -> tuple[int, int]:
    """(first_dense, moe_every) for the layers `moe` marks: some dense layers, then every k-th
    layer MoE, ending with one (0, 0: none is)."""
    at = [i for i, is_moe in enumerate(moe) if is_moe]
    if not at:
        return 0, 0
    every = at[1] - at[0] if len(at) > 1 else 1
    first = at[0] - every + 1
    n = len(moe)
    pattern = [i >= first and (i - first + 1) % every == 0 for i in range(n)]
    if first >= 0 and not (n - first) % every and moe == pattern:
        return first, every
    shown = ", ".join(map(str, at[:6])) + (", ..." if len(at) > 6 else "")
    f.fail(
        blame,
        f"it makes layers {shown} of 0..{n - 1} MoE, not some dense layers then every k-th "
        "layer MoE ending with the last, the one pattern jaxmoe has (first_dense, moe_every)",
        "use such a pattern",
    )


def _numerics(f: Fields, warnings: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Training weights the config names, and a warning for each numerics-only field."""
    kind, fields, origin = f.model_type, {}, {}
    aux = "aux_loss_alpha" if kind == "deepseek_v3" else "router_aux_loss_coef"
    if kind in _EXPERTS:
        fields["router_aux_coef"] = f.float(aux, f.default(aux))
        origin["router_aux_coef"] = aux
    if kind == "deepseek_v3":
        f.read.add("seq_aux")  # its balance loss is per sequence; so is jaxmoe's by default
    stored = f.raw.get("torch_dtype", f.raw.get("dtype"))
    if stored in DTYPES:  # the published weights' dtype: the one they are served and trained in
        fields["dtype"] = fields["param_dtype"] = stored

    act = f.text("hidden_act", "silu")
    if act != "silu":
        warnings.append(f"hidden_act={json.dumps(act)}: jaxmoe's SwiGLU gates with silu")
    if f.float("attention_dropout", 0.0):
        warnings.append(f"attention_dropout={f.raw['attention_dropout']}: not modelled")
    if kind == "mixtral" and f.float("router_jitter_noise", 0.0):
        warnings.append(f"router_jitter_noise={f.raw['router_jitter_noise']}: not modelled")
    if f.int("pretraining_tp", 1) > 1:
        warnings.append(f"pretraining_tp={f.raw['pretraining_tp']}: not modelled")
    for key in ("attention_bias", "mlp_bias"):
        if f.bool(key, False):
            warnings.append(f"{key}=true: {_BIASES}")
    if kind in ("qwen2_moe", "qwen3_moe") and f.bool("qkv_bias", kind == "qwen2_moe"):
        warnings.append(f"qkv_bias=true: {_BIASES}")
    quant = f.get("quantization_config", None)
    if isinstance(quant, dict):
        method = quant.get("quant_method", "quantized")
        warnings.append(
            f"quantization_config: the published weights are stored as {method}; jaxmoe's "
            "dtype and param_dtype are its own: numerics only"
        )
    for warn in _WARNINGS.get(kind, ()):
        warn(f, warnings)
    return fields, origin


_BIASES = "biases are not modelled: numerics only; the parameter count omits them"


def _qwen3(f: Fields, warnings: list[str]) -> None:
    if f.bool("use_qk_norm", True):
        warnings.append(
            "model_type=qwen3_moe: the per-head RMSNorm of queries and keys (QK-norm) is not "
            "modelled: numerics only; the parameter count omits its 2 x head_dim weights per layer"
        )


def _qwen2(f: Fields, warnings: list[str]) -> None:
    if f.raw.get("shared_expert_intermediate_size"):
        warnings.append(
            "model_type=qwen2_moe: the shared expert's sigmoid gate (shared_expert_gate) is not "
            "modelled: numerics only; the parameter count omits its hidden_size weights per layer"
        )


def _deepseek(f: Fields, warnings: list[str]) -> None:
    method = f.text("topk_method", "noaux_tc")
    if method == "noaux_tc":
        warnings.append(
            'topk_method="noaux_tc": the per-expert bias that steers expert choice '
            "(e_score_correction_bias) is not modelled: numerics only; the parameter count "
            "omits its n_routed_experts values per layer"
        )
    else:
        warnings.append(
            f"topk_method={json.dumps(method)}: jaxmoe routes as DeepSeek-V3 (groups scored by "
            "their best two experts): numerics only"
        )
    mtp = f.int("num_nextn_predict_layers", 0)
    if mtp:
        warnings.append(
            f"num_nextn_predict_layers={mtp}: the multi-token-prediction layer is not modelled "
            "(a training objective and a draft for speculative decoding); the parameter count "
            "omits it"
        )


def _gpt_oss(f: Fields, warnings: list[str]) -> None:
    warnings.append(
        "model_type=gpt_oss: attention sinks (a learned logit per head) and the router's and "
        "experts' biases are not modelled: numerics only; the parameter count omits them"
    )
    limit = f.float("swiglu_limit", 7.0)
    alpha = f.float("swiglu_alpha", 1.702)
    warnings.append(
        f"swiglu_limit={limit:g}: the experts' clamped SwiGLU (gate * sigmoid({alpha:g} gate) * "
        "(up + 1), clamped) is not modelled, jaxmoe's is silu(gate) * up: numerics only"
    )


_WARNINGS: dict[str, tuple[Callable[[Fields, list[str]], None], ...]] = {
    "qwen3_moe": (_qwen3,),
    "qwen2_moe": (_qwen2,),
    "deepseek_v3": (_deepseek,),
    "gpt_oss": (_gpt_oss,),
}

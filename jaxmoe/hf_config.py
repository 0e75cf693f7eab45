"""Hugging Face `config.json` files as `ModelConfig`s, and the real models jaxmoe ships by name.

`read(source)` maps the config.json of a supported `model_type` (`SUPPORTED`) to a ModelConfig
and returns it with its warnings. A warning is one line naming a field the model leaves out that
changes only the numerics (biases, RoPE scaling, attention sinks, QK-norm, ...). A ConfigError is
one line naming the config.json field and the fix, when a field changes shapes in a way
ModelConfig cannot say, is missing or of the wrong type, or holds a value that does not fit; also
for an unsupported model_type and for a file that cannot be read or is not JSON. Keys starting
with `_` are comments. Only the `json` module reads; nothing is downloaded.

The workload fields (batch, seq_len, micro_batches, loss_chunk_tokens), capacity factor and
z-loss keep ModelConfig's defaults: replace them after reading; `torch_dtype` sets the compute
and parameter dtypes. A field a file leaves out takes the default of its Hugging Face class
where that changes only numerics (rms_norm_eps, rope_theta, routed_scaling_factor, ...); a field
that sets a shape must be there.

The mapping itself, per model_type, is `jaxmoe.hf_mapping`. `shipped()` names the models in
`assets/models/` (each `<name>.json` as published, and a `<name>-tiny.json` of the same
structure that runs on a CPU); `load(name)` reads one of them, or a config.json by path.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from pathlib import Path

from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.hf_mapping import Fields, map_fields

MODELS = Path(__file__).resolve().parent / "assets" / "models"
SUPPORTED = ("deepseek_v3", "gpt_oss", "llama", "mistral", "mixtral", "qwen2_moe", "qwen3_moe")

# Fields every config.json may carry that say nothing about the architecture: read silently.
_METADATA = frozenset(
    {
        *("architectures", "auto_map", "bos_token_id", "eos_token_id", "pad_token_id"),
        *("sep_token_id", "decoder_start_token_id", "torch_dtype", "dtype", "use_cache"),
        *("transformers_version", "output_router_logits", "return_dict", "output_attentions"),
        *("output_hidden_states", "torchscript", "pruned_heads", "chunk_size_feed_forward"),
        *("is_encoder_decoder", "is_decoder", "cross_attention_hidden_size", "prefix"),
        *("add_cross_attention", "tie_encoder_decoder", "finetuning_task", "id2label"),
        *("label2id", "task_specific_params", "problem_type", "tokenizer_class", "max_length"),
        *("min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups"),
        *("diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "length_penalty"),
        *("repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size"),
        *("bad_words_ids", "num_return_sequences", "output_scores", "return_dict_in_generate"),
        *("forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values"),
        *("exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens"),
        *("use_bfloat16", "tf_legacy_loss", "gradient_checkpointing", "name_or_path"),
        # rotary positions have no table, so the longest context is no shape
        *("max_position_embeddings", "initial_context_length"),
        # how the reference code splits or lays out its weights, not what they compute
        *("ep_size", "rope_interleave"),
    }
)


# ---- reading a source ----------------------------------------------------------------------


def shipped() -> list[str]:
    """The names of the models jaxmoe ships (`assets/models/<name>.json`)."""
    return list(_shipped())


@functools.cache
def _shipped() -> tuple[str, ...]:
    return tuple(sorted(p.stem for p in MODELS.glob("*.json")))


def load(name: str) -> tuple[ModelConfig, tuple[str, ...]]:
    """A shipped model by name (`mixtral-8x7b`, `mixtral-8x7b-tiny`, ...), or a config.json (or
    the directory holding one) by path: the config and its warnings."""
    if name in _shipped():
        return read(MODELS / f"{name}.json", name=name)
    return read(name)


def read(
    source: str | Path | Mapping, name: str | None = None
) -> tuple[ModelConfig, tuple[str, ...]]:
    """The ModelConfig a Hugging Face config.json describes, and one warning line for each field
    the model leaves out that changes only the numerics. `source`: a path to the file (or to the
    directory holding config.json), or the parsed JSON object. `name` defaults to the file's name
    (its directory's, for a file called config.json), or the model_type."""
    raw, label, stem = _parse(source)
    f = Fields(raw, label)
    f.model_type = raw.get("model_type")
    if f.model_type not in SUPPORTED:
        problem = "is not a model jaxmoe reads" if "model_type" in raw else "is missing"
        f.fail("model_type", problem, f"use one of {', '.join(SUPPORTED)}")
    f.read.add("model_type")
    warnings: list[str] = []
    fields, origin = map_fields(f, warnings)
    for key in raw:
        if key not in f.read and key not in _METADATA and not key.startswith("_"):
            warnings.append(f"{key}: not a {f.model_type} field jaxmoe knows; ignored")
    try:
        cfg = ModelConfig(name=name or stem or f.model_type, **fields)
    except ConfigError as err:
        raise _in_hf_terms(f, err, origin) from None
    return cfg, tuple(warnings)


def _parse(source: str | Path | Mapping) -> tuple[Mapping, str, str]:
    """The JSON object, the label errors name it by, and the name its path suggests."""
    if isinstance(source, Mapping):
        return source, "config.json", ""
    path = Path(source)
    if path.is_dir():
        path = path / "config.json"
    fix = "give the path of a Hugging Face config.json"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        shipped_names = ", ".join(_shipped())
        raise ConfigError(
            f"{path}: no such file; {fix}, or name a shipped model: {shipped_names}"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        why = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise ConfigError(f"{path}: cannot be read ({why}); {fix}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        where = f"line {err.lineno} column {err.colno}"
        raise ConfigError(
            f"{path}: not valid JSON ({err.msg} at {where}); fix the file or fetch the model's "
            "config.json again"
        ) from None
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: holds a JSON {type(raw).__name__}, not the object a config.json holds; {fix}"
        )
    return raw, str(path), path.parent.name if path.stem == "config" else path.stem


def _in_hf_terms(f: Fields, err: ConfigError, origin: dict[str, str]) -> ConfigError:
    """ModelConfig's one-line error, with jaxmoe's field names replaced by the config.json's."""
    message = str(err)
    head, _, rest = message.partition(": ")
    field = head.partition("=")[0]
    if field not in origin:
        return ConfigError(f"{f.label}: {message}")
    names = re.compile(r"\b(" + "|".join(map(re.escape, origin)) + r")\b")
    rest = names.sub(lambda m: origin[m.group(1)], rest)
    key = origin[field]
    shown = json.dumps(f.raw[key]) if key in f.raw else head.partition("=")[2]
    return ConfigError(f"{f.label} field {key}={shown}: {rest}")

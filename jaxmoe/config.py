"""Model configuration: one frozen dataclass, validated on creation, and the named presets.

The configuration also carries the workload shape (batch, seq_len): the papers quote both with
the model, and every strategy's divisibility checks need them.
"""

import dataclasses
import math
from collections.abc import Iterable
from typing import Literal, NoReturn

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
EXPERT_FORMS = ("gelu", "swiglu")
VOCAB_MULTIPLE = 128
MAX_INT = 2**31 - 1  # array sizes and seeds are 32-bit in XLA, jax.random.key and numpy


class ConfigError(ValueError):
    """A bad configuration, flag or input: one line naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A pre-norm decoder-only transformer whose MLPs are dense or Mixture-of-Experts.

    `moe_every`: 0 = every layer dense; k >= 1 = every k-th layer is MoE (layers k-1, 2k-1, ...),
    the others dense. Experts have the form `expert_form`: "gelu" is the 2-matrix MLP the papers
    describe (D -> F, GELU, F -> D); "swiglu" the 3-matrix gated form.
    """

    name: str = "custom"
    vocab_size: int = 50257
    d_model: int = 128
    n_heads: int = 16
    head_dim: int = 8
    d_ff: int = 512
    n_layers: int = 2
    moe_every: int = 1
    n_experts: int = 16
    top_k: int = 2
    capacity_factor: float = 1.25
    expert_form: Literal["gelu", "swiglu"] = "gelu"
    moe_group_size: int = 0  # tokens per routing group; 0 = one group per sequence
    expert_dropout: float = 0.0  # applied to expert hidden activations when training only
    router_aux_coef: float = 0.01  # load-balancing loss weight
    router_z_coef: float = 0.001  # router z-loss weight
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # compute dtype
    param_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    init_std: float = 0.02
    norm_eps: float = 1e-6
    batch: int = 16
    seq_len: int = 64
    micro_batches: int = 4  # pipeline micro-batches; ma_separation's ping-pong micro-batches
    loss_chunk_tokens: int = 512  # tokens per chunk of the fused LM head in the training loss

    def __post_init__(self) -> None:
        validate(self)

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def padded_vocab(self) -> int:
        return math.ceil(self.vocab_size / VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    @property
    def is_moe(self) -> bool:
        return self.moe_every > 0

    @property
    def layers_per_block(self) -> int:
        """Layers in one scanned block: (moe_every - 1) dense layers then one MoE layer."""
        return max(self.moe_every, 1)

    @property
    def n_blocks(self) -> int:
        return self.n_layers // self.layers_per_block

    @property
    def n_moe_layers(self) -> int:
        return self.n_blocks if self.is_moe else 0

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    @property
    def group_size(self) -> int:
        return self.moe_group_size or self.seq_len

    @property
    def n_groups(self) -> int:
        return self.batch * self.seq_len // self.group_size

    @property
    def capacity(self) -> int:
        """Token slots per expert per routing group (GShard: k * tokens * factor / experts)."""
        return self.capacity_for(self.group_size)

    def group_for(self, seq: int) -> int:
        """Routing group size for `seq` tokens per sequence (groups never span sequences): the
        configured size for whole sequences, one token per group when decoding."""
        return math.gcd(self.group_size, seq)

    def capacity_for(self, group: int) -> int:
        return max(1, math.ceil(self.top_k * group * self.capacity_factor / self.n_experts))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.dtype])

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.param_dtype])

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def fail(field: str, value, problem: str, fix: str) -> NoReturn:
    """Raise the one-line ConfigError every bad field gets: `field=value: problem; fix`."""
    raise ConfigError(f"{field}={value!r}: {problem}; {fix}")


def check_finite(obj) -> None:
    """Every float field of the dataclass `obj` must be a finite number (`--set x=nan` or `inf`
    parses as a float), every integer one below 2**31 (array sizes and seeds are 32-bit in XLA):
    one line naming the field and its default."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            fail(f.name, value, "must be a finite number", f"set it to e.g. {f.default!r}")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INT:
            fail(
                f.name,
                value,
                "is too large (at most 2**31 - 1)",
                f"set it to e.g. {f.default!r}",
            )


def validate(cfg: ModelConfig) -> None:
    """Every range and divisibility check of a configuration, each naming the field and the fix."""
    check_finite(cfg)
    positive = (
        *("vocab_size", "d_model", "n_heads", "head_dim", "d_ff", "n_layers", "batch"),
        *("micro_batches", "loss_chunk_tokens"),
    )
    for field in positive:
        if getattr(cfg, field) < 1:
            fail(field, getattr(cfg, field), "must be a positive integer", "set it to 1 or more")
    if cfg.seq_len < 2:
        fail("seq_len", cfg.seq_len, "must be at least 2", "set seq_len=2 or more")
    if cfg.moe_every < 0:
        fail("moe_every", cfg.moe_every, "must be >= 0", "use 0 for dense, k for every k-th MoE")
    if cfg.is_moe and cfg.n_layers % cfg.moe_every:
        fail(
            "moe_every",
            cfg.moe_every,
            f"must divide n_layers={cfg.n_layers}",
            "choose a divisor of n_layers",
        )
    for field in ("dtype", "param_dtype"):
        if getattr(cfg, field) not in DTYPES:
            fail(field, getattr(cfg, field), "unknown dtype", f"choose one of {sorted(DTYPES)}")
    if cfg.expert_form not in EXPERT_FORMS:
        fail("expert_form", cfg.expert_form, "unknown expert form", f"choose one of {EXPERT_FORMS}")
    if cfg.init_std <= 0:
        fail("init_std", cfg.init_std, "must be > 0", "use e.g. 0.02")
    if cfg.norm_eps <= 0:
        fail("norm_eps", cfg.norm_eps, "must be > 0 (it keeps RMSNorm off 0/0)", "use e.g. 1e-6")
    for field in ("router_aux_coef", "router_z_coef"):
        if getattr(cfg, field) < 0:
            fail(field, getattr(cfg, field), "a loss weight must be >= 0", "use 0 to turn it off")
    if not cfg.is_moe:
        return
    if cfg.n_experts < 1:
        fail("n_experts", cfg.n_experts, "an MoE model needs experts", "set n_experts >= 1")
    if not 1 <= cfg.top_k <= cfg.n_experts:
        fail("top_k", cfg.top_k, f"must be in 1..n_experts={cfg.n_experts}", "lower top_k")
    if cfg.capacity_factor <= 0:
        fail("capacity_factor", cfg.capacity_factor, "must be > 0", "use e.g. 1.0 or 1.25")
    if cfg.moe_group_size < 0 or (cfg.moe_group_size and cfg.seq_len % cfg.moe_group_size):
        fail(
            "moe_group_size",
            cfg.moe_group_size,
            f"must divide seq_len={cfg.seq_len}",
            "use 0 (one group per sequence) or a divisor of seq_len",
        )
    if not 0.0 <= cfg.expert_dropout < 1.0:
        fail("expert_dropout", cfg.expert_dropout, "must be in [0, 1)", "use e.g. 0.1")


PRESETS: dict[str, ModelConfig] = {
    "tiny_moe": ModelConfig(name="tiny_moe"),
    "tiny_dense": ModelConfig(name="tiny_dense", moe_every=0),
    # the training benchmark's model (issue 5): 4 MoE layers, gated experts, GPT-2 vocabulary
    "bench_moe": ModelConfig(
        name="bench_moe",
        d_model=256,
        n_heads=8,
        head_dim=32,
        d_ff=1024,
        n_layers=4,
        capacity_factor=1.0,
        expert_form="swiglu",
        seq_len=256,
    ),
}
DEFAULT_PRESET = "tiny_moe"


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown config {name!r}; choose one of {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def _parse_value(obj, name: str, text: str):
    default = getattr(type(obj)(), name)
    kind = type(default)
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise ConfigError(
            f"--set {name}={text}: expected {kind.__name__}; e.g. --set {name}={default}"
        ) from None


def with_overrides(*configs, assignments: Iterable[str]):
    """Apply `key=value` strings (the CLI's --set) to the dataclass instances `configs` (each key
    goes to the first one with that field), checking names and types; returns them updated."""
    fields = [{f.name for f in dataclasses.fields(c)} for c in configs]
    changes: list[dict] = [{} for _ in configs]
    for item in assignments:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set n_layers=4")
        owner = next((i for i, names in enumerate(fields) if key in names), None)
        if owner is None:
            known = sorted(set().union(*fields))
            raise ConfigError(f"--set {key}: unknown field; choose one of {', '.join(known)}")
        changes[owner][key] = _parse_value(configs[owner], key, text.strip())
    updated = tuple(dataclasses.replace(c, **ch) for c, ch in zip(configs, changes, strict=True))
    return updated[0] if len(updated) == 1 else updated

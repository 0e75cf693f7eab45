"""Model configuration: an `Architecture` (every field that sets a parameter's shape or the model's
numerics: what a checkpoint records and checks) and a `Workload` (batch, sequence length,
micro-batches, loss chunking: what it is run on), each a frozen dataclass of its own.

A `ModelConfig` is an architecture under a workload, one flat set of fields as `--set` names them:
the papers quote both with the model, and every strategy's divisibility checks need both.
`cfg.architecture` and `cfg.workload` are the two apart; no parameter's shape depends on the
workload (`cfg.architecture` resolves the learned position table's rows, `max_positions`).
"""

import dataclasses
import math
from collections.abc import Iterable
from typing import Literal, NoReturn

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
EXPERT_FORMS = ("gelu", "swiglu")
POSITIONS = ("learned", "rope")
RECOMPUTE = ("none", "dots", "full")
ROUTER_SCORES = ("softmax", "sigmoid")
VOCAB_MULTIPLE = 128
MAX_INT = 2**31 - 1  # array sizes and seeds are 32-bit in XLA, jax.random.key and numpy


class ConfigError(ValueError):
    """A bad configuration, flag or input: one line naming the problem and the fix."""


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A pre-norm decoder-only transformer whose MLPs are dense or Mixture-of-Experts.

    `moe_every`: 0 = every layer dense; k >= 1 = every k-th layer is MoE (layers k-1, 2k-1, ...),
    the others dense; the first `first_dense` layers are dense whatever `moe_every` says. Dense
    MLPs have the form `mlp_form` and experts `expert_form`: "gelu" is the 2-matrix MLP the
    papers describe (D -> F, GELU, F -> D); "swiglu" the 3-matrix gated form.

    Attention has `n_heads` query heads and `n_kv_heads` key-value heads (grouped-query; 0 = as
    many as query heads). `kv_lora_rank > 0` makes it multi-head latent attention (DeepSeek-V2/V3):
    queries and keys of `head_dim + rope_head_dim` per head (the rotary part decoupled), values of
    `v_head_dim`, and a cache of the compressed key-value latent and the shared rotary key.
    `positions` is "learned" (a table of `max_positions` rows, added to the embeddings) or "rope"
    (rotary, base `rope_theta`).
    """

    name: str = "custom"
    vocab_size: int = 50257
    d_model: int = 128
    n_heads: int = 16
    head_dim: int = 8
    d_ff: int = 512
    n_layers: int = 2
    n_kv_heads: int = 0  # 0 = n_heads
    positions: Literal["learned", "rope"] = "learned"
    max_positions: int = 0  # rows of the learned position table; 0 = the workload's seq_len
    rope_theta: float = 10000.0
    sliding_window: int = 0  # > 0: sliding layers attend to the last this many positions
    sliding_every: int = 1  # of every this many layers the first slides (gpt-oss: 2)
    kv_lora_rank: int = 0  # > 0: multi-head latent attention with this latent width
    q_lora_rank: int = 0  # MLA's compressed query width (0: queries projected at full rank)
    rope_head_dim: int = 0  # MLA's decoupled rotary dims per query and key head
    v_head_dim: int = 0  # MLA's value dims per head (0 = head_dim)
    mlp_form: Literal["gelu", "swiglu"] = "gelu"
    tie_embeddings: bool = False  # the LM head is the token table's transpose
    moe_every: int = 1
    first_dense: int = 0  # the first K layers are dense
    n_experts: int = 16
    top_k: int = 2
    expert_d_ff: int = 0  # an expert's hidden width (0 = d_ff)
    n_shared_experts: int = 0  # experts every token uses beside its routed ones
    shared_d_ff: int = 0  # the shared experts' hidden width together (0 = n_shared x expert's)
    router_score: Literal["softmax", "sigmoid"] = "softmax"
    norm_top_k: bool = True  # renormalise the top-k weights to sum to 1 (when k > 1)
    routed_scale: float = 1.0  # the routed experts' output is scaled by this
    router_groups: int = 0  # > 0: group-limited routing (DeepSeek-V3) over this many groups
    router_group_top: int = 0  # ... of which a token's experts come from the best this many
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

    def __post_init__(self) -> None:
        check_finite(self)
        validate_architecture(self)

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
        """Scanned blocks after the `first_dense` layers."""
        return (self.n_layers - self.first_dense) // self.layers_per_block

    @property
    def n_moe_layers(self) -> int:
        return self.n_blocks if self.is_moe else 0

    @property
    def n_dense_layers(self) -> int:
        return self.n_layers - self.n_moe_layers

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    @property
    def qk_head_dim(self) -> int:
        """Dims per query and key head: MLA's carry the decoupled rotary part too."""
        return self.head_dim + self.rope_head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim or self.head_dim

    @property
    def expert_hidden(self) -> int:
        return self.expert_d_ff or self.d_ff

    @property
    def shared_hidden(self) -> int:
        return self.shared_d_ff or self.n_shared_experts * self.expert_hidden

    def window(self, layer: int) -> int:
        """How many past positions layer `layer` attends to (0: all)."""
        return self.sliding_window if layer % self.sliding_every == 0 else 0

    def capacity_for(self, group: int) -> int:
        return max(1, math.ceil(self.top_k * group * self.capacity_factor / self.n_experts))

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.dtype])

    @property
    def weight_dtype(self) -> jnp.dtype:
        return jnp.dtype(DTYPES[self.param_dtype])

    def replace(self, **changes) -> "Architecture":
        return dataclasses.replace(self, **changes)


@dataclasses.dataclass(frozen=True)
class Workload:
    """What a model is run on: `batch` sequences of `seq_len` tokens, `micro_batches` (a
    pipeline's, ma_separation's ping-pong), `loss_chunk_tokens` (tokens per chunk of the fused
    LM head in the training loss), `decode_group_size` (tokens routed together in a decode
    step: see `ModelConfig.decode_group`), `moe_chunks` (a layer whose tokens go to the
    experts by all-to-all sends each expert's capacity slots in this many chunks, so one
    chunk's all-to-alls can run while the experts compute another; at most the capacity) and
    `recompute` (what a training step's backward pass computes again rather than holding from
    the forward pass, block by block: "none" holds every value; "dots" holds the matrix
    products' results and recomputes the rest, norms, activations, routing, gathers,
    for no more FLOPs or traffic; "full" holds only each block's input and runs the block's
    forward pass again, a third more FLOPs and its collectives sent again)."""

    batch: int = 16
    seq_len: int = 64
    micro_batches: int = 4
    loss_chunk_tokens: int = 512
    decode_group_size: int = 0  # 0 = a micro-batch's new tokens
    moe_chunks: int = 1  # an all-to-all MoE layer's slots in this many chunks, to overlap
    recompute: Literal["none", "dots", "full"] = "dots"  # in the backward pass: see above

    def __post_init__(self) -> None:
        check_finite(self)
        validate_workload(self)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len

    def replace(self, **changes) -> "Workload":
        return dataclasses.replace(self, **changes)


WORKLOAD_FIELDS = tuple(f.name for f in dataclasses.fields(Workload))


@dataclasses.dataclass(frozen=True)
class ModelConfig(Workload, Architecture):
    """An `Architecture` under a `Workload`: what every program is built from."""

    def __post_init__(self) -> None:
        check_finite(self)
        validate(self)

    @classmethod
    def of(cls, arch: Architecture, workload: Workload) -> "ModelConfig":
        return cls(**_fields(arch), **_fields(workload))

    @property
    def architecture(self) -> Architecture:
        """The architecture alone, the learned position table's rows resolved."""
        rows = self.position_rows if self.positions == "learned" else 0
        return Architecture(**_fields(self, Architecture) | {"max_positions": rows})

    @property
    def workload(self) -> Workload:
        return Workload(**_fields(self, Workload))

    @property
    def position_rows(self) -> int:
        return self.max_positions or self.seq_len

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
        configured size for whole sequences; a decode step (one token a sequence) routes the
        new tokens of `decode_group` sequences together."""
        return self.decode_group if seq == 1 else math.gcd(self.group_size, seq)

    @property
    def decode_group(self) -> int:
        """Tokens routed together in a decode step: a micro-batch's new tokens (the rows a
        pipeline stage has at once; the whole batch where micro_batches does not divide it), or
        at most `decode_group_size` of them (its greatest common divisor with that). Each
        expert takes at most capacity_for(decode_group) of a group's tokens, so a step's expert
        work is k x capacity_factor / E of a dense pass, not a slot per expert per token. The
        size depends on the config alone, so every layout routes (and drops) exactly as one
        device does."""
        divides = self.batch % self.micro_batches == 0
        rows = self.batch // self.micro_batches if divides else self.batch
        return math.gcd(self.decode_group_size, rows) if self.decode_group_size else rows

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _fields(obj, kind: type | None = None) -> dict:
    """The fields of dataclass `kind` (default: `obj`'s own class) as `obj` has them."""
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(kind or obj)}


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
    """Every range and divisibility check of an architecture under a workload, each naming the
    field and the fix: each apart, then where they meet (finiteness is `check_finite`'s)."""
    validate_architecture(cfg)
    validate_workload(cfg)
    if cfg.positions == "learned" and cfg.seq_len > cfg.position_rows:
        fail(
            "seq_len",
            cfg.seq_len,
            f"is longer than the learned position table (max_positions={cfg.max_positions})",
            "raise max_positions, or use positions=rope",
        )
    if cfg.is_moe and cfg.moe_group_size and cfg.seq_len % cfg.moe_group_size:
        fail(
            "moe_group_size",
            cfg.moe_group_size,
            f"must divide seq_len={cfg.seq_len}",
            "use 0 (one group per sequence) or a divisor of seq_len",
        )


def validate_workload(work: Workload) -> None:
    if work.decode_group_size < 0:
        fail("decode_group_size", work.decode_group_size, "must be >= 0", "use 0 (a micro-batch)")
    if work.recompute not in RECOMPUTE:
        fail("recompute", work.recompute, "unknown choice", f"choose one of {RECOMPUTE}")
    for f in dataclasses.fields(Workload):
        if f.name not in ("decode_group_size", "recompute") and getattr(work, f.name) < 1:
            fail(f.name, getattr(work, f.name), "must be a positive integer", "set it to 1 or more")
    if work.seq_len < 2:
        fail("seq_len", work.seq_len, "must be at least 2", "set seq_len=2 or more")


def validate_architecture(cfg: Architecture) -> None:
    positive = ("vocab_size", "d_model", "n_heads", "head_dim", "d_ff", "n_layers")
    for field in positive:
        if getattr(cfg, field) < 1:
            fail(field, getattr(cfg, field), "must be a positive integer", "set it to 1 or more")
    not_negative = (
        *("n_kv_heads", "max_positions", "kv_lora_rank", "q_lora_rank", "rope_head_dim"),
        *("v_head_dim", "first_dense", "expert_d_ff", "n_shared_experts", "shared_d_ff"),
        *("router_groups", "router_group_top"),
    )
    for field in not_negative:
        if getattr(cfg, field) < 0:
            fail(field, getattr(cfg, field), "must be >= 0", "use 0 for the default")
    _check_attention(cfg)
    if cfg.moe_every < 0:
        fail("moe_every", cfg.moe_every, "must be >= 0", "use 0 for dense, k for every k-th MoE")
    if cfg.first_dense >= cfg.n_layers:
        fail("first_dense", cfg.first_dense, f"must be below n_layers={cfg.n_layers}", "lower it")
    if cfg.is_moe and (cfg.n_layers - cfg.first_dense) % cfg.moe_every:
        fail(
            "moe_every",
            cfg.moe_every,
            f"must divide n_layers - first_dense = {cfg.n_layers - cfg.first_dense}",
            "choose a divisor of it",
        )
    for field in ("dtype", "param_dtype"):
        if getattr(cfg, field) not in DTYPES:
            fail(field, getattr(cfg, field), "unknown dtype", f"choose one of {sorted(DTYPES)}")
    for field, choices in (
        ("expert_form", EXPERT_FORMS),
        ("mlp_form", EXPERT_FORMS),
        ("router_score", ROUTER_SCORES),
    ):
        if getattr(cfg, field) not in choices:
            fail(field, getattr(cfg, field), "unknown choice", f"choose one of {choices}")
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
    if cfg.moe_group_size < 0:
        fail("moe_group_size", cfg.moe_group_size, "must be >= 0", "use 0 (a group a sequence)")
    if not 0.0 <= cfg.expert_dropout < 1.0:
        fail("expert_dropout", cfg.expert_dropout, "must be in [0, 1)", "use e.g. 0.1")
    if cfg.routed_scale <= 0:
        fail("routed_scale", cfg.routed_scale, "must be > 0", "use 1.0 for unscaled experts")
    if cfg.router_groups:
        if cfg.n_experts % cfg.router_groups:
            fail(
                "router_groups",
                cfg.router_groups,
                f"must divide n_experts={cfg.n_experts}",
                "choose a divisor of n_experts, or 0 for ungrouped routing",
            )
        per_group = cfg.n_experts // cfg.router_groups
        if not 1 <= cfg.router_group_top <= cfg.router_groups:
            fail(
                "router_group_top",
                cfg.router_group_top,
                f"must be in 1..router_groups={cfg.router_groups}",
                "choose how many groups a token's experts may come from",
            )
        if cfg.router_group_top * per_group < cfg.top_k:
            fail(
                "router_group_top",
                cfg.router_group_top,
                f"its groups hold {cfg.router_group_top * per_group} experts, fewer than "
                f"top_k={cfg.top_k}",
                "raise router_group_top",
            )


def _check_attention(cfg: Architecture) -> None:
    if cfg.n_heads % cfg.kv_heads:
        fail(
            "n_kv_heads",
            cfg.n_kv_heads,
            f"must divide n_heads={cfg.n_heads}",
            "choose a divisor of n_heads (0: as many as n_heads)",
        )
    if cfg.positions not in POSITIONS:
        fail("positions", cfg.positions, "unknown choice", f"choose one of {POSITIONS}")
    if cfg.sliding_window < 0 or cfg.sliding_every < 1:
        field = "sliding_window" if cfg.sliding_window < 0 else "sliding_every"
        fail(field, getattr(cfg, field), "out of range", "use sliding_window>=0, sliding_every>=1")
    if cfg.rope_theta <= 0:
        fail("rope_theta", cfg.rope_theta, "must be > 0", "use e.g. 10000.0")
    rotary = cfg.rope_head_dim if cfg.is_mla else cfg.head_dim
    if cfg.positions == "rope" and rotary % 2:
        field = "rope_head_dim" if cfg.is_mla else "head_dim"
        fail(field, rotary, "rotary positions rotate pairs of dims", "make it even")
    if cfg.is_mla and cfg.positions != "rope":
        fail("positions", cfg.positions, "latent attention's rotary part needs rope", "use rope")
    if cfg.is_mla and cfg.n_kv_heads not in (0, cfg.n_heads):
        fail("n_kv_heads", cfg.n_kv_heads, "latent attention has one key per head", "use 0")
    if not cfg.is_mla and (cfg.q_lora_rank or cfg.rope_head_dim or cfg.v_head_dim):
        field = next(f for f in ("q_lora_rank", "rope_head_dim", "v_head_dim") if getattr(cfg, f))
        fail(field, getattr(cfg, field), "is for latent attention only", "set kv_lora_rank too")


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

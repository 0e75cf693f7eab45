"""The papers' training recipe (strategies.md, strategy D): AdamW, clipping, warmup + cosine.

`TrainConfig` holds the optimizer, schedule and run fields that `--set` may change beside the
model's; `optimizer(tc)` builds the optax transformation. Weight decay applies to every matrix
and embedding, not to the RMSNorm scales.
"""

import dataclasses
from collections.abc import Collection

import jax
import optax

from jaxmoe.config import MAX_INT, ModelConfig, check_finite, fail
from jaxmoe.placement import path_name


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-4
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global gradient norm
    warmup_steps: int = 5000  # linear warmup from 0
    decay_steps: int = 50000  # cosine decay ends here (counted from step 0, warmup included)
    final_lr_fraction: float = 0.1  # the cosine ends at this fraction of learning_rate
    seed: int = 0  # parameters and dropout
    data_seed: int = 0  # shuffle order
    eval_batches: int = 8  # held-out batches per evaluation (the same ones every time)
    keep_checkpoints: int = 3
    rebalance_every: int = 100  # ma_separation: steps between the balancer's checks
    rebalance_threshold: float = 0.05  # ma_separation: rebalance when the sides differ more

    def __post_init__(self) -> None:
        check_finite(self)  # nan and inf parse as floats: refused here, field by field
        positive = "must be > 0"
        checks = {
            "learning_rate": (self.learning_rate > 0, positive, "use e.g. 1e-4"),
            "beta1": (0 <= self.beta1 < 1, "must be in [0, 1)", "use e.g. 0.9"),
            "beta2": (0 <= self.beta2 < 1, "must be in [0, 1)", "use e.g. 0.95"),
            "weight_decay": (self.weight_decay >= 0, "must be >= 0", "use 0 for none, e.g. 0.1"),
            "grad_clip": (self.grad_clip > 0, positive, "use e.g. 1.0 (a large value: no clip)"),
            "warmup_steps": (self.warmup_steps >= 0, "must be >= 0", "use 0 for no warmup"),
            "decay_steps": (
                self.decay_steps > self.warmup_steps,
                f"must be more than warmup_steps={self.warmup_steps}",
                "raise decay_steps or lower warmup_steps",
            ),
            "final_lr_fraction": (
                0 <= self.final_lr_fraction <= 1,
                "must be in [0, 1]",
                "use e.g. 0.1",
            ),
            "seed": (0 <= self.seed <= MAX_INT, f"must be in 0..{MAX_INT}", "use e.g. 0"),
            "data_seed": (0 <= self.data_seed <= MAX_INT, f"must be in 0..{MAX_INT}", "use 0"),
            "eval_batches": (self.eval_batches >= 1, "must be at least 1", "use e.g. 8"),
            "keep_checkpoints": (self.keep_checkpoints >= 1, "must be at least 1", "use e.g. 3"),
            "rebalance_every": (self.rebalance_every >= 1, "must be at least 1", "use e.g. 100"),
            "rebalance_threshold": (self.rebalance_threshold > 0, positive, "use e.g. 0.05"),
        }
        for name, (ok, problem, fix) in checks.items():
            if not ok:
                fail(name, getattr(self, name), problem, fix)

    def scaled_to(self, steps: int) -> "TrainConfig":
        """The recipe shrunk to a short run: warmup 10% of it, cosine to its end."""
        return dataclasses.replace(self, warmup_steps=steps // 10, decay_steps=max(steps, 1))


RECIPE_DROPOUT = 0.1  # expert dropout (strategies.md, strategy D)
# a tiny configuration's peak learning rate: the best of 1e-3, 3e-3 and 1e-2 over 600 steps of
# tiny_moe under ep16 on the shipped sample (README, "Training"); the papers' 1e-4 suits 50,000
# steps of a large model and barely moves a tiny one in a few hundred
TINY_LEARNING_RATE = 3e-3


def recipe(
    cfg: ModelConfig,
    steps: int,
    tc: TrainConfig | None = None,
    *,
    explicit: Collection[str] = (),
) -> tuple[ModelConfig, TrainConfig]:
    """The papers' recipe for `cfg` trained for `steps` steps: expert dropout 0.1 and, on a tiny
    configuration (`tiny` in its name), the schedule shrunk to the run (`scaled_to`) and the
    tiny presets' learning rate. Fields named in `explicit` (the user's own, e.g. the CLI's
    --set) are left as they are. Every entry point trains with this, so a notebook runs the
    recipe the command line runs."""
    tc = TrainConfig() if tc is None else tc
    if "expert_dropout" not in explicit:
        cfg = cfg.replace(expert_dropout=RECIPE_DROPOUT)
    if "tiny" in cfg.name:
        if not {"warmup_steps", "decay_steps"} & set(explicit):
            tc = tc.scaled_to(steps)
        if "learning_rate" not in explicit:
            tc = dataclasses.replace(tc, learning_rate=TINY_LEARNING_RATE)
    return cfg, tc


def described(cfg: ModelConfig, tc: TrainConfig, explicit: Collection[str] = ()) -> str:
    """One line: which recipe `recipe` gave (the papers' or the tiny presets'), and its
    schedule."""
    which = "the tiny presets'" if "tiny" in cfg.name else "the papers'"
    own = sorted(set(explicit) & {f.name for f in dataclasses.fields(TrainConfig)})
    return (
        f"{which} recipe: AdamW, learning rate {tc.learning_rate:g} after {tc.warmup_steps} "
        f"warm-up steps, cosine to {tc.final_lr_fraction:g}x at step {tc.decay_steps}, expert "
        f"dropout {cfg.expert_dropout:g}" + (f"; yours: {', '.join(own)}" if own else "")
    )


def schedule(tc: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=tc.learning_rate,
        warmup_steps=tc.warmup_steps,
        decay_steps=tc.decay_steps,
        end_value=tc.learning_rate * tc.final_lr_fraction,
    )


def _decays(params):
    """True for every parameter that takes weight decay (all but the norm scales)."""

    def decays(path, _):
        return "scale" not in path_name(path).split("/")

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(tc: TrainConfig) -> optax.GradientTransformation:
    """The recipe's AdamW with its schedule, without the clipping (which needs every gradient)."""
    return optax.adamw(
        schedule(tc), b1=tc.beta1, b2=tc.beta2, weight_decay=tc.weight_decay, mask=_decays
    )


def optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw(tc))

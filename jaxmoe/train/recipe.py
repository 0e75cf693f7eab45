"""The papers' training recipe (strategies.md, strategy D): AdamW, clipping, warmup + cosine.

`TrainConfig` holds the optimizer, schedule and run fields that `--set` may change beside the
model's; `optimizer(tc)` builds the optax transformation. Weight decay applies to every matrix
and embedding, not to the RMSNorm scales.
"""

import dataclasses

import jax
import optax

from jaxmoe.config import ConfigError
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
        checks = {
            "learning_rate": self.learning_rate > 0,
            "beta1": 0 <= self.beta1 < 1,
            "beta2": 0 <= self.beta2 < 1,
            "weight_decay": self.weight_decay >= 0,
            "grad_clip": self.grad_clip > 0,
            "warmup_steps": self.warmup_steps >= 0,
            "decay_steps": self.decay_steps > self.warmup_steps,
            "final_lr_fraction": 0 <= self.final_lr_fraction <= 1,
            "eval_batches": self.eval_batches >= 1,
            "keep_checkpoints": self.keep_checkpoints >= 1,
            "rebalance_every": self.rebalance_every >= 1,
            "rebalance_threshold": self.rebalance_threshold > 0,
        }
        for name, ok in checks.items():
            if not ok:
                value = getattr(self, name)
                raise ConfigError(
                    f"{name}={value!r} is out of range; see jaxmoe.train.recipe.TrainConfig "
                    f"(default {getattr(TrainConfig, name)!r})"
                )

    def scaled_to(self, steps: int) -> "TrainConfig":
        """The recipe shrunk to a short run: warmup 10% of it, cosine to its end."""
        return dataclasses.replace(self, warmup_steps=steps // 10, decay_steps=max(steps, 1))


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

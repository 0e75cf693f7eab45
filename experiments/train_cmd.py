"""`train`: the papers' recipe on C4 under one strategy, on this machine's CPU devices or as one
of several processes (`--coordinator`, `--num-processes`, `--process-id`; or the cluster's
environment where JAX detects it).

On a tiny configuration (`tiny*`, `paperNNN`) the schedule scales to `--steps` (warmup 10%,
cosine to the end) unless warmup_steps / decay_steps are set; expert dropout is the recipe's 0.1
unless set.
"""

import argparse

import jax

import meshes
from experiments.configs import config
from jaxmoe import runtime
from jaxmoe.config import with_overrides
from jaxmoe.train.loop import RunOptions, train
from jaxmoe.train.recipe import TrainConfig

RECIPE_DROPOUT = 0.1


def run(args: argparse.Namespace) -> None:
    opts = RunOptions(
        steps=args.steps,
        workdir=args.workdir,
        data=args.data,
        valid=args.valid,
        tokenizer=args.tokenizer,
        eval_every=args.eval_every,
        save_every=args.save_every,
        progress=not args.no_progress,
    )
    base = config(args.config)
    cfg, tc = with_overrides(base, TrainConfig(), assignments=args.set)
    named = {item.partition("=")[0].strip() for item in args.set}
    if "expert_dropout" not in named:
        cfg = cfg.replace(expert_dropout=RECIPE_DROPOUT)
    if "tiny" in base.name and not named & {"warmup_steps", "decay_steps"}:
        tc = tc.scaled_to(args.steps)
    strategy = meshes.get(args.strategy)
    _start_runtime(args)
    last = train(cfg, strategy, tc, opts)
    if jax.process_index() == 0:
        print(
            f"final: step {last['step']}, train loss {last['loss']:.4f}, "
            f"validation loss {last['val_loss']:.4f}, perplexity {last['val_ppl']:.1f} "
            f"({strategy.name}, {cfg.name}; metrics in {args.workdir / 'metrics.jsonl'})"
        )


def _start_runtime(args: argparse.Namespace) -> None:
    """CPU devices for this process, and JAX's multi-controller runtime when there are several."""
    runtime.start(
        args.devices, args.num_processes, args.process_id, args.coordinator, args.init_timeout
    )


__all__ = ["run"]

"""`train`: the papers' recipe on C4 under one strategy, on this machine's devices (16 virtual CPU
devices where there is no GPU) or as one of several processes (`--coordinator`,
`--num-processes`, `--process-id`; or the cluster's environment where JAX detects it).

The recipe is the library's (`jaxmoe.train.recipe.recipe`): on a tiny configuration (`tiny*`,
`paperNNN`) the schedule scales to `--steps` (warmup 10%, cosine to the end) unless warmup_steps /
decay_steps are set; expert dropout is the recipe's 0.1 unless set.
"""

import argparse

import jax

import jaxmoe
import meshes
from experiments.configs import config, enough_devices
from jaxmoe import runtime
from jaxmoe.config import with_overrides
from jaxmoe.platform import Platform
from jaxmoe.train.loop import RunOptions
from jaxmoe.train.recipe import TrainConfig


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
    cfg, tc = with_overrides(config(args.config), TrainConfig(), assignments=args.set)
    named = {item.partition("=")[0].strip() for item in args.set}
    strategy = meshes.get(args.strategy)
    chosen = _start_runtime(args)
    if args.devices is None:
        enough_devices(chosen, strategy.n_devices, f"strategy {strategy.name}")
    last = jaxmoe.train(cfg, strategy, opts, tc, explicit=named, devices=chosen.devices)
    if jax.process_index() == 0:
        print(
            f"final: step {last.step}, train loss {last.loss:.4f}, "
            f"validation loss {last.val_loss:.4f}, perplexity {last.metrics['val_ppl']:.1f} "
            f"({strategy.name}, {cfg.name}; metrics in {last.metrics_file})"
        )


def _start_runtime(args: argparse.Namespace) -> Platform:
    """This process's devices, and JAX's multi-controller runtime when there are several."""
    return runtime.start(
        args.devices,
        args.num_processes,
        args.process_id,
        args.coordinator,
        args.init_timeout,
        args.platform,
    )


__all__ = ["run"]

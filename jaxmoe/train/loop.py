"""The training run: data, trainer, checkpoints, metrics, evaluation, resume.

`train(...)` resumes from the work directory's last checkpoint when there is one (the same
command run again goes on where it stopped), writes one JSON object per step to
WORKDIR/metrics.jsonl (process 0 only) and returns the last step's metrics. Every input is
checked before the first compile: data files, tokenizer, config against strategy, the
checkpoint's config and strategy.
"""

import dataclasses
import json
import math
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxmoe import data
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.separation import Separation
from jaxmoe.separation.training import SeparatedTrainer
from jaxmoe.sharding import Strategy
from jaxmoe.train import checkpoints
from jaxmoe.train.batches import RowStreams, local_rows
from jaxmoe.train.recipe import TrainConfig
from jaxmoe.train.steps import make_trainer, summarize


class TrainingDiverged(RuntimeError):
    """The loss stopped being finite; the last good checkpoint is kept."""


@dataclasses.dataclass(frozen=True)
class RunOptions:
    steps: int
    workdir: Path
    data: Path | None = None  # None: the shipped C4 sample (and its held-out file)
    valid: Path | None = None  # None: the shipped held-out sample, or *validation* under data
    tokenizer: Path | None = None  # None: the shipped GPT-2 tokenizer
    eval_every: int = 100
    save_every: int = 100
    progress: bool = True


def split_files(opts: RunOptions) -> tuple[list[Path], list[Path]]:
    """(training files, validation files), each checked readable."""
    if opts.data is None:
        train = data.c4_files(data.DEFAULT_TRAIN)
        valid = data.c4_files(opts.valid or data.DEFAULT_VALID)
        return train, valid
    found = data.c4_files(opts.data)
    train = [f for f in found if "validation" not in f.name]
    if opts.valid is not None:
        return train, data.c4_files(opts.valid)
    valid = [f for f in found if "validation" in f.name]
    if not train or not valid:
        raise ConfigError(
            f"--data {opts.data} needs both training files and files named *validation* "
            f"(found {len(train)} and {len(valid)}); pass --valid PATH for the held-out split"
        )
    return train, valid


def _check_options(opts: RunOptions) -> None:
    for name in ("steps", "eval_every", "save_every"):
        if getattr(opts, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(opts, name)}: must be >= 1")


def train(
    cfg: ModelConfig,
    strategy: Strategy | Separation,
    tc: TrainConfig,
    opts: RunOptions,
    devices: list[jax.Device] | None = None,
) -> dict:
    _check_options(opts)
    if devices is None:  # a strategy on fewer devices than there are takes the first ones
        devices = jax.devices()
        devices = devices[: strategy.n_devices] if jax.process_count() == 1 else devices
    lead = jax.process_index() == 0
    train_files, valid_files = split_files(opts)
    tokenizer = data.load_tokenizer(opts.tokenizer)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise ConfigError(
            f"the tokenizer has {tokenizer.get_vocab_size()} ids but vocab_size={cfg.vocab_size}; "
            f"set vocab_size={tokenizer.get_vocab_size()}"
        )
    ckpt = checkpoints.Checkpoints(
        opts.workdir / "checkpoints",
        keep=tc.keep_checkpoints,
        save_every=opts.save_every,
        meta=checkpoints.meta(cfg, strategy.name, tc),
    )
    start = ckpt.latest()
    if start is not None:
        ckpt.check(start)  # a foreign checkpoint is refused before anything compiles

    if isinstance(strategy, Separation):
        trainer = SeparatedTrainer(cfg, strategy, devices, tc)
    else:
        trainer = make_trainer(cfg, strategy, devices, tc)
    rows = local_rows(cfg.batch)
    stream = dict(seq_len=cfg.seq_len, batch=cfg.batch, seed=tc.data_seed, rows=rows)
    batches = RowStreams(train_files, tokenizer, shuffle=True, repeat=True, **stream)
    held_out = RowStreams(valid_files, tokenizer, shuffle=False, repeat=False, **stream)
    valid = [_global(trainer, b) for b, _ in zip(held_out, range(tc.eval_batches), strict=False)]
    if not valid:
        raise ConfigError(f"validation files {valid_files} give no batch of {cfg.seq_len} tokens")

    if start is None:
        start = 0
        params, opt_state = trainer.init()
    else:
        (params, opt_state), data_state = ckpt.restore(start, trainer.abstract_state)
        batches.set_state(data_state["rows"])
    metrics_path = opts.workdir / "metrics.jsonl"
    if lead:
        _keep_lines_up_to(metrics_path, start)

    tokens_per_step = cfg.batch * cfg.seq_len
    bar = tqdm(
        range(start, opts.steps),
        initial=start,
        total=opts.steps,
        disable=not (lead and opts.progress),
        desc=f"train {strategy.name}",
    )
    last: dict = {}
    for step in bar:
        batch = _global(trainer, next(batches))
        t0 = time.perf_counter()
        params, opt_state, metrics = trainer.step(params, opt_state, batch, step)
        last = {"step": step + 1, **summarize(metrics)}  # blocks on the step
        last["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
        if not math.isfinite(last["loss"]):
            ckpt.close()
            raise TrainingDiverged(
                f"loss is {last['loss']} at step {step + 1}; the last good checkpoint "
                f"(step {ckpt.latest()}) is kept in {ckpt.directory}; lower learning_rate "
                f"(--set learning_rate=...) and run again"
            )
        if (step + 1) % opts.eval_every == 0 or step + 1 == opts.steps:
            val = float(np.mean([trainer.evaluate(params, b) for b in valid]))
            last |= {"val_loss": val, "val_ppl": math.exp(val)}
        if lead:
            with metrics_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}")
        if ckpt.manager.should_save(step + 1) or step + 1 == opts.steps:
            ckpt.save(step + 1, (params, opt_state), {"rows": batches.get_state()}, force=True)
    ckpt.close()
    return last


def _global(trainer, local: np.ndarray) -> jax.Array:
    cfg = trainer.cfg
    shape = (cfg.batch, cfg.seq_len + 1)
    return jax.make_array_from_process_local_data(trainer.batch_sharding, local, shape)


def _keep_lines_up_to(path: Path, step: int) -> None:
    """Drop metrics of steps after `step` (they are about to be run again)."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))

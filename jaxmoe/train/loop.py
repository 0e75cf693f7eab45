"""The training run: data, trainer, checkpoints, metrics, evaluation, resume.

`train(...)` resumes from the work directory's last checkpoint when there is one (the same
command run again goes on where it stopped), writes one JSON object per step to
WORKDIR/metrics.jsonl (process 0 only) and returns the last step's metrics. Every input is
checked before the first compile: data files, tokenizer, config against strategy, the
checkpoint's config and strategy.
"""

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from jaxmoe import data, watch
from jaxmoe.config import ConfigError, ModelConfig
from jaxmoe.layout import Layout
from jaxmoe.paths import writable_dir
from jaxmoe.train import checkpoints, fits
from jaxmoe.train.batches import RowStreams, local_rows
from jaxmoe.train.lock import WorkdirLock
from jaxmoe.train.recipe import TrainConfig
from jaxmoe.train.steps import FINITE, summarize
from jaxmoe.train.stop import GracefulStop

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """A step's loss, gradient norm or update was not finite: the step was not applied, nothing
    after it saved, and a checkpoint that would diverge again at once is set aside."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: during the steps, the step in hand is finished and saved (a second
    signal does not wait); what is kept is said."""


class TrainingFailed(RuntimeError):
    """A write failed during the run (a full disk, a lost permission); what is kept is said."""


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
    announce: str = ""  # a line process 0 prints as the steps begin (which recipe applies)

    def __post_init__(self) -> None:
        for name in ("steps", "eval_every", "save_every"):
            if getattr(self, name) < 1:
                flag = f"--{name.replace('_', '-')}"
                raise ConfigError(f"{flag} {getattr(self, name)}: must be >= 1")


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


def train(
    cfg: ModelConfig,
    strategy: Layout,
    tc: TrainConfig,
    opts: RunOptions,
    devices: Sequence[jax.Device] | None = None,
) -> dict:
    lead = jax.process_index() == 0
    writable_dir(opts.workdir, "--workdir")
    with WorkdirLock(opts.workdir) if lead else contextlib.nullcontext():
        return _train(cfg, strategy, tc, opts, devices, lead)


def _train(cfg, strategy, tc, opts, devices, lead: bool) -> dict:
    devices = jax.devices() if devices is None else devices
    if jax.process_count() == 1:  # a strategy on fewer devices than there are takes the first
        devices = devices[: strategy.n_devices]
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
        meta=checkpoints.meta(cfg, strategy.name, strategy.n_devices, tc),
    )
    ckpt.check()  # a foreign checkpoint is refused before anything compiles
    run = _Run(ckpt)
    watch.on_loss(run.lost)  # what a survivor says when another process of the run is lost
    try:
        last = run.go(cfg, strategy, tc, opts, devices, train_files, valid_files, tokenizer, lead)
        run.close()  # waits for the last save: a failed write shows here
        return last
    except KeyboardInterrupt:
        raise TrainingInterrupted(run.interrupted()) from None
    except OSError as err:
        raise TrainingFailed(run.failed(err)) from None
    except BaseException:
        run.close(quietly=True)
        raise


class _Run:
    """One run, and what to say when it stops early."""

    def __init__(self, ckpt: checkpoints.Checkpoints):
        self.ckpt = ckpt
        self.closed = False

    def go(self, cfg, strategy, tc, opts, devices, train_files, valid_files, tokenizer, lead):
        ckpt = self.ckpt
        trainer = strategy.lay_out(cfg, devices).trainer(tc)
        fits.check_memory(trainer.abstract_state)
        fits.check_disk(opts.workdir, trainer.abstract_saved)
        rows = local_rows(cfg.batch)
        stream = dict(seq_len=cfg.seq_len, batch=cfg.batch, seed=tc.data_seed, rows=rows)
        held_out = RowStreams(valid_files, tokenizer, shuffle=False, repeat=False, **stream)
        valid = [
            _global(trainer, b) for b, _ in zip(held_out, range(tc.eval_batches), strict=False)
        ]
        if not valid:
            raise ConfigError(
                f"validation files {valid_files} give no batch of {cfg.seq_len} tokens"
            )

        restored = ckpt.restore(trainer.abstract_saved)
        positions = None  # the row streams' saved positions, when they are of these rows
        if restored is None:
            start = 0
            params, opt_state = trainer.init()
        else:
            start = restored.step
            if start >= opts.steps:
                raise ConfigError(
                    f"--steps {opts.steps}: {ckpt.directory} is already at step {start}; "
                    f"raise --steps to train further, or use another --workdir"
                )
            params, opt_state = trainer.from_saved(restored.state)
            saved = restored.workload
            notes = restored.notes
            if (saved.batch, saved.seq_len) == (cfg.batch, cfg.seq_len):
                positions = restored.data["rows"]
            else:  # the saved positions are of other rows: read on in a new order
                stream["seed"] += start
                notes += (
                    f"the data streams start afresh in the order of seed {stream['seed']}: "
                    f"the checkpoint's positions are of {saved.batch} rows of "
                    f"{saved.seq_len} tokens",
                )
            for note in notes if lead else ():
                log.warning(note)
        batches = RowStreams(train_files, tokenizer, shuffle=True, repeat=True, **stream)
        if positions is not None:
            batches.set_state(positions)
        metrics_path = opts.workdir / "metrics.jsonl"
        if lead:
            _keep_lines_up_to(metrics_path, start)
            if opts.announce:
                print(opts.announce, flush=True)

        tokens_per_step = cfg.batch * cfg.seq_len
        bar = tqdm(
            range(start, opts.steps),
            initial=start,
            total=opts.steps,
            disable=not (lead and opts.progress),
            desc=f"train {strategy.name}",
        )
        last: dict = {}
        with GracefulStop() as stop:
            for step in bar:
                batch = _global(trainer, next(batches))
                t0 = time.perf_counter()
                params, opt_state, metrics = trainer.step(params, opt_state, batch, step)
                finite = bool(metrics[FINITE])  # blocks on the step
                last = {"step": step + 1, **summarize(metrics)}
                last["tokens_per_s"] = tokens_per_step / (time.perf_counter() - t0)
                if not finite:
                    raise TrainingDiverged(self.diverged(step + 1, last))
                if (step + 1) % opts.eval_every == 0 or step + 1 == opts.steps:
                    val = float(np.mean([trainer.evaluate(params, b) for b in valid]))
                    last |= {"val_loss": val, "val_ppl": math.exp(val)}
                if lead:
                    with metrics_path.open("a") as f:
                        f.write(json.dumps(last) + "\n")
                    bar.set_postfix(loss=f"{last['loss']:.3f}")
                done = step + 1 == opts.steps or stop.requested
                if ckpt.manager.should_save(step + 1) or done:
                    state = trainer.to_saved((params, opt_state))
                    rows_state = {"rows": batches.get_state()}
                    ckpt.save(step + 1, state, rows_state, force=True)
                if stop.requested:
                    raise TrainingInterrupted(self.stopped(step + 1))
        return last

    def close(self, quietly: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.ckpt.close()
        except Exception:
            if not quietly:
                raise

    def kept(self) -> str:
        latest = self.ckpt.latest()
        if latest is None:
            return f"no checkpoint is in {self.ckpt.directory}"
        return f"the last good checkpoint (step {latest}) is kept in {self.ckpt.directory}"

    def diverged(self, step: int, metrics: dict) -> str:
        """Wait for saves; a checkpoint of the state that gave a non-finite loss or gradient
        (it would diverge again at once) is set aside; say what is kept."""
        self.ckpt.manager.wait_until_finished()
        values = f"loss {metrics['loss']:.4g}, gradient norm {metrics['grad_norm']:.4g}"
        intrinsic = not (math.isfinite(metrics["loss"]) and math.isfinite(metrics["grad_norm"]))
        aside = ""
        if intrinsic and self.ckpt.latest() == step - 1:
            where = self.ckpt.set_aside(step - 1, "diverged")
            aside = f"; the checkpoint of step {step - 1} led to it and was {where}"
        message = (
            f"training diverged at step {step} ({values}{aside}); the step was not applied and "
            f"{self.kept()}; lower learning_rate (--set learning_rate=...) and run the same "
            f"command again"
        )
        self.close()
        return message

    def stopped(self, step: int) -> str:
        self.close()
        return (
            f"interrupted: stopped after step {step} and saved it; {self.kept()}; run the same "
            f"command to resume"
        )

    def lost(self) -> str:
        """What to do when another process of the run is lost (said by `jaxmoe.watch`)."""
        return (
            f"{self.kept()}; run the same command again to resume, or on fewer processes or "
            f"devices (--num-processes, --devices, --strategy a layout that fits them)"
        )

    def interrupted(self) -> str:
        self.close(quietly=True)
        return f"interrupted; {self.kept()}; run the same command to resume"

    def failed(self, err: OSError) -> str:
        self.close(quietly=True)  # the failed write is what stops the run: report that
        where = f" writing {err.filename}" if err.filename else ""
        return (
            f"{err.strerror or err}{where}; {self.kept()}; free space or fix the permissions "
            f"and run the same command to resume"
        )


def _global(trainer, local: np.ndarray) -> jax.Array:
    cfg = trainer.cfg
    shape = (cfg.batch, cfg.seq_len + 1)
    return jax.make_array_from_process_local_data(trainer.batch_sharding, local, shape)


def _keep_lines_up_to(path: Path, step: int) -> None:
    """Drop metrics of steps after `step` (they are about to be run again), and a line a killed
    run left cut short."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            log.warning(f"dropped an unreadable line of {path}: {line[:60]!r}")
    path.write_text("".join(line + "\n" for line in kept))

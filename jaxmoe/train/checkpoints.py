"""Checkpoints with orbax: parameters, optimizer state and step, the data position, the config.

Saved asynchronously every `save_every` steps (training goes on while the arrays are written),
the last `keep` kept. A checkpoint records the model's architecture, the workload (batch,
sequence length, micro-batches, loss chunking), the layout and device count that wrote it and a
digest of its state's form (every array's path, shape and dtype). It restores only into the
same architecture; under another layout or device count whose state has the same form, orbax
reads each array straight into the new layout's shardings (nothing gathers a whole model on one
host), and that, like another workload, is a note. Every layout saves the one-mesh form
(ma_separation converts its two meshes' state to it and back: `separation.saved`). Orbax writes
a step to a temporary directory and renames it when complete, so a run killed mid-save leaves
the previous checkpoint intact.

Restoring takes the newest step that reads back whole and finite. A step that does not (a data
file, manifest or metadata missing or cut short, an unreadable data position, non-finite values)
is moved aside to DIR.damaged/STEP, never deleted, and the step before it is tried; each step set
aside is one line of `Restored.notes`.
"""

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from jaxmoe.config import WORKLOAD_FIELDS, Architecture, ConfigError, ModelConfig, Workload
from jaxmoe.train.steps import all_finite

ITEMS = ("state", "data", "meta")
DAMAGED = "damaged"
QUIET_LOGGERS = ("absl", "orbax")  # they log each failed read at length; we say it in one line


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    state: Any
    data: dict
    notes: tuple[str, ...]  # one line per step set aside, then one for changed training fields
    workload: Workload  # the workload the checkpoint was written with


class Checkpoints:
    def __init__(self, directory: Path, *, keep: int, save_every: int, meta: dict):
        self.directory = Path(directory).absolute()
        self.meta = json.loads(json.dumps(meta))  # what the JSON round trip gives back
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=save_every,
            enable_async_checkpointing=True,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
        # orbax logs each failed read or write with its traceback (on the root logger's handler);
        # the run says it in one line instead, so they are quiet while the manager is open
        self._levels = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.CRITICAL)
        _drop_late_callbacks()

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def check(self) -> None:
        """Refuse, in one line, checkpoints written for another model: the newest step whose
        config reads back decides (an unreadable one is left to `restore`)."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                saved = self._read(step, meta=ocp.args.JsonRestore())["meta"]
            except Exception:  # damaged: `restore` sets it aside
                continue
            self._check_meta(saved)
            return

    def restore(self, abstract_state: Any) -> Restored | None:
        """The newest step that restores whole and finite into `abstract_state`'s shardings,
        falling back past damaged ones; None when there is no step at all. A step whose state
        has another form (another kind of layout wrote it) is refused in one line and kept."""
        notes = []
        self.meta["state"] = state_form(abstract_state)
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                written = self._read(step, meta=ocp.args.JsonRestore())["meta"]
                self._check_form(written)  # before the arrays are read
                arrays = self._read(
                    step,
                    state=ocp.args.StandardRestore(abstract_state),
                    data=ocp.args.JsonRestore(),
                )
                restored = {"state": arrays["state"], "data": arrays["data"], "meta": written}
                problem = _problem(restored)
            except ConfigError:
                raise
            except Exception as err:  # orbax and tensorstore raise many kinds for bad files
                problem = _reason(err)
            if problem is None:
                self._check_meta(restored["meta"])
                notes += self._changes(step, restored["meta"])
                saved = restored["meta"].get("workload") or restored["meta"]["model"]
                workload = Workload(**{k: v for k, v in saved.items() if k in WORKLOAD_FIELDS})
                return Restored(step, restored["state"], restored["data"], tuple(notes), workload)
            notes.append(
                f"checkpoint {step} is damaged ({problem}); {self.set_aside(step, DAMAGED)}"
            )
        if notes:
            raise ConfigError(
                f"no checkpoint in {self.directory} reads back ({len(notes)} damaged, moved to "
                f"{self._aside(DAMAGED)}); run again to start afresh, or use another --workdir"
            )
        return None

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Start saving `step` (the write goes on in the background); a failed write of the
        previous save is raised here as an OSError."""
        with _os_errors(self.directory):
            return self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=ocp.args.JsonSave(data_state),
                    meta=ocp.args.JsonSave(self.meta),
                ),
                force=force,
            )

    def close(self) -> None:
        """Wait for pending saves (a failed write is raised as an OSError) and release the
        manager."""
        try:
            with _os_errors(self.directory):
                self.manager.wait_until_finished()
        finally:
            self.manager.close()
            for name, level in self._levels.items():
                logging.getLogger(name).setLevel(level)

    # ---- pieces -------------------------------------------------------------------------------
    def _read(self, step: int, **items) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(**items))

    def _check_meta(self, saved: dict) -> None:
        model = _architecture(saved.get("model"))
        if model != self.meta["model"]:
            raise ConfigError(
                f"{self.directory} holds checkpoints of another model "
                f"({_difference(model, self.meta['model'])}); use another --workdir, or the same "
                f"model as the run that wrote them"
            )

    def _check_form(self, saved: dict) -> None:
        """Refuse a checkpoint whose state has another form than this run's (one written before
        forms were recorded is tried as it is)."""
        if isinstance(saved, dict) and saved.get("state", self.meta["state"]) != self.meta["state"]:
            raise ConfigError(
                f"{self.directory} holds checkpoints of {saved.get('strategy')}, whose state has "
                f"another form than {self.meta['strategy']}'s; resume under "
                f"{saved.get('strategy')}, or use another --workdir"
            )

    def _changes(self, step: int, saved: dict) -> list[str]:
        """One line each for another layout or device count than the checkpoint was written
        under, another workload, and changed training fields (optimizer, schedule, seeds)."""
        notes = []
        where = (saved.get("strategy"), saved.get("devices"))
        if where != (self.meta["strategy"], self.meta["devices"]) and where[1] is not None:
            notes.append(
                f"resuming step {step}, written under {where[0]} on {where[1]} devices, under "
                f"{self.meta['strategy']} on {self.meta['devices']}: each array is read into "
                f"the new layout's shardings"
            )
        if "workload" in saved and saved["workload"] != self.meta["workload"]:
            notes.append(
                f"resuming step {step} with another workload "
                f"({_difference(saved['workload'], self.meta['workload'], 99)})"
            )
        before, now = saved.get("train", {}), self.meta["train"]
        if before == now:
            return notes
        return [
            *notes,
            f"resuming step {step} with changed training fields ({_difference(before, now, 99)}); "
            f"the learning rate follows the new schedule from here",
        ]

    def set_aside(self, step: int, why: str) -> str:
        """Move step `step`'s directory to DIR.WHY/STEP, out of the manager's sight (never
        delete it); says where."""
        if jax.process_index() != 0:
            return "process 0 moves it aside"
        target, n = self._aside(why) / str(step), 1
        while target.exists():
            target, n = self._aside(why) / f"{step}.{n}", n + 1
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(self.directory / str(step), target)
        self.manager.reload()
        return f"moved to {target}"

    def _aside(self, why: str) -> Path:
        return self.directory.with_name(f"{self.directory.name}.{why}")


def _problem(restored: dict) -> str | None:
    """Why a checkpoint that read back cannot be trusted, or None."""
    if not isinstance(restored["data"], dict) or "rows" not in restored["data"]:
        return "its data position has no rows"
    if not isinstance(restored["meta"], dict) or "model" not in restored["meta"]:
        return "its config is incomplete"
    if not bool(jax.jit(all_finite)(restored["state"])):
        return "it holds non-finite values"
    return None


@contextlib.contextmanager
def _os_errors(directory: Path):
    """Tensorstore reports a failed write (a full disk, a lost permission) as a ValueError that
    carries the OS error code: raise it as the OSError it is."""
    try:
        yield
    except Exception as err:
        code = re.search(r"os_error_code='(\d+)'", str(err))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(directory)) from err


class _OrphanedOperations(logging.Filter):
    """asyncio's 'Future exception was never retrieved' for a tensorstore operation that failed
    after its read or write had already failed (the error was reported once, in one line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("exception was never retrieved" in text and "tensorstore" in text)


ABANDONED_READS = ("_read_array_index_and_device_put",)  # orbax's read of one array's shard


def _drop_late_callbacks() -> None:
    """After a failed read or write, tensorstore's operations still in flight call back into
    orbax's event loop, which is closed by then; each such callback's RuntimeError would print a
    traceback, and each failed future garbage-collected unread would log one. A damaged array's
    other shards' reads, abandoned when the first fails (the checkpoint already reported
    damaged), would print theirs when collected. Drop exactly those, and pass every other
    unraisable exception and log record on."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop", False):
        return
    logging.getLogger("asyncio").addFilter(_OrphanedOperations())

    def hook(unraisable) -> None:
        err = unraisable.exc_value
        closed = isinstance(err, RuntimeError) and str(err) == "Event loop is closed"
        abandoned = getattr(unraisable.object, "__name__", None) in ABANDONED_READS
        if not (closed or abandoned):
            previous(unraisable)

    hook.drops_closed_loop = True
    sys.unraisablehook = hook


def _reason(err: Exception) -> str:
    """The first line of an orbax or tensorstore error, shortened."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    text = text if len(text) <= 120 else text[:117] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def meta(cfg: ModelConfig, strategy: str, devices: int, train: Any) -> dict:
    return {
        "model": dataclasses.asdict(cfg.architecture),
        "workload": dataclasses.asdict(cfg.workload),
        "strategy": strategy,
        "devices": devices,
        "train": dataclasses.asdict(train),
    }


def state_form(abstract_state: Any) -> str:
    """A digest of a training state's form: every array's path, shape and dtype (not where it
    lives: layouts of the same model share it, whatever their shardings)."""
    leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
    text = ";".join(f"{jax.tree_util.keystr(p)}:{a.shape}:{a.dtype}" for p, a in leaves)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _architecture(saved: Any) -> Any:
    """The architecture a saved model config describes, fields added since at their defaults (a
    checkpoint written before workload and architecture were apart recorded both; one that is no
    valid config is left as it is)."""
    if not isinstance(saved, dict):
        return saved
    whole = any(field in saved for field in WORKLOAD_FIELDS)
    kind = ModelConfig if whole else Architecture
    known = {f.name for f in dataclasses.fields(kind)}
    try:
        arch = kind(**{k: v for k, v in saved.items() if k in known})
    except (ConfigError, TypeError):
        return saved
    arch = arch.architecture if whole else arch
    return json.loads(json.dumps(dataclasses.asdict(arch)))


def _difference(saved: Any, wanted: Any, most: int = 3) -> str:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        keys = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        return ", ".join(f"{k}: saved {saved.get(k)!r}, now {wanted.get(k)!r}" for k in keys[:most])
    return f"saved {saved!r}, now {wanted!r}"

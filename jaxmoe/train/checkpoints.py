"""Checkpoints with orbax: parameters, optimizer state and step, the data position, the config.

Saved asynchronously every `save_every` steps (training goes on while the arrays are written),
the last `keep` kept. A checkpoint records the model config and the strategy that wrote it and
restores only into the same ones (each strategy restores its own checkpoints, into its own
shardings). Orbax writes a step to a temporary directory and renames it when complete, so a run
killed mid-save leaves the previous checkpoint intact.
"""

import dataclasses
import json
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from jaxmoe.config import ConfigError, ModelConfig

ITEMS = ("state", "data", "meta")


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

    def latest(self) -> int | None:
        return self.manager.latest_step()

    def check(self, step: int) -> None:
        """Refuse, in one line, a checkpoint written for another model or strategy."""
        try:
            saved = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many kinds for unreadable files
            raise ConfigError(
                f"checkpoint {self.directory}/{step} is unreadable ({type(err).__name__}); "
                f"move it away or use another --workdir"
            ) from None
        saved = saved["meta"]
        for key in ("strategy", "model"):
            if saved.get(key) != self.meta[key]:
                diff = _difference(saved.get(key), self.meta[key])
                raise ConfigError(
                    f"{self.directory} holds checkpoints of another {key} ({diff}); "
                    f"use another --workdir, or the same {key} as the run that wrote them"
                )

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        self.check(step)
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], restored["data"]

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
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
        """Wait for pending saves and release the manager."""
        self.manager.wait_until_finished()
        self.manager.close()


def meta(cfg: ModelConfig, strategy: str, train: Any) -> dict:
    return {
        "model": dataclasses.asdict(cfg),
        "strategy": strategy,
        "train": dataclasses.asdict(train),
    }


def _difference(saved: Any, wanted: Any) -> str:
    if isinstance(saved, dict) and isinstance(wanted, dict):
        keys = sorted(k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k))
        return ", ".join(f"{k}: saved {saved.get(k)!r}, now {wanted.get(k)!r}" for k in keys[:3])
    return f"saved {saved!r}, now {wanted!r}"

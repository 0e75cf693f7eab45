"""The global batch as independent row streams, so any number of processes reads the same data.

Row r of every global batch [B, S + 1] is its own packed stream of the documents whose index is
r modulo B (`jaxmoe.data.TokenBatches` with process_index=r of B). A process builds only the
rows its devices hold, so each reads only its part, and the batches (and losses) do not depend
on how many processes share the mesh. The state is every row stream's position; in a run of
several processes it is gathered so process 0's checkpoint holds all of them.
"""

import json
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxmoe.config import ConfigError
from jaxmoe.data import SHUFFLE_WINDOW_TOKENS, TokenBatches


class RowStreams:
    def __init__(
        self,
        files: Sequence[Path],
        tokenizer,
        *,
        seq_len: int,
        batch: int,
        seed: int,
        shuffle: bool,
        repeat: bool,
        rows: Sequence[int],
    ):
        self.streams = {
            r: TokenBatches(
                files,
                tokenizer,
                seq_len=seq_len,
                batch=1,
                seed=seed,
                shuffle=shuffle,
                repeat=repeat,
                process_index=r,
                process_count=batch,
                window_tokens=SHUFFLE_WINDOW_TOKENS // batch,  # the batch shuffles as one window
            )
            for r in rows
        }

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        """This process's rows of the next global batch: int32 [len(rows), S + 1]."""
        return np.concatenate([next(s) for s in self.streams.values()])

    def get_state(self) -> dict:
        """Every row's position (gathered from all processes)."""
        return _gather({str(r): s.get_state() for r, s in self.streams.items()})

    def set_state(self, state: dict) -> None:
        missing = [r for r in self.streams if str(r) not in state]
        if missing:
            raise ConfigError(
                f"the checkpoint's data state has no position for rows {missing}; it was "
                f"written with another batch size: use the same batch as the run that wrote it"
            )
        for r, s in self.streams.items():
            s.set_state(state[str(r)])


def local_rows(batch: int) -> range:
    """The rows of the global batch this process feeds (its devices hold them)."""
    n, i = jax.process_count(), jax.process_index()
    if batch % n:
        raise ConfigError(f"batch={batch} does not split over {n} processes; use a multiple of {n}")
    return range(i * batch // n, (i + 1) * batch // n)


def _gather(local: dict) -> dict:
    if jax.process_count() == 1:
        return local
    blob = np.frombuffer(json.dumps(local).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([blob.size]))).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: blob.size] = blob
    blobs = np.asarray(multihost_utils.process_allgather(padded))
    merged: dict = {}
    for row, size in zip(blobs, sizes, strict=True):
        merged |= json.loads(bytes(row[:size]))
    return merged

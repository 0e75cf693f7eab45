"""Streaming, checkpointable C4 token pipeline: json-lines files -> packed int32 token batches.

What
    `TokenBatches` reads C4 json-lines files (`.json`, `.json.gz`, `.jsonl`, `.jsonl.gz`; one JSON
    object with a "text" string per line), tokenizes the texts (GPT-2 byte-level BPE, batch-encoded
    in chunks of `_CHUNK_DOCS` documents), appends `EOS_ID` after every document, concatenates
    everything into one token stream and cuts it into rows of `seq_len + 1` tokens. Rows are
    disjoint, consecutive slices of the stream: with L = seq_len + 1, row r = stream[r*L : (r+1)*L]
    (no token is shared between rows; a document may span rows; the trainer uses row[:-1] as
    inputs and row[1:] as targets, so the first token of each row is never a target). A batch is
    `batch` consecutive rows of the (optionally shuffled) row stream. With repeat=False the last
    partial row and the last partial batch are dropped.

Layout (a grain `IterDataset` chain; the two stages marked * are this module's own)
    *_Documents   epoch -> file (order shuffled per epoch from (seed, epoch)) -> line; yields
                  each document's tokens + EOS. Reads one file at a time, streaming.
    *_Pack        concatenate documents and cut rows of seq_len + 1 tokens.
    WindowShuffleIterDataset (shuffle=True only): shuffles rows inside consecutive windows of
                  about `window_tokens` tokens (default SHUFFLE_WINDOW_TOKENS;
                  `window_tokens // (seq_len+1)` rows), a new permutation per window.
    .batch(batch, drop_remainder=True) -> int32 [batch, seq_len + 1].
    The packing stage is our own rather than grain's ConcatThenSplitIterDataset because that one
    (grain 0.2.18) keeps tuples in its state, and after a JSON round trip (tuples become lists) it
    restores to the wrong position; it also pads the final row instead of dropping it.

Processes
    With at least `process_count` files, process i reads files[i::process_count]; otherwise every
    process reads every file and keeps the lines with line_index % process_count == i. Either way
    the processes together read exactly the documents one process would. Processes can then get
    different numbers of rows per epoch: with repeat=False they may run out at different batches.

State
    `get_state()` is a small JSON-serialisable dict: the settings it depends on (checked by
    `set_state`) plus grain's nested iterator state, which holds only positions (epoch, file
    index in that epoch's order, line, offset into the current document, shuffle window index and
    position). It never holds data.

Costs
    Memory: the current gzip stream, one chunk of tokenized documents, and (shuffle=True) one
    window of rows (~SHUFFLE_WINDOW_TOKENS int32 tokens, 4 MiB by default).
    First batch: with shuffle=True the first window must be filled, i.e. ~SHUFFLE_WINDOW_TOKENS
    tokens tokenized (about 1 s on 2 CPU cores); with shuffle=False one chunk.
    set_state: reopens the saved file and skips (decompresses, does not parse) the lines before
    the saved one (up to a whole shard: a few seconds for a full 350k-document C4 shard), then
    re-reads and re-tokenizes the current shuffle window (again ~SHUFFLE_WINDOW_TOKENS tokens).
    Throughput: tokenization dominates, ~0.5M tokens/s on 2 cores (the tokenizers library uses
    all cores for each chunk).
"""

import collections
import glob
import gzip
import json
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tokenizers

from jaxmoe.config import ConfigError

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_TRAIN = ASSETS / "c4" / "c4-train.00000-of-01024.first1000.json.gz"
DEFAULT_VALID = ASSETS / "c4" / "c4-heldout.olmo-sample.1000.json.gz"
DEFAULT_TOKENIZER = ASSETS / "gpt2"
EOS_ID = 50256
_EOS_TOKEN = "<|endoftext|>"
SHUFFLE_WINDOW_TOKENS = 1 << 20  # rows are shuffled within windows of about this many tokens

_SUFFIXES = (".json", ".json.gz", ".jsonl", ".jsonl.gz")
_CHUNK_DOCS = 128  # documents tokenized per encode_batch call
_DATA_FIX = "pass --data a directory of C4 .json.gz shards or a .json/.json.gz file"
_FILE_FIX = "fix or remove the file, or pass another --data"
_TOKENIZER_NEEDS = "tokenizer.json, or vocab.json and merges.txt (GPT-2 byte-level BPE)"


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())[:200]


# ---- tokenizer ---------------------------------------------------------------------------------
def load_tokenizer(directory: Path | str | None = None) -> tokenizers.Tokenizer:
    """The tokenizer in `directory` (tokenizer.json, else vocab.json + merges.txt as a byte-level
    BPE); None = the shipped GPT-2 one. `<|endoftext|>` must be id EOS_ID."""
    d = DEFAULT_TOKENIZER if directory is None else Path(directory).expanduser()
    if not d.is_dir():
        raise ConfigError(
            f"tokenizer directory {d} does not exist; pass a directory with {_TOKENIZER_NEEDS}"
        )
    try:
        if (d / "tokenizer.json").is_file():
            tok = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
        elif (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
            model = tokenizers.models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt"))
            tok = tokenizers.Tokenizer(model)
            tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tokenizers.decoders.ByteLevel()
            tok.add_special_tokens([_EOS_TOKEN])
        else:
            raise ConfigError(
                f"tokenizer directory {d} has neither tokenizer.json nor "
                f"vocab.json + merges.txt; pass a directory with {_TOKENIZER_NEEDS}"
            )
    except ConfigError:
        raise
    except Exception as err:  # the tokenizers library raises plain Exception on bad files
        raise ConfigError(
            f"tokenizer in {d} could not be read ({_one_line(err)}); pass a "
            f"directory with {_TOKENIZER_NEEDS}"
        ) from err
    if tok.token_to_id(_EOS_TOKEN) != EOS_ID:
        raise ConfigError(
            f"tokenizer in {d} maps {_EOS_TOKEN} to {tok.token_to_id(_EOS_TOKEN)}, "
            f"not {EOS_ID}; pass a GPT-2 vocabulary tokenizer directory"
        )
    return tok


# ---- files -------------------------------------------------------------------------------------
def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb")


def _read_line(f, path: Path, line: int) -> bytes:
    try:
        return f.readline()
    except (OSError, EOFError, zlib.error) as err:  # BadGzipFile is an OSError
        gz = path.name.endswith(".gz")
        what = "is not valid gzip" if gz and line == 0 else f"is corrupt at line {line + 1}"
        raise ConfigError(f"data file {path} {what} ({_one_line(err)}); {_DATA_FIX}") from err


def _text(raw: bytes, path: Path, line: int) -> str:
    try:
        doc = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        raise ConfigError(
            f"data file {path} line {line + 1} is not valid JSON ({_one_line(err)}); {_FILE_FIX}"
        ) from err
    if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
        raise ConfigError(
            f'data file {path} line {line + 1} has no "text" string field '
            f"(C4 json lines need one); {_FILE_FIX}"
        )
    return doc["text"]


def _probe(path: Path) -> None:
    """Open `path`, read its first non-blank line, check it is a C4 document."""
    with _open(path) as f:
        line = 0
        while raw := _read_line(f, path, line):
            if raw.strip():
                _text(raw, path, line)
                return
            line += 1
    raise ConfigError(f"data file {path} has no documents; remove it or pass another --data")


def c4_files(path: Path | str) -> list[Path]:
    """The C4 json-lines files at `path`, each probed (first line only), sorted.

    `path`: one file; a directory (its data files, not recursive; when it holds both c4-train.*
    and c4-validation.* shards, as the real c4/en directory does, only the c4-train ones); or a
    glob pattern such as c4/en/c4-validation.*.json.gz.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(_SUFFIXES))
        train = [f for f in files if f.name.startswith("c4-train.")]
        if train and any(f.name.startswith("c4-validation.") for f in files):
            files = train
        if not files:
            raise ConfigError(
                f"data directory {p} has no {'/'.join(_SUFFIXES)} files "
                f"(subdirectories are not searched); {_DATA_FIX}"
            )
    elif p.is_file():
        if not p.name.endswith(_SUFFIXES):
            raise ConfigError(f"data file {p} is not named {'/'.join(_SUFFIXES)}; {_DATA_FIX}")
        files = [p]
    elif any(c in str(path) for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(str(p)) if f.endswith(_SUFFIXES))
        files = [f for f in files if f.is_file()]
        if not files:
            raise ConfigError(
                f"data pattern {path} matches no {'/'.join(_SUFFIXES)} files; {_DATA_FIX}"
            )
    else:
        raise ConfigError(f"data path {p} does not exist; {_DATA_FIX}")
    for f in files:
        _probe(f)
    return files


# ---- pipeline stages ---------------------------------------------------------------------------
class _Documents(grain.IterDataset):
    def __init__(self, files, tokenizer, *, seed, shuffle, repeat, keep):
        super().__init__()
        self._args = (files, tokenizer, seed, shuffle, repeat, keep)

    def __iter__(self):
        return _DocumentsIterator(*self._args)


class _DocumentsIterator(grain.DatasetIterator):
    """Yields int32 tokens + EOS per document. Position = (epoch, file, line): the next document
    is the first kept, non-blank line at or after `line` of file `file` of epoch `epoch`'s order.
    `keep` = (i, n): keep only lines with index % n == i (None: keep all)."""

    def __init__(self, files, tokenizer, seed, shuffle, repeat, keep):
        super().__init__()
        self._files, self._tok, self._seed = list(files), tokenizer, seed
        self._shuffle, self._repeat, self._keep = shuffle, repeat, keep
        self._encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self._reader = None  # [open file, index of the next line it returns]
        self._set(0, 0, 0)

    def _close_file(self) -> None:
        if self._reader is not None:
            self._reader[0].close()
            self._reader = None

    def close(self) -> None:
        self._close_file()
        super().close()

    def _set(self, epoch: int, file: int, line: int) -> None:
        self._close_file()
        self._epoch, self._file, self._line = epoch, file, line
        self._ready = collections.deque()  # (line, tokens) read ahead in the current file
        self._empty_passes = 0  # epoch wraps in a row without a document
        self._yielded = False
        order = np.arange(len(self._files))
        if self._shuffle:
            order = np.random.default_rng([self._seed, epoch]).permutation(len(self._files))
        self._order = [self._files[i] for i in order]

    def _fill(self) -> bool:
        """Read and tokenize the next chunk of the current file; False at its end."""
        try:
            return self._read_chunk()
        except ConfigError:
            self._close_file()
            raise

    def _read_chunk(self) -> bool:
        path = self._order[self._file]
        if self._reader is None:
            self._reader = [_open(path), 0]
            while self._reader[1] < self._line:  # resume: skip lines without parsing them
                if not _read_line(self._reader[0], path, self._reader[1]):
                    break
                self._reader[1] += 1
        f = self._reader[0]
        lines, texts = [], []
        while len(texts) < _CHUNK_DOCS:
            line = self._reader[1]
            raw = _read_line(f, path, line)
            if not raw:
                break
            self._reader[1] += 1
            if (self._keep and line % self._keep[1] != self._keep[0]) or not raw.strip():
                continue
            lines.append(line)
            texts.append(_text(raw, path, line))
        for line, enc in zip(lines, self._encode(texts, add_special_tokens=False), strict=True):
            tokens = np.empty(len(enc.ids) + 1, np.int32)
            tokens[:-1] = enc.ids
            tokens[-1] = EOS_ID
            self._ready.append((line, tokens))
        return bool(texts)

    def __next__(self) -> np.ndarray:
        while not self._ready:
            if self._file == len(self._files):
                if not self._repeat:
                    raise StopIteration
                self._empty_passes = 0 if self._yielded else self._empty_passes + 1
                if self._empty_passes >= 2:
                    who = f"process {self._keep[0]} of {self._keep[1]}" if self._keep else "it"
                    raise ConfigError(
                        f"the {len(self._files)} data file(s) from {self._files[0]} hold no "
                        f"documents for {who}; pass more data or use fewer processes"
                    )
                passes = self._empty_passes
                self._set(self._epoch + 1, 0, 0)
                self._empty_passes = passes
            elif not self._fill():
                self._close_file()
                self._file, self._line = self._file + 1, 0
        line, tokens = self._ready.popleft()
        self._line = line + 1
        self._yielded = True
        return tokens

    def get_state(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "file": self._file, "line": self._line}

    def set_state(self, state: dict[str, Any]) -> None:
        self._set(int(state["epoch"]), int(state["file"]), int(state["line"]))


class _Pack(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, length: int):
        super().__init__(parent)
        self._length = length

    def __iter__(self):
        return _PackIterator(self._parent.__iter__(), self._length)


class _PackIterator(grain.DatasetIterator):
    """Rows of `length` consecutive tokens. State = the parent's state before the current
    document + how many of its tokens are already in rows."""

    def __init__(self, parent: grain.DatasetIterator, length: int):
        super().__init__(parent)
        self._length = length
        self._doc_state = parent.get_state()
        self._doc = np.zeros(0, np.int32)
        self._offset = 0

    def __next__(self) -> np.ndarray:
        row = np.empty(self._length, np.int32)
        filled = 0
        while filled < self._length:
            if self._offset == len(self._doc):
                state = self._parent.get_state()
                doc = next(self._parent)  # StopIteration drops the partial row
                self._doc_state, self._doc, self._offset = state, doc, 0
            take = min(self._length - filled, len(self._doc) - self._offset)
            row[filled : filled + take] = self._doc[self._offset : self._offset + take]
            filled += take
            self._offset += take
        return row

    def get_state(self) -> dict[str, Any]:
        return {"doc": self._doc_state, "offset": self._offset}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["doc"])
        self._doc_state = state["doc"]
        try:
            self._doc = next(self._parent)
            self._offset = int(state["offset"])
        except StopIteration:  # the saved state is the start of an empty stream
            self._doc, self._offset = np.zeros(0, np.int32), 0


# ---- public iterator ---------------------------------------------------------------------------
class TokenBatches:
    """Packed token batches from C4 json-lines files, streamed (never loads a whole file or shard
    set into memory), with a checkpointable position. See the module docstring."""

    def __init__(
        self,
        files: Sequence[Path],
        tokenizer,
        *,
        seq_len: int,
        batch: int,
        seed: int = 0,
        shuffle: bool = True,
        repeat: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        window_tokens: int = SHUFFLE_WINDOW_TOKENS,
    ):
        files = [Path(f) for f in files]
        if not files:
            raise ConfigError(f"no data files given; {_DATA_FIX}")
        if seq_len < 1 or batch < 1:
            raise ConfigError(
                f"seq_len={seq_len} and batch={batch} must both be >= 1; pass positive sizes"
            )
        if not 0 <= process_index < process_count:
            raise ConfigError(
                f"process_index={process_index} is not in [0, process_count="
                f"{process_count}); pass jax.process_index()/jax.process_count()"
            )
        if len(files) >= process_count:
            mine, keep = files[process_index::process_count], None
        else:
            mine, keep = files, (process_index, process_count)
        self._settings = {
            "seq_len": seq_len,
            "batch": batch,
            "seed": seed,
            "shuffle": shuffle,
            "repeat": repeat,
            "process": [process_index, process_count],
            "files": len(files),
            "window_tokens": window_tokens,
        }
        ds = _Documents(mine, tokenizer, seed=seed, shuffle=shuffle, repeat=repeat, keep=keep)
        ds = _Pack(ds, seq_len + 1)
        if shuffle:
            window = max(1, window_tokens // (seq_len + 1))
            ds = grain.experimental.WindowShuffleIterDataset(ds, window_size=window, seed=seed)
        self._it = ds.batch(batch, drop_remainder=True).__iter__()

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        return next(self._it)

    def get_state(self) -> dict:
        return {**self._settings, "iterator": self._it.get_state()}

    def set_state(self, state: dict) -> None:
        saved = {k: state.get(k) for k in self._settings}
        if saved != self._settings or "iterator" not in state:
            diff = ", ".join(
                f"{k}={saved[k]!r} (now {v!r})" for k, v in self._settings.items() if saved[k] != v
            )
            raise ConfigError(
                f"data state was saved with other settings: {diff or 'no iterator'}"
                "; resume with the same data settings or without the data state"
            )
        self._it.set_state(state["iterator"])

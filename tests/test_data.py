"""The C4 token pipeline: tokenizer, files, packing, shuffle, checkpoints, processes, bad input."""

import gzip
import json
import shutil

import numpy as np
import pytest

from jaxmoe import data
from jaxmoe.config import ConfigError

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "red", "blue"]  # one GPT-2 token each


@pytest.fixture(scope="module")
def tok():
    return data.load_tokenizer()


def _write(path, lines, *, gz=True):
    """Json lines: dicts are dumped, strings written as they are."""
    body = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines).encode()
    path.write_bytes(gzip.compress(body) if gz else body)
    return path


def _texts(n, seed):
    rng = np.random.default_rng(seed)
    return [
        " ".join(rng.choice(WORDS, size=rng.integers(1, 30))) + f" #{seed}.{i}" for i in range(n)
    ]


def _corpus(tmp_path, n_files=3, n_docs=10):
    """n_files .json.gz files of n_docs documents; returns (files, texts in file order)."""
    files, texts = [], []
    for f in range(n_files):
        t = _texts(n_docs, f)
        files.append(
            _write(tmp_path / f"c4-train.{f:05d}-of-01024.json.gz", [{"text": x} for x in t])
        )
        texts += t
    return files, texts


def _stream(tok, texts):
    return np.concatenate([[*tok.encode(t).ids, data.EOS_ID] for t in texts]).astype(np.int32)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _epoch(state):
    """The epoch in a (nested) iterator state."""
    if isinstance(state, dict):
        return state["epoch"] if "epoch" in state else max(map(_epoch, state.values()), default=-1)
    return -1


def _one_line(err, *names):
    msg = str(err.value)
    assert "\n" not in msg, msg
    for name in names:
        assert str(name) in msg, msg


# ---- tokenizer -----------------------------------------------------------------------------------
def test_shipped_tokenizer(tok):
    assert tok.encode("Hello world").ids == [15496, 995]
    assert tok.encode("a<|endoftext|>b").ids[1] == data.EOS_ID


def test_vocab_and_merges_give_the_same_ids(tmp_path, tok):
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(data.DEFAULT_TOKENIZER / name, tmp_path / name)
    bpe = data.load_tokenizer(tmp_path)
    texts = ["Hello world", " leading space, ünïcödé & 数字 123\n\ttabs", "x<|endoftext|>y"]
    texts += _texts(5, 0)
    for text in texts:
        assert bpe.encode(text).ids == tok.encode(text).ids, text
        assert bpe.decode(bpe.encode(text).ids) == text.replace("<|endoftext|>", "")


def test_bad_tokenizer_dirs(tmp_path):
    with pytest.raises(ConfigError) as err:
        data.load_tokenizer(tmp_path)
    _one_line(err, tmp_path, "tokenizer.json", "vocab.json", "merges.txt")
    with pytest.raises(ConfigError) as err:
        data.load_tokenizer(tmp_path / "missing")
    _one_line(err, tmp_path / "missing", "tokenizer.json")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError) as err:
        data.load_tokenizer(tmp_path)
    _one_line(err, tmp_path, "could not be read")


# ---- packing, order, shuffling -------------------------------------------------------------------
def test_rows_are_the_document_stream_cut_in_order(tmp_path, tok):
    files, texts = _corpus(tmp_path)
    seq_len, batch = 7, 3
    batches = list(
        data.TokenBatches(files, tok, seq_len=seq_len, batch=batch, shuffle=False, repeat=False)
    )
    stream = _stream(tok, texts)
    rows_total = len(stream) // (seq_len + 1)
    assert len(batches) == rows_total // batch > 5
    for b in batches:
        assert b.shape == (batch, seq_len + 1) and b.dtype == np.int32
    got = np.concatenate(batches).reshape(-1)
    assert np.array_equal(got, stream[: len(got)])  # rows: stream[r*L:(r+1)*L], no overlap


def test_seed_decides_the_order(tmp_path, tok):
    files, _ = _corpus(tmp_path)

    def run(seed, shuffle=True):
        it = data.TokenBatches(
            files, tok, seq_len=15, batch=4, seed=seed, shuffle=shuffle, window_tokens=16 * 20
        )  # 20-row windows
        return np.stack(_take(it, 30))

    a, b, c, plain = run(0), run(0), run(1), run(0, shuffle=False)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a, plain)


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("repeat", [True, False])
def test_checkpoint_resumes_exactly(tmp_path, tok, shuffle, repeat):
    files, _ = _corpus(tmp_path)
    kw = dict(seq_len=15, batch=4, seed=3, shuffle=shuffle, repeat=repeat, window_tokens=16 * 10)
    n_epoch = len(list(data.TokenBatches(files, tok, **{**kw, "repeat": False})))
    epochs = set()
    for k in [3, *range(n_epoch - 3, n_epoch + 5)] if repeat else [0, 3, n_epoch - 3]:
        it = data.TokenBatches(files, tok, **kw)
        _take(it, k)
        state = json.loads(json.dumps(it.get_state()))
        expected = _take(it, 3) if repeat else list(it)[:3]
        again = data.TokenBatches(files, tok, **kw)
        again.set_state(state)
        got = _take(again, 3) if repeat else list(again)[:3]
        assert len(got) == len(expected) == 3
        for x, y in zip(got, expected, strict=True):
            assert np.array_equal(x, y), k
        epochs.add(_epoch(state))
    assert epochs == ({0, 1} if repeat else {0})  # with repeat, some states lie in epoch 1


def test_set_state_rejects_other_settings(tmp_path, tok):
    files, _ = _corpus(tmp_path, n_files=1)
    state = data.TokenBatches(files, tok, seq_len=15, batch=4).get_state()
    with pytest.raises(ConfigError) as err:
        data.TokenBatches(files, tok, seq_len=31, batch=4).set_state(state)
    _one_line(err, "seq_len=15")


def _one_row_docs(tmp_path, tok, n_files, seq_len=5, n_docs=9):
    """Files of distinct documents of seq_len tokens: with EOS, each is exactly one row."""
    files, rows = [], {}
    for f in range(n_files):
        keys = [f * n_docs + d for d in range(n_docs)]  # base-8 digits pick the words
        docs = [" ".join(WORDS[k // 8**j % 8] for j in range(seq_len)) for k in keys]
        for d, doc in enumerate(docs):
            ids = tok.encode(doc).ids
            assert len(ids) == seq_len
            rows[(*ids, data.EOS_ID)] = (f, d)
        files.append(_write(tmp_path / f"f{f}.json.gz", [{"text": d} for d in docs]))
    return files, rows


def test_each_epoch_reads_every_file_in_a_new_order(tmp_path, tok):
    files, where = _one_row_docs(tmp_path, tok, n_files=4)
    it = data.TokenBatches(
        files, tok, seq_len=5, batch=1, seed=1, window_tokens=1
    )  # no row shuffle
    orders = []
    for _ in range(4):
        epoch = [where[tuple(next(it)[0])] for _ in range(len(where))]
        order = list(dict.fromkeys(f for f, _ in epoch))
        assert epoch == [(f, d) for f in order for d in range(9)]  # whole files, lines in order
        orders.append(tuple(order))
    assert len(set(orders)) > 1


@pytest.mark.parametrize("n_files", [1, 4])
def test_processes_split_the_documents(tmp_path, tok, n_files):
    seq_len = 5
    files, _ = _one_row_docs(tmp_path, tok, n_files, seq_len)

    def rows(index, count):
        it = data.TokenBatches(
            files, tok, seq_len=seq_len, batch=1, shuffle=False, repeat=False,
            process_index=index, process_count=count,
        )  # fmt: skip
        return [tuple(b[0]) for b in it]

    one, p0, p1 = rows(0, 1), rows(0, 2), rows(1, 2)
    assert len(one) == 9 * n_files and p0 and p1
    assert sorted(p0 + p1) == sorted(one)


def test_a_process_without_documents_fails_instead_of_looping(tmp_path, tok):
    files = [_write(tmp_path / "one.json.gz", [{"text": "only one document"}])]
    kw = dict(seq_len=3, batch=1, shuffle=False, process_count=2)
    assert next(data.TokenBatches(files, tok, process_index=0, **kw)).shape == (1, 4)
    with pytest.raises(ConfigError) as err:
        next(data.TokenBatches(files, tok, process_index=1, **kw))
    _one_line(err, "one.json.gz", "process 1 of 2")


# ---- files and bad input -------------------------------------------------------------------------
def test_c4_files_layouts(tmp_path):
    doc = [{"text": "x"}]
    en = tmp_path / "en"
    en.mkdir()
    for name in ["c4-train.00001-of-01024.json.gz", "c4-train.00000-of-01024.json.gz",
                 "c4-validation.00000-of-00008.json.gz"]:  # fmt: skip
        _write(en / name, doc)
    (en / "README.md").write_text("not data")
    assert [f.name for f in data.c4_files(en)] == [
        "c4-train.00000-of-01024.json.gz",
        "c4-train.00001-of-01024.json.gz",
    ]
    assert [f.name for f in data.c4_files(en / "c4-validation.*.json.gz")] == [
        "c4-validation.00000-of-00008.json.gz"
    ]
    plain = _write(tmp_path / "docs.jsonl", ["", json.dumps({"text": "y"})], gz=False)
    assert data.c4_files(plain) == [plain]
    assert data.c4_files(data.DEFAULT_VALID) == [data.DEFAULT_VALID]


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing", "does not exist"),
        ("no_json_dir", "has no .json"),
        ("empty_gz", "has no documents"),
        ("zero_bytes", "has no documents"),
        ("not_gzip", "is not valid gzip"),
        ("not_json", "line 1 is not valid JSON"),
        ("no_text", 'line 2 has no "text"'),
    ],
)
def test_bad_data_files(tmp_path, case, expect):
    path = tmp_path / "d.json.gz"
    if case == "missing":
        path = tmp_path / "nowhere"
    elif case == "no_json_dir":
        path = tmp_path / "dir"
        path.mkdir()
        (path / "notes.txt").write_text("{}")
    elif case == "empty_gz":
        _write(path, [])
    elif case == "zero_bytes":
        path.write_bytes(b"")
    elif case == "not_gzip":
        _write(path, [{"text": "x"}], gz=False)
    elif case == "not_json":
        _write(path, ["this is not json"])
    elif case == "no_text":
        _write(path, ["", {"url": "u", "text": 3}])
    with pytest.raises(ConfigError) as err:
        data.c4_files(path)
    _one_line(err, path, expect)


def test_bad_data_found_mid_stream(tmp_path, tok):
    bad_json = _write(tmp_path / "a.json.gz", [{"text": "fine"}, {"text": "also"}, "{oops"])
    no_text = _write(tmp_path / "b.json", [{"text": "fine"}, {"txt": "no"}], gz=False)
    rng = np.random.default_rng(0)
    words = ["".join(rng.choice(list("abcdefghij"), 8)) for _ in range(4000)]
    body = gzip.compress("".join(json.dumps({"text": w}) + "\n" for w in words).encode())
    truncated = tmp_path / "c.json.gz"
    truncated.write_bytes(body[: len(body) // 2])
    for path, expect in [
        (bad_json, "line 3 is not valid JSON"),
        (no_text, 'line 2 has no "text"'),
        (truncated, "is corrupt at line"),
    ]:
        files = data.c4_files(path)  # the first line is fine: found only when streaming
        with pytest.raises(ConfigError) as err:
            list(data.TokenBatches(files, tok, seq_len=3, batch=1, shuffle=False, repeat=False))
        _one_line(err, path, expect)


def test_shipped_training_sample(tok):
    files = data.c4_files(data.DEFAULT_TRAIN)
    batches = _take(data.TokenBatches(files, tok, seq_len=256, batch=8, seed=0), 60)
    assert all(b.shape == (8, 257) and b.dtype == np.int32 for b in batches)
    ids = np.stack(batches)
    assert ids.min() >= 0 and ids.max() < 50257
    assert (ids == data.EOS_ID).sum() > 60  # many documents end inside these rows
    assert len({b.tobytes() for b in batches}) == 60
    # validation order is file order: the first row is the first document's first tokens
    valid = data.TokenBatches(
        data.c4_files(data.DEFAULT_VALID), tok, seq_len=256, batch=8, shuffle=False, repeat=False
    )
    with gzip.open(data.DEFAULT_VALID, "rt") as f:
        first = [*tok.encode(json.loads(f.readline())["text"]).ids, data.EOS_ID]
    n = min(len(first), 257)
    assert next(valid)[0, :n].tolist() == first[:n]

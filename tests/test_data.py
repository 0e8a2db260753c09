"""Data: corpus sources and their train/validation split, and the batch pipelines.

`data.load_corpus` is cached on (source, val_fraction), so every test reads its own
tmp_path; where a test reads the same files twice it spells the path differently.
"""

from __future__ import annotations

import collections
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sparsemodel import data, hardware

VOCABULARY = """
def return import class self for while if else elif lambda yield with as try except
the of and a to in is that it was on by from this model expert token router batch
"""
WORDS = VOCABULARY.split()


def random_text(rng: np.random.Generator, n_words: int) -> bytes:
    words = rng.choice(WORDS, size=n_words)
    seps = rng.choice([" ", " ", " ", "\n", ", ", ".\n"], size=n_words)
    return "".join(w + s for w, s in zip(words, seps, strict=True)).encode()


def write_corpus(root: Path, n_files: int = 20, seed: int = 0) -> dict[str, bytes]:
    """~20 files of a few KB (some in a subdirectory); returns {relative path: content}."""
    rng = np.random.default_rng(seed)
    files = {}
    for i in range(n_files):
        rel = f"f{i:02d}.txt" if i % 3 else f"sub/f{i:02d}.py"
        content = random_text(rng, int(rng.integers(400, 900)))
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(content)
        files[rel] = content
    return files


def as_bytes(tokens: np.ndarray) -> bytes:
    assert tokens.dtype == np.uint8
    return tokens.tobytes()


def one_line_data_error(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    assert message.startswith("data.source: "), message
    return message


# ------------------------------------------------------------------------ directories


def test_directory_split_is_by_file(tmp_path):
    root = tmp_path / "corpus"
    files = write_corpus(root)
    corpus = data.load_corpus(str(root), 0.2)
    train, val = as_bytes(corpus.train), as_bytes(corpus.val)

    assert len(train) + len(val) == sum(len(c) for c in files.values())
    assert len(train) > 0 and len(val) > 0
    # Each file lies wholly in one split, and each split is its files in path order.
    val_files = sorted(rel for rel, c in files.items() if c in val)
    train_files = sorted(rel for rel, c in files.items() if c in train)
    assert sorted(val_files + train_files) == sorted(files)
    assert b"".join(files[r] for r in sorted(val_files, key=lambda r: root / r)) == val
    assert b"".join(files[r] for r in sorted(train_files, key=lambda r: root / r)) == train
    # About val_fraction of the files (a hash split: not exact).
    assert 1 <= len(val_files) <= 10


def test_directory_split_is_deterministic(tmp_path):
    root = tmp_path / "corpus"
    write_corpus(root)
    a = data.load_corpus(str(root), 0.2)
    b = data.load_corpus(str(root) + "/", 0.2)  # another cache key, the same directory
    assert a is not b
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)


def test_directory_split_does_not_depend_on_where_the_directory_is(tmp_path):
    first = tmp_path / "here"
    write_corpus(first)
    a = data.load_corpus(str(first), 0.2)
    moved = tmp_path / "elsewhere" / "deeper"
    moved.parent.mkdir()
    shutil.move(first, moved)
    b = data.load_corpus(str(moved), 0.2)
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.val, b.val)


def test_adding_a_file_does_not_move_the_others(tmp_path):
    root = tmp_path / "corpus"
    files = write_corpus(root)
    before = as_bytes(data.load_corpus(str(root), 0.2).val)
    (root / "zz_new.txt").write_bytes(b"a new file " * 300)
    after = as_bytes(data.load_corpus(str(root) + "/", 0.2).val)
    for content in files.values():
        assert (content in before) == (content in after)


def test_directory_skips_dotfiles(tmp_path):
    root = tmp_path / "corpus"
    files = write_corpus(root, n_files=10)
    (root / ".hidden").write_bytes(b"SECRET" * 100)
    corpus = data.load_corpus(str(root), 0.2)
    assert len(corpus.train) + len(corpus.val) == sum(len(c) for c in files.values())


def test_directory_with_one_file_splits_its_bytes(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    content = random_text(np.random.default_rng(1), 500)
    (root / "only.txt").write_bytes(content)
    corpus = data.load_corpus(str(root), 0.2)
    n_val = int(len(content) * 0.2)
    assert as_bytes(corpus.val) == content[-n_val:]
    assert as_bytes(corpus.train) == content[:-n_val]


# ------------------------------------------------------------------------ single files


def test_single_file_tail_is_validation(tmp_path):
    path = tmp_path / "text.txt"
    content = random_text(np.random.default_rng(2), 1000)
    path.write_bytes(content)
    corpus = data.load_corpus(str(path), 0.2)
    n_val = int(len(content) * 0.2)
    assert len(corpus.val) == n_val
    assert as_bytes(corpus.val) == content[-n_val:]
    assert as_bytes(corpus.train) == content[:-n_val]


def test_non_utf8_bytes_are_tokens(tmp_path):
    raw = bytes(range(256)) * 50
    path = tmp_path / "binary.dat"
    path.write_bytes(raw)
    corpus = data.load_corpus(str(path), 0.1)
    tokens = np.concatenate([corpus.train, corpus.val])
    np.testing.assert_array_equal(tokens, np.tile(np.arange(256), 50))


def test_non_utf8_bytes_in_a_directory(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    (root / "latin1.txt").write_bytes("caf\u00e9 na\u00efve ".encode("latin-1") * 100)
    (root / "binary.dat").write_bytes(bytes(range(256)) * 10)
    corpus = data.load_corpus(str(root), 0.2)
    assert len(corpus.train) + len(corpus.val) == 1100 + 2560
    assert np.concatenate([corpus.train, corpus.val]).max() == 255


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.uint16])
def test_npy_tokens_as_stored(tmp_path, dtype):
    tokens = np.random.default_rng(3).integers(0, 50_000, size=10_000).astype(dtype)
    path = tmp_path / f"tokens_{np.dtype(dtype).name}.npy"
    np.save(path, tokens)
    corpus = data.load_corpus(str(path), 0.1)
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), tokens)
    assert corpus.train.dtype == dtype
    assert len(corpus.val) == 1000


def test_npy_2d_is_flattened(tmp_path):
    tokens = np.arange(600, dtype=np.int32).reshape(20, 30)
    path = tmp_path / "tokens2d.npy"
    np.save(path, tokens)
    corpus = data.load_corpus(str(path), 0.5)
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), tokens.ravel())


def test_float_npy_is_refused(tmp_path):
    path = tmp_path / "floats.npy"
    np.save(path, np.linspace(0, 1, 100))
    with pytest.raises(data.DataError) as exc:
        data.load_corpus(str(path), 0.1)
    assert "float64" in one_line_data_error(exc)


def test_bin_uint16_round_trip(tmp_path):
    tokens = np.random.default_rng(4).integers(0, 2**16, size=5000).astype(np.uint16)
    path = tmp_path / "tokens.bin"
    tokens.tofile(path)
    corpus = data.load_corpus(str(path), 0.2)
    np.testing.assert_array_equal(np.concatenate([corpus.train, corpus.val]), tokens)
    assert corpus.train.dtype == np.uint16
    np.testing.assert_array_equal(corpus.val, tokens[-1000:])


@pytest.mark.parametrize("suffix", [".npy", ".bin"])
def test_token_files_are_memory_mapped_and_feed_the_pipeline(tmp_path, suffix):
    tokens = np.arange(4001, dtype=np.uint16)  # window i starts with token 8 * i
    path = tmp_path / f"mapped{suffix}"
    np.save(path, tokens) if suffix == ".npy" else tokens.tofile(path)
    corpus = data.load_corpus(str(path), 0.2)
    assert isinstance(corpus.train, np.memmap) and isinstance(corpus.val, np.memmap)
    batch = next(data.train_iterator(corpus.train, 8, 4, seed=0))  # [4, 9]
    for row in batch:
        assert row[0] % 8 == 0
        np.testing.assert_array_equal(row, np.arange(row[0], row[0] + 9))
    data.check_token_ids(str(path), 4001, corpus.train, corpus.val)
    with pytest.raises(data.DataError) as exc:  # the largest id, 4000, is in the validation
        data.check_token_ids(str(path), 4000, corpus.train, corpus.val)
    assert "holds token id 4000," in one_line_data_error(exc)


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "train, val, bad",
    [
        (np.array([3, -2, 300]), np.array([0, 255]), -2),  # the low end is named first
        (np.array([0, 255]), np.array([7, 256]), 256),  # only the validation split is bad
        (np.array([], np.int32), np.array([-1]), -1),
    ],
)
def test_token_ids_outside_the_vocabulary_are_refused_in_any_split(train, val, bad):
    data.check_token_ids("src", 256, np.array([0, 255]), np.array([], np.int64))  # in range
    with pytest.raises(data.DataError) as exc:
        data.check_token_ids("src", 256, train, val)
    assert one_line_data_error(exc) == (
        f"data.source: src holds token id {bad}, outside model.vocab_size=256"
    )


def _sparse_file(path: Path, size: int) -> Path:
    """A regular file of `size` bytes that takes no disk (a hole of zeros)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        f.truncate(size)
    return path


TOO_BIG = (
    "data.source: {} holds 3.0 MiB of text, more than 25% of the 8.0 MiB of memory available "
    "(pre-tokenized .npy/.bin files are memory-mapped instead)"
)


def test_text_beyond_a_quarter_of_the_memory_is_refused_unread(tmp_path, monkeypatch):
    monkeypatch.setattr(hardware, "host_memory_available", lambda: 8 * 2**20)
    one_file = _sparse_file(tmp_path / "big.txt", 3 * 2**20)
    directory = tmp_path / "texts"
    _sparse_file(directory / "a.txt", 2**20)  # each file fits, together they do not
    _sparse_file(directory / "sub" / "b.txt", 2 * 2**20)
    for source in (str(one_file), str(directory)):
        with pytest.raises(data.DataError) as exc:
            data.load_corpus(source, 0.1)
        assert one_line_data_error(exc) == TOO_BIG.format(source)
    with pytest.raises(data.DataError) as exc:
        data.load_corpus("stdlib", 0.0123)  # a val_fraction of its own: not cached
    assert re.fullmatch(
        r"data.source: stdlib holds [0-9.]+ MiB of text, more than 25% of the 8.0 MiB .*",
        one_line_data_error(exc),
    )
    tokens = np.lib.format.open_memmap(tmp_path / "big.npy", "w+", np.uint16, (3 * 2**19,))
    del tokens  # closed: a 3 MiB token file is mapped, not read, and is accepted
    corpus = data.load_corpus(str(tmp_path / "big.npy"), 0.1)
    assert len(corpus.train) + len(corpus.val) == 3 * 2**19


def test_text_beyond_the_memory_of_this_machine_is_refused_unread(tmp_path):
    available = hardware.host_memory_available()
    if available is None:
        pytest.skip("no /proc/meminfo")
    page = os.sysconf("SC_PAGE_SIZE")
    assert 0 < available <= page * os.sysconf("SC_PHYS_PAGES")
    if available >= 2**40:
        pytest.skip("this machine has 4 TiB available")
    big = _sparse_file(tmp_path / "huge.txt", 2**42)
    with pytest.raises(data.DataError) as exc:
        data.load_corpus(str(big), 0.1)
    assert re.fullmatch(
        rf"data.source: {re.escape(str(big))} holds 4.0 TiB of text, more than 25% of the "
        r"[0-9.]+ [KMGT]iB of memory available \(.*\)",
        one_line_data_error(exc),
    )


def test_sources_that_are_not_regular_files_are_refused_unread(tmp_path):
    """/dev/zero never ends and a FIFO blocks until a writer comes: read in a process of its
    own, with a memory cap and a deadline, so a regression fails instead of hanging or
    filling the machine's memory."""
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    code = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (4 * 2**30, 4 * 2**30))\n"
        "from sparsemodel import data\n"
        "for source in sys.argv[1:]:\n"
        "    try:\n        data.load_corpus(source, 0.1)\n"
        "    except data.DataError as e:\n        print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "/dev/zero", str(fifo)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.splitlines() == [
        "data.source: /dev/zero is not a regular file",
        f"data.source: {fifo} is not a regular file",
    ], done.stderr[-2000:]


def test_missing_source(tmp_path):
    with pytest.raises(data.DataError) as exc:
        data.load_corpus(str(tmp_path / "nope"), 0.1)
    assert "does not exist" in one_line_data_error(exc)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(data.DataError) as exc:
        data.load_corpus(str(path), 0.1)
    assert "is empty" in one_line_data_error(exc)


def test_empty_npy(tmp_path):
    path = tmp_path / "empty.npy"
    np.save(path, np.zeros((0,), np.int32))
    with pytest.raises(data.DataError) as exc:
        data.load_corpus(str(path), 0.1)
    assert "is empty" in one_line_data_error(exc)


@pytest.mark.parametrize("hidden", [False, True])
def test_directory_without_files(tmp_path, hidden):
    root = tmp_path / f"empty_dir_{hidden}"
    (root / "sub").mkdir(parents=True)
    if hidden:
        (root / ".only_a_dotfile").write_bytes(b"x" * 100)
    with pytest.raises(data.DataError) as exc:
        data.load_corpus(str(root), 0.1)
    assert "holds no files" in one_line_data_error(exc)


def test_check_length():
    tokens = np.zeros(33, np.uint8)  # 4 windows of 8 (+1)
    data.check_length(tokens, 8, 4, "train", "src")
    with pytest.raises(data.DataError) as exc:
        data.check_length(tokens, 8, 5, "val", "src")
    message = one_line_data_error(exc)
    assert "val split of src" in message and "train.seq_len=8" in message


def test_num_windows():
    assert data.num_windows(np.zeros(33), 8) == 4
    assert data.num_windows(np.zeros(32), 8) == 3  # the last window needs its target
    assert data.num_windows(np.zeros(1), 8) == 0
    assert data.num_windows(np.zeros(0), 8) == 0


# ---------------------------------------------------------------------- training batches

S = 8  # seq_len
N_WINDOWS = 48
TOKENS = np.arange(N_WINDOWS * S + 1, dtype=np.int64)  # window i starts with token i*S


def take(it, n):
    return [next(it) for _ in range(n)]


def batches(n, *args, **kwargs):
    """n batches of a fresh train_iterator, which is then dropped.

    Each grain iterator runs a 16-thread prefetch pool; with several alive at once on a
    2-core machine a test takes seconds, so the tests keep one alive at a time.
    """
    it = data.train_iterator(*args, **kwargs)
    out = take(it, n)
    del it
    return out


def window_ids(batch: np.ndarray) -> list[int]:
    return [int(r) // S for r in batch[:, 0]]


def test_train_batches_are_contiguous_windows():
    for b in batches(10, TOKENS, S, 8, seed=0):
        assert b.shape == (8, S + 1)
        assert b.dtype == np.int32
        for row in b:
            i = int(row[0]) // S
            assert int(row[0]) % S == 0
            np.testing.assert_array_equal(row, TOKENS[i * S : i * S + S + 1])


def test_train_batches_from_bytes_are_int32():
    tokens = np.frombuffer(random_text(np.random.default_rng(5), 300), np.uint8)
    batch = next(data.train_iterator(tokens, 16, 4, seed=0))
    assert batch.dtype == np.int32 and batch.shape == (4, 17)
    for row in batch:
        # Find the window by content: every row is some tokens[i*S : i*S+S+1].
        starts = [
            i
            for i in range(data.num_windows(tokens, 16))
            if (tokens[i * 16 : i * 16 + 17] == row).all()
        ]
        assert starts


def test_each_epoch_is_a_fresh_permutation():
    per_epoch = N_WINDOWS // 8
    ids = [i for b in batches(3 * per_epoch, TOKENS, S, 8, seed=0) for i in window_ids(b)]
    epochs = [ids[k * N_WINDOWS : (k + 1) * N_WINDOWS] for k in range(3)]
    for e in epochs:
        assert sorted(e) == list(range(N_WINDOWS))  # every window exactly once
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert epochs[0] != list(range(N_WINDOWS))  # shuffled


def test_same_seed_same_batches_other_seed_different():
    a = batches(12, TOKENS, S, 8, seed=7)
    b = batches(12, TOKENS, S, 8, seed=7)
    c = batches(12, TOKENS, S, 8, seed=8)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
    assert any(not np.array_equal(x, z) for x, z in zip(a, c, strict=True))


# 6 batches per epoch: resume at the start, at an epoch boundary, and mid-way through epoch 3.
@pytest.mark.parametrize("k", [0, 6, 13])
def test_resume_neither_replays_nor_skips(k):
    original = data.train_iterator(TOKENS, S, 8, seed=3)
    take(original, k)
    state = original.get_state()
    expected = take(original, 10)
    del original

    resumed = data.train_iterator(TOKENS, S, 8, seed=3)
    resumed.set_state(state)
    got = take(resumed, 10)
    for x, y in zip(expected, got, strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_state_is_plain_data():
    it = data.train_iterator(TOKENS, S, 8, seed=3)
    take(it, 4)
    state = it.get_state()
    # Checkpoints store it as JSON-like metadata.
    assert isinstance(state, dict)
    assert all(isinstance(v, int | float | str | bool) for v in state.values())


def test_two_processes_see_the_single_process_windows():
    seed = 11
    global_batch = 8
    n = 15  # more than two epochs
    single = batches(n, TOKENS, S, global_batch, seed)
    p0 = batches(n, TOKENS, S, global_batch, seed, process_index=0, process_count=2)
    p1 = batches(n, TOKENS, S, global_batch, seed, process_index=1, process_count=2)
    for b, b0, b1 in zip(single, p0, p1, strict=True):
        assert b0.shape == b1.shape == (global_batch // 2, S + 1)
        rows = collections.Counter(map(tuple, b.tolist()))
        assert collections.Counter(map(tuple, b0.tolist() + b1.tolist())) == rows


# ----------------------------------------------------------------------- eval batches

VAL = np.arange(40 * S + 1, dtype=np.int64)  # 40 windows


def test_eval_batches_shape_and_determinism():
    a = list(data.eval_batches(VAL, S, 8, max_batches=3))
    b = list(data.eval_batches(VAL, S, 8, max_batches=3))
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.shape == (8, S + 1) and x.dtype == np.int32
        for row in x:
            i = int(row[0]) // S
            np.testing.assert_array_equal(row, VAL[i * S : i * S + S + 1])


def test_eval_batches_spread_over_the_split():
    got = list(data.eval_batches(VAL, S, 4, max_batches=2))
    ids = [i for b in got for i in window_ids(b)]
    assert len(set(ids)) == len(ids) == 8
    assert min(ids) == 0 and max(ids) == 39  # first and last windows, not just the start


@pytest.mark.parametrize("max_batches, expected", [(None, 5), (2, 2), (5, 5), (100, 5)])
def test_eval_batches_count(max_batches, expected):
    got = list(data.eval_batches(VAL, S, 8, max_batches))
    assert len(got) == expected
    if max_batches is None:  # the whole split, each window once
        ids = sorted(i for b in got for i in window_ids(b))
        assert ids == list(range(40))


def test_eval_batches_too_short_yields_nothing():
    assert list(data.eval_batches(VAL[: 3 * S + 1], S, 8, None)) == []


@pytest.mark.parametrize("max_batches", [None, 3])
def test_eval_batches_two_processes_cover_the_single_process_batch(max_batches):
    single = list(data.eval_batches(VAL, S, 8, max_batches))
    p0 = list(data.eval_batches(VAL, S, 8, max_batches, process_index=0, process_count=2))
    p1 = list(data.eval_batches(VAL, S, 8, max_batches, process_index=1, process_count=2))
    assert len(single) == len(p0) == len(p1)
    for b, b0, b1 in zip(single, p0, p1, strict=True):
        assert b0.shape == b1.shape == (4, S + 1)
        rows = collections.Counter(map(tuple, b.tolist()))
        assert collections.Counter(map(tuple, b0.tolist() + b1.tolist())) == rows


# ---------------------------------------------------------------------------- entropy


def test_unigram_entropy():
    uniform = np.tile(np.arange(256, dtype=np.uint8), 10)
    assert data.unigram_entropy(uniform) == pytest.approx(math.log(256))
    assert data.unigram_entropy(np.full(1000, 7, np.uint8)) == 0.0
    two = np.array([0, 1] * 50, np.uint8)
    assert data.unigram_entropy(two) == pytest.approx(math.log(2))


# ------------------------------------------------------------------------- stdlib corpus


def test_stdlib_corpus():
    t0 = time.perf_counter()
    corpus = data.load_corpus("stdlib", 0.05)
    elapsed = time.perf_counter() - t0
    n_train, n_val = len(corpus.train), len(corpus.val)
    assert n_train > 10_000_000
    assert n_val > 100_000
    assert 0.01 < n_val / (n_train + n_val) < 0.10
    assert corpus.train.dtype == np.uint8
    assert "stdlib" in corpus.description
    assert elapsed < 30, f"reading the stdlib took {elapsed:.1f}s"


# ----------------------------------------------------------------------- tokenization


@pytest.fixture(scope="module")
def small_bpe():
    from sparsemodel import tokenizer

    text = random_text(np.random.default_rng(9), 2000)
    return tokenizer.train_bpe(np.frombuffer(text, np.uint8), 300)


def test_tokenize_bytes_is_the_corpus_itself(tmp_path):
    from sparsemodel import tokenizer

    write_corpus(tmp_path / "corpus")
    corpus = data.load_corpus(str(tmp_path / "corpus"), 0.2)
    assert data.tokenize(corpus, tokenizer.ByteTokenizer(), tmp_path) is corpus
    assert not (tmp_path / "tokens").exists()


def test_tokenize_bpe_round_trips_and_caches(tmp_path, small_bpe):
    write_corpus(tmp_path / "corpus")
    corpus = data.load_corpus(str(tmp_path / "corpus"), 0.2)
    lines = []
    ids = data.tokenize(corpus, small_bpe, tmp_path, log=lines.append)
    assert ids.train.dtype == np.uint16 and len(ids.train) < 0.8 * len(corpus.train)
    assert small_bpe.decode_bytes(ids.train) == as_bytes(corpus.train)
    assert small_bpe.decode_bytes(ids.val) == as_bytes(corpus.val)
    assert len(lines) == 1 and lines[0].startswith("tokenized ")
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 2

    again = data.tokenize(corpus, small_bpe, tmp_path, log=lines.append)
    assert len(lines) == 1  # read from the cache, not encoded again
    np.testing.assert_array_equal(again.train, ids.train)
    np.testing.assert_array_equal(again.val, ids.val)


def test_tokenize_cache_is_keyed_by_the_split(tmp_path, small_bpe):
    write_corpus(tmp_path / "corpus")
    data.tokenize(data.load_corpus(str(tmp_path / "corpus"), 0.2), small_bpe, tmp_path, log=print)
    other = data.load_corpus(str(tmp_path / "corpus"), 0.5)
    lines = []
    data.tokenize(other, small_bpe, tmp_path, log=lines.append)
    assert len(lines) == 1  # another split: encoded, not taken from the first cache
    assert len(list((tmp_path / "tokens").glob("*.npy"))) == 4


def test_tokenize_without_write_leaves_no_files(tmp_path, small_bpe):
    write_corpus(tmp_path / "corpus")
    corpus = data.load_corpus(str(tmp_path / "corpus"), 0.2)
    data.tokenize(corpus, small_bpe, tmp_path, write=False, log=lambda s: None)
    assert not (tmp_path / "tokens").exists()


def test_pretokenized_arrays_are_not_tokenized_again(tmp_path, small_bpe):
    path = tmp_path / "ids.npy"
    np.save(path, np.arange(1000, dtype=np.int32) % 300)
    corpus = data.load_corpus(str(path), 0.1)
    assert corpus.pretokenized
    assert data.tokenize(corpus, small_bpe, tmp_path) is corpus
    with pytest.raises(data.DataError) as exc:
        data.training_bytes(corpus, str(path))
    assert "is pre-tokenized" in one_line_data_error(exc)

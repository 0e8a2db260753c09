"""Corpus -> tokens -> a grain pipeline of fixed-length windows.

Sources (`data.source`):
  stdlib       the running interpreter's standard-library `.py` files (~30 MB of real text,
               in every Python install, so nothing is downloaded)
  a directory  every regular file under it (bytes: any encoding works)
  a text file  any file; the last `data.val_fraction` of it is the validation split
  .npy / .bin  a pre-tokenized array (.bin: raw uint16, the nanoGPT convention), memory-
               mapped, so it may be larger than the memory

Directories (and stdlib) split train/validation by a hash of each file's relative path, so
the split is the same on every machine and does not move when files are added.

`load_corpus` reads bytes; `tokenize` turns them into the ids of a tokenizer (bytes are
their own ids) and caches the result under the workdir, so a second run does not encode
30 MB again.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import grain
import jax
import numpy as np

from sparsemodel import hardware
from sparsemodel import tokenizer as tokenizer_lib
from sparsemodel.config import Config


class DataError(ValueError):
    """Bad data source; the message is one line naming the source and the reason."""


@dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # [N] token ids (bytes, uint8, until tokenized)
    val: np.ndarray  # [M] token ids
    description: str
    pretokenized: bool = False  # a .npy/.bin array: ids as stored, no tokenizer applies


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def load_corpus(source: str, val_fraction: float) -> Corpus:
    """Reads a source into train/validation token arrays (cached per process)."""
    return _load_corpus(source, val_fraction)


@functools.lru_cache(maxsize=4)
def _load_corpus(source: str, val_fraction: float) -> Corpus:
    if source == "stdlib":
        root = stdlib_root()
        files = [p for p in root.rglob("*.py") if "site-packages" not in p.parts]
        check_text_fits(files, source)
        train, val = _split_files(root, files, val_fraction)
        return Corpus(train, val, f"stdlib .py files of {root} ({len(files)} files)")
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"data.source: {source} does not exist")
    if path.is_dir():
        files = [
            p
            for p in path.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
        ]
        if not files:
            raise DataError(f"data.source: directory {source} holds no files")
        check_text_fits(files, source)
        train, val = _split_files(path, files, val_fraction)
        if len(train) + len(val) == 0:
            raise DataError(f"data.source: directory {source} holds only empty files")
        if len(val) == 0 or len(train) == 0:  # too few files for a split by file: split bytes
            train, val = _split_tail(np.concatenate([train, val]), val_fraction)
        return Corpus(train, val, f"{source} ({len(files)} files)")
    if not path.is_file():  # /dev/zero would be read forever, a FIFO wait for a writer
        raise DataError(f"data.source: {source} is not a regular file")
    tokens = read_tokens(path)
    train, val = _split_tail(tokens, val_fraction)
    return Corpus(train, val, f"{source}", pretokenized=path.suffix in (".npy", ".bin"))


def read_tokens(path: Path) -> np.ndarray:
    """One regular file as token ids: .npy / .bin arrays as stored (memory-mapped), anything
    else as bytes."""
    try:
        if path.suffix == ".npy":
            tokens = np.load(path, mmap_mode="r", allow_pickle=False).reshape(-1)
            if not np.issubdtype(tokens.dtype, np.integer):
                raise DataError(f"data.source: {path} holds {tokens.dtype}, not integer tokens")
        elif path.suffix == ".bin":
            size = path.stat().st_size
            if size % 2:
                raise DataError(
                    f"data.source: {path} has an odd number of bytes; .bin files hold uint16 tokens"
                )
            # np.memmap cannot map an empty file
            tokens = np.memmap(path, np.uint16, "r") if size else np.zeros(0, np.uint16)
        else:
            check_text_fits([path], str(path))
            tokens = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    except (OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"data.source: cannot read {path} ({e})") from None
    if tokens.size == 0:
        raise DataError(f"data.source: {path} is empty")
    return tokens


# Text is read into memory twice (the files, then their concatenation), and BPE encoding
# then holds two more copies of the bytes (one whole, one in chunks) and the ids as int64
# (8 bytes a token, a few tokens per 10 bytes of English): a quarter of the available memory
# leaves room for that. Text that BPE barely compresses can still need more.
TEXT_MEMORY_SHARE = 0.25


def check_text_fits(files: list[Path], source: str) -> None:
    """Refuses text whose total size exceeds TEXT_MEMORY_SHARE of the available memory."""
    n_bytes = sum(p.stat().st_size for p in files)
    available = hardware.host_memory_available()
    if available is not None and n_bytes > TEXT_MEMORY_SHARE * available:
        raise DataError(
            f"data.source: {source} holds {hardware.format_bytes(n_bytes)} of text, more than "
            f"{TEXT_MEMORY_SHARE:.0%} of the {hardware.format_bytes(available)} of memory "
            "available (pre-tokenized .npy/.bin files are memory-mapped instead)"
        )


def _split_files(root: Path, files: list[Path], val_fraction: float):
    train, val = [], []
    for p in sorted(files):
        digest = hashlib.sha256(str(p.relative_to(root)).encode()).digest()
        is_val = int.from_bytes(digest[:8], "little") / 2**64 < val_fraction
        (val if is_val else train).append(np.frombuffer(p.read_bytes(), dtype=np.uint8))
    join = lambda parts: np.concatenate(parts) if parts else np.zeros((0,), np.uint8)
    return join(train), join(val)


def _split_tail(tokens: np.ndarray, val_fraction: float):
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


# ----------------------------------------------------------------------- tokenization


def training_bytes(corpus: Corpus, source: str) -> np.ndarray:
    """The training split's bytes, to train a tokenizer on (uint8 [N])."""
    if corpus.pretokenized:
        raise DataError(
            f"data.source: {source} is pre-tokenized: no text to train data.tokenizer=bpe on "
            "(put the tokenizer.json that made it in the workdir)"
        )
    return corpus.train


def tokenize(corpus: Corpus, tok, cache_dir: Path | None, write=True, log=print) -> Corpus:
    """The corpus in `tok`'s ids; bytes stay as they are for the byte tokenizer.

    Encoded splits are cached as `<cache_dir>/tokens/<key>.{train,val}.npy`, the key a hash
    of the tokenizer and of the split bytes themselves (so a changed file or
    val_fraction never reuses stale ids). Files appear atomically; `write=False` (the
    non-lead processes of a multi-process run) only reads them. Encoding a corpus costs far
    more than reading its cached ids, so each tokenizer encodes each split once.
    """
    if tok.name == "byte" or corpus.pretokenized:
        return corpus
    key = _tokens_key(corpus, tok)
    paths = None if cache_dir is None else _cache_paths(Path(cache_dir), key)
    if paths is not None and all(p.exists() for p in paths):
        train, val = (np.load(p, allow_pickle=False) for p in paths)
    else:
        t0 = time.perf_counter()
        train, val = tok.encode_corpus(corpus.train), tok.encode_corpus(corpus.val)
        n_bytes = len(corpus.train) + len(corpus.val)
        log(
            f"tokenized {n_bytes:,} bytes into {len(train) + len(val):,} tokens "
            f"in {time.perf_counter() - t0:.1f}s"
        )
        if paths is not None and write:
            _save_atomic(paths[0], train)
            _save_atomic(paths[1], val)
    return Corpus(train, val, f"{corpus.description}, {tok.vocab_size}-token {tok.name} ids")


def _tokens_key(corpus: Corpus, tok) -> str:
    h = hashlib.sha256(tok.fingerprint.encode())
    for split in (corpus.train, corpus.val):
        h.update(len(split).to_bytes(8, "little"))
        h.update(hashlib.sha256(split.tobytes()).digest())
    return h.hexdigest()[:24]


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    return cache_dir / "tokens" / f"{key}.train.npy", cache_dir / "tokens" / f"{key}.val.npy"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """np.save to a temporary name, then rename; a read-only workdir just skips the cache."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)


def unigram_entropy(tokens: np.ndarray) -> float:
    """Entropy in nats of the unigram distribution: the loss a model with no context gets."""
    counts = np.bincount(tokens.astype(np.int64))
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def load_tokenized_corpus(cfg: Config, workdir: Path, log=print) -> Corpus:
    """The corpus in the workdir's tokenizer's ids (training the tokenizer the first time).

    With several processes, process 0 trains and writes tokenizer.json and the token
    cache; the others wait at a barrier, then read the same file (shared workdir).
    """
    raw = load_corpus(cfg.data.source, cfg.data.val_fraction)
    is_lead = jax.process_index() == 0
    tok = tokenizer_lib.for_workdir(
        cfg,
        workdir,
        lambda: training_bytes(raw, cfg.data.source),
        is_lead=is_lead,
        wait=_barrier("tokenizer.json"),
        log=log,
    )
    return tokenize(raw, tok, workdir, write=is_lead, log=log)


def _barrier(name: str):
    if jax.process_count() == 1:
        return lambda: None
    from jax.experimental import multihost_utils

    return lambda: multihost_utils.sync_global_devices(name)


# ------------------------------------------------------------------------- pipeline


def num_windows(tokens: np.ndarray, seq_len: int) -> int:
    """Non-overlapping windows of seq_len+1 tokens (inputs and shifted targets)."""
    return max(0, (len(tokens) - 1) // seq_len)


def check_token_ids(source: str, vocab_size: int, *token_arrays: np.ndarray) -> None:
    """Refuses ids outside [0, vocab_size): a large one indexes past the embedding (NaN
    loss), a negative one wraps around to another row (a plausible, wrong loss)."""
    for tokens in token_arrays:
        if tokens.size == 0:
            continue
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= vocab_size:
            raise DataError(
                f"data.source: {source} holds token id {low if low < 0 else high}, "
                f"outside model.vocab_size={vocab_size}"
            )


def check_length(tokens: np.ndarray, seq_len: int, need: int, split: str, source: str) -> None:
    if num_windows(tokens, seq_len) < need:
        raise DataError(
            f"data.source: the {split} split of {source} has {len(tokens)} tokens, too few for "
            f"{need} window(s) of train.seq_len={seq_len}"
        )


def windows(tokens: np.ndarray, seq_len: int) -> grain.MapDataset:
    """MapDataset: index i -> int32 window tokens[i*S : i*S + S + 1]."""
    n = num_windows(tokens, seq_len)
    return grain.MapDataset.range(n).map(
        lambda i: tokens[i * seq_len : i * seq_len + seq_len + 1].astype(np.int32)
    )


def train_iterator(
    tokens: np.ndarray,
    seq_len: int,
    global_batch: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.DatasetIterator:
    """Endless seeded-shuffle batches of this process's share of the global batch.

    Each epoch is a fresh permutation of the windows. Process p takes every P-th window,
    so the P processes together see exactly the windows of a single-process run. The
    iterator's `get_state()` goes into checkpoints so a resumed run neither replays nor
    skips data.
    """
    ds = windows(tokens, seq_len).shuffle(seed=seed).repeat()
    ds = ds[process_index::process_count].batch(global_batch // process_count, drop_remainder=True)
    # Slicing windows is cheap: a couple of threads and a short prefetch suffice (grain's
    # defaults start 16 threads per iterator).
    return iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4)))


def eval_batches(
    tokens: np.ndarray,
    seq_len: int,
    global_batch: int,
    max_batches: int | None,
    process_index: int = 0,
    process_count: int = 1,
):
    """Deterministic validation batches [b, S+1], spread evenly over the split.

    Yields at most `max_batches` global batches (None: the whole split); the last partial
    batch is dropped so every process runs the same number of steps.
    """
    n = num_windows(tokens, seq_len)
    n_batches = n // global_batch
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    if n_batches == 0:
        return
    # Evenly spaced windows cover the whole split, not just its first files.
    chosen = np.linspace(0, n - 1, n_batches * global_batch).astype(np.int64)
    ds = windows(tokens, seq_len)
    per_process = global_batch // process_count
    for b in range(n_batches):
        idx = chosen[b * global_batch : (b + 1) * global_batch][process_index::process_count]
        yield np.stack([ds[int(i)] for i in idx[:per_process]])

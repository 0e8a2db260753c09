"""Tokenizers: bytes (the default: token id = byte value) or a `tokenizers`-library JSON.

`data.tokenizer: bpe` trains a byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and
decoder, the 256 byte symbols always in the vocabulary) on the training split, once, and
keeps it as `<workdir>/tokenizer.json`. A tokenizer.json already in the workdir (an
imported checkpoint's own) is used as it is, whatever its kind. `for_workdir` is the one
place train, eval and generate get their tokenizer from.

Bits per byte stay comparable across tokenizers because every tokenizer can say how many
bytes of text each token id stands for (`byte_lengths`): eval divides its nats by the bytes
the evaluated tokens cover, not by their number.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Protocol

import numpy as np

from sparsemodel.config import Config, ConfigError

TOKENIZER_FILE = "tokenizer.json"
# Texts are encoded in pieces of about this many bytes, cut after a newline: encode_batch
# spreads them over the cores, and no one string holds a whole 30 MB corpus.
CHUNK_BYTES = 1 << 16


class Tokenizer(Protocol):
    name: str  # "byte" or "bpe"
    vocab_size: int  # one more than the largest id it produces
    fingerprint: str  # changes whenever the text -> ids mapping changes (cache keys)

    def encode(self, text: str | bytes) -> np.ndarray: ...

    def encode_prompt(self, text: str) -> np.ndarray: ...

    def encode_corpus(self, raw: np.ndarray) -> np.ndarray: ...

    def decode(self, ids) -> str: ...

    def byte_lengths(self) -> np.ndarray: ...


def storage_dtype(vocab_size: int) -> np.dtype:
    """The smallest dtype that holds every id: uint8 bytes, uint16 up to 65,536 tokens."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


# -------------------------------------------------------------------------------- bytes


class ByteTokenizer:
    """Token id = byte value (vocab 256), so bits per byte = bits per token."""

    name = "byte"
    vocab_size = 256
    fingerprint = "byte"

    def encode(self, text: str | bytes) -> np.ndarray:
        raw = text.encode("utf-8") if isinstance(text, str) else text
        return np.frombuffer(raw, dtype=np.uint8).astype(np.int32)

    def encode_prompt(self, text: str) -> np.ndarray:
        return self.encode(text)

    def encode_corpus(self, raw: np.ndarray) -> np.ndarray:
        """A corpus' bytes are already its tokens."""
        return raw

    def decode(self, ids) -> str:
        """Ids past 255 (a model with more embedding rows than bytes) decode to nothing."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        return np.ones(self.vocab_size, np.int64)


# ------------------------------------------------------------------------ tokenizers JSON


def _gpt2_byte_symbols() -> list[str]:
    """The printable character that byte-level BPE writes for each byte value 0..255.

    GPT-2's table (the `tokenizers` ByteLevel pre-tokenizer uses the same one): printable
    Latin-1 bytes stand for themselves, the rest are shifted to U+0100 and up.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    symbols, shifted = {}, 0
    for b in range(256):
        if b in keep:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + shifted)
            shifted += 1
    return [symbols[b] for b in range(256)]


BYTE_SYMBOLS = _gpt2_byte_symbols()
_SYMBOL_TO_BYTE = {s: b for b, s in enumerate(BYTE_SYMBOLS)}
# Bytes that are not UTF-8 come out of decode(..., "surrogateescape") as U+DC80..U+DCFF.
_ESCAPED_BYTES = re.compile("([\udc80-\udcff]+)")
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class JsonTokenizer:
    """Any `tokenizers`-library tokenizer (tokenizer.json), made to encode arbitrary bytes.

    The library encodes text (valid UTF-8) only. Runs of other bytes are mapped to the
    tokenizer's own byte tokens: the byte-level symbols of a ByteLevel BPE (so encoding is
    exact for any bytes, and decode(encode(b)) == b), or `<0xNN>` byte-fallback tokens
    (Llama/Mistral style); a tokenizer with neither gets U+FFFD in their place (lossy).
    """

    name = "bpe"

    def __init__(self, tok, path: Path | str = "<memory>"):
        self._tok = tok
        self.path = str(path)
        spec = json.loads(tok.to_str())
        self.fingerprint = hashlib.sha256(tok.to_str().encode()).hexdigest()
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._special = {i for i, added in tok.get_added_tokens_decoder().items() if added.special}
        self.is_byte_level = _is_byte_level(spec, vocab)
        self._byte_ids = self._byte_token_ids(vocab)
        self._token_bytes = self._all_token_bytes() if self.is_byte_level else None
        self._byte_lengths: np.ndarray | None = None

    @classmethod
    def from_file(cls, path: Path) -> JsonTokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        try:
            return cls(HFTokenizer.from_file(str(path)), path)
        except Exception as e:  # the library raises plain Exception on a bad file
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ConfigError(
                f"data.tokenizer: {path} is not a tokenizers-library JSON ({reason:.200})"
            ) from None

    def save(self, path: Path) -> None:
        """Writes tokenizer.json atomically (temp file + rename): readers never see half."""
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._tok.save(str(tmp))
        os.replace(tmp, path)

    # --- encoding

    def encode(self, text: str | bytes) -> np.ndarray:
        """Ids of a text (no special tokens added), int32 [N]."""
        raw = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        return self._encode_pieces([raw])[0].astype(np.int32)

    def encode_prompt(self, text: str) -> np.ndarray:
        """Ids of a prompt with the tokenizer's own start-of-sequence tokens (e.g. Llama's
        `<s>`, which an imported model expects at the start of a text; a trained byte-level
        BPE adds none)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=True).ids, np.int32)

    def encode_corpus(self, raw: np.ndarray) -> np.ndarray:
        """A whole corpus (uint8 [N]) -> ids in the storage dtype, in newline-cut chunks."""
        pieces = list(_chunks(raw.tobytes()))
        out = []
        for start in range(0, len(pieces), 256):  # bounds the library's per-call memory
            out.extend(self._encode_pieces(pieces[start : start + 256]))
        ids = np.concatenate(out) if out else np.zeros((0,), np.int64)
        return ids.astype(storage_dtype(self.vocab_size))

    def _encode_pieces(self, raws: list[bytes]) -> list[np.ndarray]:
        """Each byte string -> int64 ids: text runs through the library (one batched call),
        runs of non-UTF-8 bytes through the byte tokens."""
        parts = [_ESCAPED_BYTES.split(r.decode("utf-8", "surrogateescape")) for r in raws]
        texts = [p for split in parts for p in split[0::2] if p]
        encoded = iter(self._tok.encode_batch_fast(texts, add_special_tokens=False))
        out = []
        for split in parts:
            ids = []
            for k, part in enumerate(split):
                if k % 2 == 0:
                    if part:
                        ids.append(np.asarray(next(encoded).ids, np.int64))
                else:
                    ids.append(self._encode_bad_bytes(part))
            out.append(np.concatenate(ids) if ids else np.zeros((0,), np.int64))
        return out

    def _encode_bad_bytes(self, escaped: str) -> np.ndarray:
        values = [ord(c) - 0xDC00 for c in escaped]  # surrogateescape: U+DC80 + (byte - 0x80)
        if self._byte_ids is not None:
            return self._byte_ids[values]
        replaced = "\ufffd" * len(values)
        return np.asarray(self._tok.encode(replaced, add_special_tokens=False).ids, np.int64)

    def _byte_token_ids(self, vocab: dict[str, int]) -> np.ndarray | None:
        """Id of the token for each byte value, or None when the vocabulary lacks some."""
        names = BYTE_SYMBOLS if self.is_byte_level else [f"<0x{b:02X}>" for b in range(256)]
        ids = [vocab.get(n) for n in names]
        return None if None in ids else np.asarray(ids, np.int64)

    # --- decoding

    def decode_bytes(self, ids) -> bytes:
        """The bytes of a token sequence: exact for byte-level BPE (special tokens skipped)."""
        ids = [int(i) for i in ids]
        if self._token_bytes is not None:
            n = len(self._token_bytes)
            return b"".join(self._token_bytes[i] for i in ids if 0 <= i < n)
        return self.decode(ids).encode("utf-8")

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self._token_bytes is not None:
            return self.decode_bytes(ids).decode("utf-8", errors="replace")
        ids = [i for i in ids if 0 <= i < self.vocab_size]  # padded embedding rows
        return self._tok.decode(ids, skip_special_tokens=True)

    # --- bytes per token

    def byte_lengths(self) -> np.ndarray:
        """Bytes of text each id stands for, int64 [vocab_size]; special tokens count 0.

        Exact for byte-level BPE (each token is a byte string). For other tokenizers it is
        approximate: `<0xNN>` byte-fallback tokens count 1, others the UTF-8 length of
        their decoding alone, plus one for a leading SentencePiece `▁` (a space the
        decoder drops at the start of a text); normalizers and decoders that merge
        tokens can make the sum differ from the text's length by a few percent.
        """
        if self._byte_lengths is None:
            self._byte_lengths = self._count_byte_lengths()
        return self._byte_lengths

    def _count_byte_lengths(self) -> np.ndarray:
        if self._token_bytes is not None:
            return np.asarray([len(b) for b in self._token_bytes], np.int64)
        lengths = np.zeros(self.vocab_size, np.int64)
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if token is None or i in self._special:
                continue
            if _BYTE_FALLBACK.fullmatch(token):
                lengths[i] = 1
                continue
            text = self._tok.decode([i], skip_special_tokens=True)
            lengths[i] = len(text.encode("utf-8")) + (
                token.startswith("\u2581") and not text.startswith(" ")
            )
        return lengths

    def _all_token_bytes(self) -> list[bytes]:
        """Bytes of every id of a byte-level vocabulary (b"" for holes and special tokens)."""
        added = self._tok.get_added_tokens_decoder()
        out = []
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if token is None or i in self._special:
                out.append(b"")
            elif i in added or any(c not in _SYMBOL_TO_BYTE for c in token):
                out.append(token.encode("utf-8"))  # an added token is its literal text
            else:
                out.append(bytes(_SYMBOL_TO_BYTE[c] for c in token))
        return out


def _is_byte_level(spec: dict, vocab: dict[str, int]) -> bool:
    """A ByteLevel decoder and every byte symbol in the vocabulary: ids are byte strings."""
    decoder = spec.get("decoder") or {}
    decoders = (
        decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]
    )
    has_byte_decoder = any(d.get("type") == "ByteLevel" for d in decoders)
    return has_byte_decoder and all(s in vocab for s in BYTE_SYMBOLS)


def _chunks(raw: bytes, size: int = CHUNK_BYTES) -> Iterator[bytes]:
    """Cuts bytes into pieces of at most `size`, after the last newline where there is one."""
    i = 0
    while i < len(raw):
        j = len(raw)
        if i + size < len(raw):
            j = raw.rfind(b"\n", i, i + size) + 1
            if j <= i:
                j = i + size
        yield raw[i:j]
        i = j


# -------------------------------------------------------------------------- training


def train_bpe(raw: np.ndarray, vocab_size: int) -> JsonTokenizer:
    """Trains a byte-level BPE with `vocab_size` tokens on a corpus' bytes (uint8 [N]).

    Deterministic: the same bytes give the same tokenizer.json. Non-UTF-8 bytes are left
    out of the merge statistics (they are always encodable: the 256 byte symbols are the
    initial alphabet). Training on a whole corpus is slow, so a workdir trains once and
    keeps its tokenizer.json.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_utf8_texts(raw), trainer)
    return JsonTokenizer(tok)


def _utf8_texts(raw: np.ndarray) -> Iterable[str]:
    for piece in _chunks(raw.tobytes()):
        yield from _ESCAPED_BYTES.split(piece.decode("utf-8", "surrogateescape"))[0::2]


# ---------------------------------------------------------------------- the one place


def for_workdir(
    cfg: Config,
    workdir: str | Path,
    train_bytes: Callable[[], np.ndarray] | None = None,
    *,
    is_lead: bool = True,
    wait: Callable[[], None] = lambda: None,
    log=print,
) -> Tokenizer:
    """The tokenizer of a workdir: train, eval and generate all get theirs here.

    `data.tokenizer: byte` -> ByteTokenizer. `bpe` -> `<workdir>/tokenizer.json` as it is
    (whatever kind it is); if there is none and `train_bytes` is given (training), a
    byte-level BPE of `model.vocab_size` tokens is trained on train_bytes() and written
    there. With several processes the lead (is_lead) trains and writes; every training
    process then calls `wait()` (a barrier) and reads the file: the workdir is on a shared
    filesystem anyway, for checkpoints.
    """
    if cfg.data.tokenizer == "byte":
        return ByteTokenizer()
    path = Path(workdir) / TOKENIZER_FILE
    if train_bytes is None and not path.exists():
        raise ConfigError(
            f"--workdir {workdir}: no {TOKENIZER_FILE} (data.tokenizer=bpe; train first)"
        )
    if train_bytes is not None:
        # Every process reaches the barrier, whether or not the file was already there.
        if is_lead and not path.exists():
            t0 = time.perf_counter()
            trained = train_bpe(train_bytes(), cfg.model.vocab_size)
            trained.save(path)
            log(
                f"trained a byte-level BPE of {trained.vocab_size} tokens (model.vocab_size="
                f"{cfg.model.vocab_size}) on the training split in "
                f"{time.perf_counter() - t0:.1f}s: {path}"
            )
        wait()
    tok = JsonTokenizer.from_file(path)
    check_vocab_size(tok, cfg, path)
    return tok


def check_vocab_size(tok: Tokenizer, cfg: Config, path: Path) -> None:
    """A tokenizer may have fewer ids than the model's (padded embeddings), never more."""
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
            f"{tok.vocab_size} tokens of {path}"
        )

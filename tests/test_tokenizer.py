"""Tokenizers: byte-level BPE round trips on any bytes, is trained once per workdir and
used by train, eval and generate; bits per byte count the bytes tokens stand for; any
tokenizers-library JSON (here a Llama-style SentencePiece BPE) works as it is."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from tokenizers import pre_tokenizers

from sparsemodel import cli, config, evaluate, sharding, train
from sparsemodel import tokenizer as tk
from sparsemodel.config import ConfigError
from sparsemodel.initialize import init_params

VOCABULARY = """
def return import class self for while if else lambda yield with try except the of and a
to in is that it was on by from this model expert token router batch café naïve Übergröße
☃ 日本語 🎉 x0 y1 __init__ np.zeros(3)
"""
WORDS = VOCABULARY.split()


def random_text(seed: int, n_words: int) -> str:
    rng = np.random.default_rng(seed)
    words = rng.choice(WORDS, size=n_words)
    seps = rng.choice([" ", " ", " ", "\n", ", ", ".\n", "\n    "], size=n_words)
    return "".join(w + s for w, s in zip(words, seps, strict=True))


def as_array(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, np.uint8)


@pytest.fixture(scope="module")
def bpe() -> tk.JsonTokenizer:
    return tk.train_bpe(as_array(random_text(0, 3000).encode()), 400)


def tricky_bytes() -> list[bytes]:
    rng = np.random.default_rng(1)
    return [
        b"",
        b"plain ascii\n",
        "unicode: café ☃ 日本語 🎉 e\u0301 \u200b".encode(),
        bytes(range(256)),  # every byte, most not UTF-8
        b"\xff\xfe\x00 half a char \xe2\x98 then \x80\x80",
        "☃".encode()[:2] + b"\n" + "🎉".encode()[1:],
        rng.integers(0, 256, 5000, dtype=np.uint8).tobytes(),
        random_text(2, 400).encode() + b"\xc3" + random_text(3, 400).encode(),
    ]


# --------------------------------------------------------------------- byte-level BPE


def test_byte_symbols_are_the_library_alphabet():
    assert len(set(tk.BYTE_SYMBOLS)) == 256
    assert set(tk.BYTE_SYMBOLS) == set(pre_tokenizers.ByteLevel.alphabet())
    assert tk.BYTE_SYMBOLS[ord(" ")] == "\u0120"  # GPT-2's 'Ġ'


def test_trained_bpe_is_byte_level_with_merges(bpe):
    assert bpe.is_byte_level
    assert bpe.vocab_size == 400
    ids = bpe.encode("def return import")
    assert len(ids) < len("def return import") / 2  # words became single tokens


@pytest.mark.parametrize("case", range(len(tricky_bytes())))
def test_bpe_round_trip_on_any_bytes(bpe, case):
    raw = tricky_bytes()[case]
    ids = bpe.encode(raw)
    assert ids.dtype == np.int32 and (ids < bpe.vocab_size).all()
    assert bpe.decode_bytes(ids) == raw
    assert bpe.byte_lengths()[ids].sum() == len(raw)  # exact for byte-level BPE
    if raw.decode("utf-8", "ignore").encode() == raw:  # valid UTF-8: str round trip too
        assert bpe.decode(bpe.encode(raw.decode())) == raw.decode()


def test_encode_corpus_matches_and_round_trips_across_chunks(bpe):
    raw = random_text(4, 30_000).encode() + bytes(range(256))
    assert len(raw) > 2 * tk.CHUNK_BYTES
    ids = bpe.encode_corpus(as_array(raw))
    assert ids.dtype == np.uint16
    assert bpe.decode_bytes(ids) == raw
    # Chunks are cut after newlines, so the ids are those of the text's lines.
    assert b"".join(tk._chunks(raw, 100)) == raw
    assert all(c.endswith(b"\n") or len(c) == 100 for c in list(tk._chunks(raw, 100))[:-1])


def test_training_is_deterministic(bpe):
    again = tk.train_bpe(as_array(random_text(0, 3000).encode()), 400)
    assert again.fingerprint == bpe.fingerprint


def test_storage_dtype():
    assert tk.storage_dtype(256) == np.uint8
    assert tk.storage_dtype(257) == np.uint16
    assert tk.storage_dtype(65_536) == np.uint16
    assert tk.storage_dtype(65_537) == np.int32


def test_byte_tokenizer_is_unchanged():
    tok = tk.ByteTokenizer()
    raw = bytes(range(256))
    np.testing.assert_array_equal(tok.encode(raw), np.arange(256))
    np.testing.assert_array_equal(tok.encode_corpus(as_array(raw)), np.arange(256))
    np.testing.assert_array_equal(tok.byte_lengths(), np.ones(256))
    assert tok.decode(tok.encode("café ☃")) == "café ☃"
    assert tok.decode([99, 300, 97]) == "ca"  # ids past 255 (padded vocab) decode to nothing


# ----------------------------------------------------------------- other tokenizer JSON


def llama_style_tokenizer():
    """A SentencePiece-style BPE as Llama/Mistral ship it: `▁` for spaces, `<0xNN>` byte
    fallback tokens, `<s>` added at the start by the post-processor; not byte-level."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors

    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    chars = sorted(set(random_text(0, 2000).replace(" ", "\u2581")) | {"\u2581"})
    merges = [("\u2581", "t"), ("\u2581t", "h"), ("\u2581th", "e"), ("e", "r"), ("\u2581", "a")]
    vocab = {p: i for i, p in enumerate(pieces + chars + ["".join(m) for m in merges])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return tok


def test_any_tokenizer_json_works_as_is(tmp_path):
    (tmp_path / "tokenizer.json").write_text(llama_style_tokenizer().to_str())
    cfg = config.load("tiny", {"data.tokenizer": "bpe", "model.vocab_size": 512})
    tok = tk.for_workdir(cfg, tmp_path)  # no train_bytes: never trains over an existing file
    assert not tok.is_byte_level
    text = "the other expert € made the batch"  # € is not in the vocabulary: byte fallback
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert "<0xE2>" in [tok._tok.id_to_token(int(i)) for i in ids]
    assert tok.encode_prompt(text)[0] == 1  # <s>, as the post-processor adds
    assert tok.decode(tok.encode_prompt(text)) == text  # special tokens skipped
    # Per-id byte counts are approximate for such tokenizers: here the one byte too many is
    # the space that SentencePiece's normalizer puts before every encoded text.
    long = random_text(5, 500).replace("\n", " ")
    assert tok.byte_lengths()[tok.encode(long)].sum() == len(long.encode()) + 1
    # Bytes that are not UTF-8 map to the byte-fallback tokens (decoding is lossy: U+FFFD).
    bad = tok.encode(b"ok \xff")
    assert tok._tok.id_to_token(int(bad[-1])) == "<0xFF>"


def test_vocab_larger_than_the_model_is_one_line(tmp_path, bpe):
    bpe.save(tmp_path / "tokenizer.json")
    cfg = config.load("tiny", {"data.tokenizer": "bpe", "model.vocab_size": 300})
    with pytest.raises(ConfigError) as exc:
        tk.for_workdir(cfg, tmp_path)
    assert str(exc.value) == (
        f"model.vocab_size: 300 is smaller than the 400 tokens of {tmp_path}/tokenizer.json"
    )


def test_eval_of_a_bpe_workdir_without_tokenizer_json(tmp_path):
    cfg = config.load("tiny", {"data.tokenizer": "bpe", "model.vocab_size": 512})
    with pytest.raises(ConfigError, match="no tokenizer.json"):
        tk.for_workdir(cfg, tmp_path)


# -------------------------------------------------------------------- stored and reused


def test_trained_once_then_reused(tmp_path):
    cfg = config.load("tiny", {"data.tokenizer": "bpe", "model.vocab_size": 300})
    raw = as_array(random_text(6, 2000).encode())
    calls = []

    def train_bytes():
        calls.append(1)
        return raw

    first = tk.for_workdir(cfg, tmp_path, train_bytes, log=lambda s: None)
    path = tmp_path / "tokenizer.json"
    mtime = path.stat().st_mtime_ns
    second = tk.for_workdir(cfg, tmp_path, train_bytes, log=lambda s: None)
    assert calls == [1]
    assert path.stat().st_mtime_ns == mtime
    assert first.fingerprint == second.fingerprint
    assert json.loads(path.read_text())["pre_tokenizer"]["type"] == "ByteLevel"
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed


# ---------------------------------------------------------------- train, eval, generate


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(random_text(7, 12_000))
    return path


@pytest.fixture(scope="module")
def bpe_workdir(tmp_path_factory, text_file):
    """tiny, data.tokenizer=bpe, vocab 512, 6 steps on a 60 KB text file; returns the
    workdir and the log lines of both the first run (4 steps) and the resumed one."""
    w = tmp_path_factory.mktemp("bpe") / "w"
    settings = {
        "data.tokenizer": "bpe",
        "model.vocab_size": 512,
        "data.source": str(text_file),
        "train.steps": 6,
        "train.eval_every": 100,
    }
    cfg = config.load("tiny", settings)
    first, second = [], []
    train.run(cfg, w, stop_after=4, log=first.append)
    stamps = {p.name: p.stat().st_mtime_ns for p in [w / "tokenizer.json", *w.glob("tokens/*")]}
    train.run(cfg, w, log=second.append)
    return w, first, second, stamps


def test_training_trains_the_tokenizer_once_and_caches_tokens(bpe_workdir):
    w, first, second, stamps = bpe_workdir
    assert any(line.startswith("trained a byte-level BPE of ") for line in first)
    assert any(line.startswith("tokenized ") for line in first)
    # The resumed run neither retrains nor re-tokenizes: same files, untouched.
    assert not any(line.startswith(("trained a", "tokenized ")) for line in second)
    now = {p.name: p.stat().st_mtime_ns for p in [w / "tokenizer.json", *w.glob("tokens/*")]}
    assert now == stamps and len(stamps) == 3  # tokenizer.json + train and val ids
    assert any("-token bpe ids" in line for line in second)


def test_eval_and_generate_use_the_workdir_tokenizer(bpe_workdir, text_file, capsys):
    w = bpe_workdir[0]
    assert cli.main(["eval", "--workdir", str(w), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["step"] == 6 and math.isfinite(res["bits_per_byte"])
    # BPE tokens cover ~3 bytes each: bits per byte well below bits per token.
    assert res["bits_per_byte"] < 0.6 * res["loss"] / math.log(2)

    assert cli.main(["eval", "--workdir", str(w), "--data", str(text_file)]) == 0
    assert "bits/byte" in capsys.readouterr().out

    r = evaluate.restore(w)
    out = evaluate.generate(r, "def café", 12, temperature=0.0)
    assert isinstance(out, str) and out
    assert (
        cli.main(["generate", "--workdir", str(w), "--prompt", "the", "--max-new-tokens", "5"]) == 0
    )
    assert capsys.readouterr().out.startswith("the")
    with pytest.raises(ConfigError, match="--prompt: must not be empty"):
        evaluate.generate(r, "", 4)


def test_bits_per_byte_equals_a_direct_computation(bpe_workdir, text_file):
    """nats / (ln 2 x the bytes of text the evaluated targets decode to)."""
    w = bpe_workdir[0]
    r = evaluate.restore(w)
    tok = r.tokenizer()
    raw = text_file.read_bytes()
    seq, batch = r.cfg.train.seq_len, 8
    tokens = tok.encode_corpus(as_array(raw))
    n_windows = (len(tokens) - 1) // (seq * batch) * batch
    tokens = tokens[: n_windows * seq + 1]  # whole batches: every window is evaluated once
    path = text_file.parent / "eval-tokens.npy"
    np.save(path, tokens.astype(np.int32))
    res = evaluate.evaluate(r, str(path), max_tokens=None, batch_size=batch)
    assert res.tokens == n_windows * seq
    # The targets are every token but the first: the text from the end of the first
    # token to the end of the last.
    covered = raw[len(tok.decode_bytes(tokens[:1])) : len(tok.decode_bytes(tokens))]
    assert tok.decode_bytes(tokens[1:]) == covered
    direct = res.loss * res.tokens / math.log(2) / len(covered)
    assert res.bits_per_byte == pytest.approx(direct, rel=1e-12)


def test_byte_tokenizer_bits_per_byte_is_bits_per_token(tmp_path, text_file):
    """Freshly initialised parameters suffice (no training): only the arithmetic matters."""
    cfg = config.load("tiny", {"data.source": str(text_file)})
    mesh = sharding.make_mesh(cfg.mesh)
    graphdef, params = init_params(cfg, mesh, seed=0)
    r = evaluate.Restored(cfg, 0, graphdef, params, mesh, tmp_path)
    res = evaluate.evaluate(r, max_tokens=2048)
    assert res.bits_per_byte == res.loss / math.log(2)  # exactly, as before
    assert not (tmp_path / "tokens").exists()  # bytes are not re-encoded or cached

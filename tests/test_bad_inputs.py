"""Every bad input gets one line naming what is wrong, and exit status 2.

The table reads as documentation: the command line, then the exact line it prints (after
"sparsemodel: error: "). `{w}` is a trained workdir, `{t}` a scratch directory, and
`{bad_val}` a copy of `{w}` whose data.source holds an id outside the vocabulary in its
validation split only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import pytest

from sparsemodel import cli, config, evaluate, hardware, tokenizer, train

BAD = [
    # --- config keys and values
    ("train --config tiny --set model.foo=1", "model.foo: unknown key"),
    (
        "train --config tiny --set foo.bar=1",
        "foo: unknown config section (model, moe, train, data, mesh)",
    ),
    (
        "train --config tiny --set moe.top_k",
        "--set 'moe.top_k': expected key=value, e.g. moe.top_k=2",
    ),
    (
        "train --config tiny --set model.d_model=abc",
        "model.d_model: expected an integer, got 'abc'",
    ),
    (
        "train --config tiny --set model.d_model=64.5",
        "model.d_model: expected an integer, got 64.5",
    ),
    (
        "train --config tiny --set model.tie_embeddings=maybe",
        "model.tie_embeddings: expected true or false, got 'maybe'",
    ),
    ("train --config tiny --set model.d_model=0", "model.d_model: must be positive, got 0"),
    ("train --config tiny --set model.n_layers=-2", "model.n_layers: must be positive, got -2"),
    ("train --config tiny --set train.batch_size=0", "train.batch_size: must be positive, got 0"),
    ("train --config tiny --set train.seq_len=1", "train.seq_len: must be >= 2, got 1"),
    ("train --config tiny --set train.lr=-1", "train.lr: must be positive, got -1.0"),
    ("train --config tiny --set moe.top_k=5", "moe.top_k: 5 exceeds moe.num_experts=4"),
    (
        "train --config tiny --set moe.capacity_factor=0",
        "moe.capacity_factor: must be positive, got 0.0",
    ),
    (
        "train --config tiny --set moe.router=hash",
        "moe.router: 'hash' is not one of topk, expert_choice",
    ),
    (
        "train --config tiny --set model.n_heads=3",
        "model.d_model: 64 is not divisible by model.n_heads=3",
    ),
    ("train --config tiny --set train.seed=-1", "train.seed: must be in [0, 2**32 - 1], got -1"),
    (
        "train --config tiny --set train.seed=4294967296",
        "train.seed: must be in [0, 2**32 - 1], got 4294967296",
    ),
    (
        "train --config tiny --set model.n_kv_heads=3",
        "model.n_heads: 4 is not divisible by model.n_kv_heads=3",
    ),
    (
        "train --config tiny --set moe.every=3",
        "moe.every: model.n_layers - moe.first_dense = 2 is not a multiple of 3",
    ),
    (
        "train --config tiny --set mesh.data=-1 mesh.expert=-1",
        "mesh.expert: only one axis may be -1",
    ),
    (
        "train --config tiny --set mesh.data=2",
        "mesh: data=2 x fsdp=1 x expert=1 x tensor=1 = 2 devices, but 1 are present",
    ),
    (
        "train --config tiny --set train.batch_size=6 train.grad_accum=4",
        "train.batch_size: 6 is not divisible by train.grad_accum=4",
    ),
    # --- config files
    (
        "train --config nope",
        "--config nope: not a file and not a preset "
        "(gpt4-scale, gpu-1b, gpu-1b-dense, small, small-dense, tiny)",
    ),
    ("train --config {t}/missing.yaml", "--config {t}/missing.yaml: no such file"),
    (
        "train --config {t}/bad.yaml",
        "config file {t}/bad.yaml: not valid YAML/TOML (while parsing a flow sequence)",
    ),
    (
        "train --config {t}/bad.toml",
        "config file {t}/bad.toml: not valid YAML/TOML (Expected "
        "'=' after a key in a key/value pair (at line 1, column 7))",
    ),
    (
        "train --config {t}/evil.yaml",
        "config file {t}/evil.yaml: not valid YAML/TOML (could not determine a constructor "
        "for the tag 'tag:yaml.org,2002:python/object/apply:os.system')",
    ),
    (
        "train --config {t}/list.yaml",
        "config file {t}/list.yaml: expected a mapping of sections, got [1, 2]",
    ),
    (
        "train --config {t}/dup-key.yaml",
        "config file {t}/dup-key.yaml: not valid YAML/TOML (duplicate key 'd_model' at line 1)",
    ),
    (
        "train --config {t}/dup-section.yaml",
        "config file {t}/dup-section.yaml: not valid YAML/TOML (duplicate key 'model' at line 2)",
    ),
    ("train --config {t}/fifo.yaml", "--config {t}/fifo.yaml: not a regular file"),
    # --- data
    (
        "train --config tiny --set data.source={t}/none.txt",
        "data.source: {t}/none.txt does not exist",
    ),
    ("train --config tiny --set data.source={t}/empty.txt", "data.source: {t}/empty.txt is empty"),
    (
        "train --config tiny --set data.source={t}/emptydir",
        "data.source: directory {t}/emptydir holds no files",
    ),
    (
        "train --config tiny --set data.source={t}/short.txt",
        "data.source: the train split of "
        "{t}/short.txt has 95 tokens, too few for 8 window(s) of train.seq_len=32",
    ),
    (
        "train --config tiny --set data.source={t}/floats.npy",
        "data.source: {t}/floats.npy holds float64, not integer tokens",
    ),
    (
        "train --config tiny --set data.source={t}/fifo.txt",
        "data.source: {t}/fifo.txt is not a regular file",
    ),
    (
        "train --config tiny --set data.source={t}/big.npy",
        "data.source: {t}/big.npy holds token id 999, outside model.vocab_size=256",
    ),
    (
        "train --config tiny --set data.source={t}/negative.npy",
        "data.source: {t}/negative.npy holds token id -1, outside model.vocab_size=256",
    ),
    (
        "train --config tiny --stop-after 1 --set data.source={t}/bad-val.npy",
        "data.source: {t}/bad-val.npy holds token id 256, outside model.vocab_size=256",
    ),
    (
        "eval --workdir {w} --data {t}/big.bin",
        "data.source: {t}/big.bin holds token id 999, outside model.vocab_size=256",
    ),
    (
        "eval --workdir {w} --data {t}/negative.npy",
        "data.source: {t}/negative.npy holds token id -1, outside model.vocab_size=256",
    ),
    (
        "eval --workdir {bad_val}",
        "data.source: {t}/bad-val.npy (validation split) holds token id 256, "
        "outside model.vocab_size=256",
    ),
    ("eval --workdir {w} --data {t}/fifo.txt", "data.source: {t}/fifo.txt is not a regular file"),
    (
        "profile --config tiny --steps 1 --no-flop-count --set data.source={t}/big.npy",
        "data.source: {t}/big.npy holds token id 999, outside model.vocab_size=256",
    ),
    # --- tokenizers
    (
        "train --config tiny --set data.tokenizer=wordpiece",
        "data.tokenizer: 'wordpiece' is not one of byte, bpe",
    ),
    (
        "train --config tiny --set data.tokenizer=bpe",
        "model.vocab_size: data.tokenizer=bpe needs >= 257 (256 bytes + merges), got 256",
    ),
    (
        "train --config tiny --set data.tokenizer=bpe model.vocab_size=2147483648",
        "model.vocab_size: data.tokenizer=bpe needs < 2**31 (int32 token ids), got 2147483648",
    ),
    (
        "train --config tiny --set model.vocab_size=100",
        "model.vocab_size: data.tokenizer=byte needs >= 256 (one id per byte), got 100",
    ),
    (
        "train --config tiny --set data.tokenizer=bpe model.vocab_size=512 data.source={t}/big.npy",
        "data.source: {t}/big.npy is pre-tokenized: no text to train data.tokenizer=bpe on "
        "(put the tokenizer.json that made it in the workdir)",
    ),
    (
        "train --config tiny --workdir {t}/bpe400 --set data.tokenizer=bpe model.vocab_size=300",
        "model.vocab_size: 300 is smaller than the 400 tokens of {t}/bpe400/tokenizer.json",
    ),
    (
        "train --config tiny --workdir {t}/badtok --set data.tokenizer=bpe model.vocab_size=512",
        "data.tokenizer: {t}/badtok/tokenizer.json is not a tokenizers-library JSON "
        "(expected ident at line 1 column 2)",
    ),
    # --- workdirs
    (
        "train --config tiny --workdir {t}/a-file",
        "--workdir {t}/a-file: exists and is not a directory",
    ),
    (
        "train --config tiny --workdir /proc/sparsemodel-test",
        "--workdir /proc/sparsemodel-test: not writable (No such file or directory)",
    ),
    (
        "eval --workdir {t}/emptydir",
        "--workdir {t}/emptydir: no config.yaml (not a sparsemodel workdir)",
    ),
    ("eval --workdir {t}/nowhere", "--workdir {t}/nowhere: not a directory"),
    ("eval --workdir {w} --step 5", "--step 5: no such checkpoint (have: 2)"),
    ("eval --workdir {w} --max-tokens -5", "--max-tokens: must be >= 0 (0 = all), got -5"),
    ("train --config tiny --stop-after 0", "--stop-after: must be >= 1, got 0"),
    ("train --config tiny --stop-after -5", "--stop-after: must be >= 1, got -5"),
    ("eval --workdir {w} --data {t}/none.txt", "data.source: {t}/none.txt does not exist"),
    (
        "train --config tiny --workdir {w} --set moe.num_experts=8",
        "checkpoint step 2 in {w} holds another model than the config: moe.num_experts=8 "
        "(checkpoint: 4) (use a new --workdir, or the config the checkpoint was trained with)",
    ),
    # --- Hugging Face import and export
    (
        "import-hf {t}/hf-notjson --workdir {t}/hf-wd",
        "{t}/hf-notjson/config.json: not valid JSON "
        "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))",
    ),
    (
        "import-hf {t}/hf-list --workdir {t}/hf-wd",
        "{t}/hf-list/config.json: expected a JSON object, got list",
    ),
    (
        "import-hf {t}/hf-nokey --workdir {t}/hf-wd",
        "{t}/hf-nokey/config.json: missing key vocab_size",
    ),
    (
        "import-hf {t}/hf-badtype --workdir {t}/hf-wd",
        "{t}/hf-badtype/config.json: hidden_size: expected a positive integer, got '64'",
    ),
    (
        "import-hf {t}/hf-zeroheads --workdir {t}/hf-wd",
        "{t}/hf-zeroheads/config.json: num_attention_heads: expected a positive integer, got 0",
    ),
    ("export-hf {t}/a-file --workdir {w}", "output {t}/a-file: exists and is not a directory"),
    (
        "export-hf {w} --workdir {w}",
        "output {w}: already holds checkpoints (use a new directory)",
    ),
    (
        "export-hf /proc/sparsemodel-test --workdir {w}",
        "output /proc/sparsemodel-test: not writable (No such file or directory)",
    ),
    # --- generate, profile, multi-process flags
    ("generate --workdir {w} --prompt=", "--prompt: must not be empty"),
    (
        "generate --workdir {w} --prompt x --max-new-tokens 0",
        "--max-new-tokens: must be >= 1, got 0",
    ),
    ("generate --workdir {w} --prompt x --temperature -1", "--temperature: must be >= 0, got -1.0"),
    (
        "generate --workdir {w} --prompt x --temperature nan",
        "--temperature: must be finite, got nan",
    ),
    (
        "generate --workdir {w} --prompt x --temperature inf",
        "--temperature: must be finite, got inf",
    ),
    (
        "generate --workdir {w} --prompt x --top-k -3",
        "--top-k: must be >= 0 (0 = no limit), got -3",
    ),
    ("generate --workdir {w} --prompt x --top-k 257", "--top-k: 257 exceeds model.vocab_size=256"),
    ("generate --workdir {w} --prompt x --seed -1", "--seed: must be in [0, 2**32 - 1], got -1"),
    (
        "generate --workdir {w} --prompt x --seed 18446744073709551616",
        "--seed: must be in [0, 2**32 - 1], got 18446744073709551616",
    ),
    # argv bytes that are not UTF-8 arrive decoded with surrogateescape: b"\xff" -> "\udcff"
    ("generate --workdir {w} --prompt ab\udcff", "--prompt: not valid UTF-8 (at character 2)"),
    ("generate --workdir {w} --prompt x --step 9", "--step 9: no such checkpoint (have: 2)"),
    ("profile --config tiny --steps 0", "--steps: must be >= 1, got 0"),
    (
        "profile --config tiny --plot /proc/x.png",
        "--plot /proc/x.png: not writable (No such file or directory)",
    ),
    (
        "profile --config tiny --plot {t}/a-file/x.png",
        "--plot {t}/a-file/x.png: not writable (Not a directory)",
    ),
    ("profile --config tiny --plot {t}/emptydir", "--plot {t}/emptydir: is a directory"),
    (
        "profile --config tiny --trace /proc/x",
        "--trace /proc/x: not writable (No such file or directory)",
    ),
    (
        "profile --config tiny --trace {t}/a-file",
        "--trace {t}/a-file: not writable (Not a directory)",
    ),
    (
        "profile --config tiny --trace {t}/a-file/x",
        "--trace {t}/a-file/x: not writable (Not a directory)",
    ),
    (
        "profile --config tiny --workdir {w}",
        "--config and --workdir: give one (a workdir has its config)",
    ),
    (
        "train --config tiny --num-processes 2",
        "--coordinator-address, --num-processes and --process-id go together",
    ),
    (
        "train --config tiny --coordinator-address 127.0.0.1:1 --num-processes 2 --process-id 2",
        "--process-id 2: must be in [0, 2)",
    ),
]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    (t / "bad.yaml").write_text("model: [unclosed\n")
    (t / "bad.toml").write_text("model d_model = 3\n")
    (t / "evil.yaml").write_text(f'model: !!python/object/apply:os.system ["touch {t}/pwned"]\n')
    (t / "list.yaml").write_text("[1, 2]\n")
    (t / "dup-key.yaml").write_text("model: {d_model: 64, d_model: 128}\n")
    (t / "dup-section.yaml").write_text("model: {d_model: 64}\nmodel: {n_layers: 2}\n")
    os.mkfifo(t / "fifo.yaml")
    os.mkfifo(t / "fifo.txt")
    (t / "empty.txt").write_bytes(b"")
    (t / "emptydir").mkdir()
    (t / "short.txt").write_text("x" * 100)
    (t / "a-file").write_text("not a directory")
    np.save(t / "floats.npy", np.zeros(1000))
    (t / "bpe400").mkdir()
    text = np.frombuffer(Path(config.__file__).read_bytes(), np.uint8)
    tokenizer.train_bpe(text, 400).save(t / "bpe400" / "tokenizer.json")
    (t / "badtok").mkdir()
    (t / "badtok" / "tokenizer.json").write_text("not json")
    np.save(t / "big.npy", np.full(5000, 999, np.int32))
    mixtral = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2}
    mixtral |= {"num_attention_heads": 4, "intermediate_size": 96}  # no vocab_size
    hf_configs = {
        "hf-notjson": "{not json",
        "hf-list": "[1]",
        "hf-nokey": json.dumps(mixtral),
        "hf-badtype": json.dumps(mixtral | {"vocab_size": 256, "hidden_size": "64"}),
        "hf-zeroheads": json.dumps(mixtral | {"vocab_size": 256, "num_attention_heads": 0}),
    }
    for name, text in hf_configs.items():
        (t / name).mkdir()
        (t / name / "config.json").write_text(text)
    np.full(5000, 999, np.uint16).tofile(t / "big.bin")
    np.save(t / "negative.npy", np.r_[np.arange(2000) % 256, -1, np.arange(2999) % 256])
    np.save(t / "bad-val.npy", np.r_[np.arange(4999) % 256, 256])  # the last id: validation
    w = t / "trained"
    train.run(
        config.load("tiny", {"train.steps": 2, "train.eval_every": 100}), w, log=lambda s: None
    )
    bad_val = t / "trained-bad-val"
    shutil.copytree(w, bad_val)
    config.dump(
        config.load(w / "config.yaml", {"data.source": str(t / "bad-val.npy")}),
        bad_val / "config.yaml",
    )
    return {"t": str(t), "w": str(w), "bad_val": str(bad_val)}


@contextlib.contextmanager
def deadline(seconds: float):
    """Raises TimeoutError in the block after `seconds`: a command that opens a FIFO
    blocks in open() until a writer comes, and the alarm interrupts it."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("argv,expected", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_one_line_and_exit_2(argv, expected, dirs, capsys, tmp_path):
    args = argv.format(**dirs).split()
    if args[0] == "train" and "--workdir" not in args:
        args += ["--workdir", str(tmp_path / "w")]
    with deadline(30):
        rc = cli.main(args)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err == ["sparsemodel: error: " + expected.format(**dirs)]
    assert not (Path(dirs["t"]) / "pwned").exists()  # the YAML tag never ran


def test_kv_cache_larger_than_memory_is_refused(dirs, capsys, monkeypatch):
    monkeypatch.setattr(hardware, "device_memory_available", lambda: (2**30, "memory available"))
    rc = cli.main(
        ["generate", "--workdir", dirs["w"], "--prompt", "x", "--max-new-tokens", "1000000000"]
    )
    # tiny: 2 layers x (k, v) x 2 kv heads x 16 dims x 4 bytes = 512 bytes per position
    assert rc == 2
    assert capsys.readouterr().err.splitlines() == [
        "sparsemodel: error: --max-new-tokens: 1 prompt + 1000000000 new tokens need a "
        "476.8 GiB KV cache, more than the 1.0 GiB of memory available"
    ]


@pytest.mark.parametrize(
    "overrides",
    [{}, {"train.dtype": "bfloat16", "moe.first_dense": 1, "model.n_kv_heads": 1}],
    ids=["tiny", "bf16-dense-prefix"],
)
def test_kv_cache_estimate_is_the_size_of_the_real_cache(overrides):
    from flax import nnx

    from sparsemodel.model import Transformer

    cfg = config.load("tiny", overrides)
    m = cfg.model
    lm = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))  # no weights needed
    real = sum(x.nbytes for x in jax.tree.leaves(lm.init_cache(1, 7)))
    by_hand = 7 * m.n_layers * 2 * m.n_kv_heads * (m.d_model // m.n_heads)
    by_hand *= jax.numpy.dtype(cfg.train.dtype).itemsize
    assert evaluate.kv_cache_bytes(lm, 7) == real == by_hand


def test_non_utf8_bytes_are_fine(tmp_path):
    """Bytes are tokens: a binary file trains."""
    data = tmp_path / "binary.bin.txt"
    data.write_bytes(bytes(range(256)) * 64)
    cfg = config.load("tiny", {"train.steps": 1, "data.source": str(data), "train.eval_every": 100})
    assert train.run(cfg, tmp_path / "w", log=lambda s: None).step == 1

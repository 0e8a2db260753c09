"""Training end to end on the tiny preset: exact resume, eval, generate, divergence, CLI."""

from __future__ import annotations

import json
import math
import shutil
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_commands import SPARSEMODEL, train_tiny

from sparsemodel import config, evaluate, train
from sparsemodel.checkpoint import Checkpointer, CheckpointError


def tiny(**overrides):
    base = {
        "train.steps": 8,
        "train.checkpoint_every": 4,
        "train.eval_every": 4,
        "train.log_every": 2,
    }
    return config.load("tiny", {**base, **overrides})


def losses(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def train_tiny_process(workdir, *settings) -> subprocess.Popen:
    """`sparsemodel train --config tiny` in a subprocess (stderr captured)."""
    cmd = train_tiny(workdir, "--set", *settings)
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def read_scalars(logdir) -> dict[str, dict[int, float]]:
    """Scalars from TensorBoard event files (TFRecord: length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    out: dict[str, dict[int, float]] = {}
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, {})[event.step] = v.simple_value
    return out


def test_resumed_run_continues_the_exact_curve(tmp_path):
    cfg = tiny()
    full = train.run(cfg, tmp_path / "full", log=lambda s: None)
    half = train.run(cfg, tmp_path / "resumed", stop_after=4, log=lambda s: None)
    assert half.step == 4
    rest = train.run(cfg, tmp_path / "resumed", log=lambda s: None)
    assert rest.step == 8

    assert losses(tmp_path / "full") == losses(tmp_path / "resumed")  # bit-exact, every step
    assert [s for s, _ in losses(tmp_path / "full")] == list(range(1, 9))
    a = evaluate.restore(tmp_path / "full")
    b = evaluate.restore(tmp_path / "resumed")
    assert a.step == b.step == 8
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert full.train_loss == rest.train_loss


@pytest.mark.slow
def test_a_global_expert_pool_trains_and_resumes_the_exact_curve(tmp_path):
    cfg = tiny(**{"moe.pool": "global", "moe.num_experts": 8})
    train.run(cfg, tmp_path / "full", log=lambda s: None)
    train.run(cfg, tmp_path / "resumed", stop_after=4, log=lambda s: None)
    train.run(cfg, tmp_path / "resumed", log=lambda s: None)
    assert losses(tmp_path / "full") == losses(tmp_path / "resumed")
    assert losses(tmp_path / "full")[-1][1] < losses(tmp_path / "full")[0][1]


def test_training_reduces_loss_and_eval_reports_it(tmp_path):
    cfg = tiny(**{"train.steps": 20, "train.checkpoint_every": 10, "train.eval_every": 10})
    result = train.run(cfg, tmp_path, log=lambda s: None)
    first = losses(tmp_path)[0][1]
    assert result.train_loss < first - 1.0  # from ~ln(256)=5.5 towards the byte entropy
    records = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for key in (
        "loss",
        "lm_loss",
        "lb_loss",
        "z_loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "dropped",
        "max_load",
    ):
        assert key in records[-1], key
    assert "val_loss" in records[9] and "val_loss" in records[19]

    # TensorBoard event files beside metrics.jsonl, with the same numbers.
    events = read_scalars(tmp_path)
    assert events["train/loss"][20] == pytest.approx(records[-1]["loss"])
    assert set(events["train/lm_loss"]) == set(range(1, 21))
    assert {
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/mfu",
        "experts/layer0/load_e0",
        "experts/layer1/dropped",
    } <= set(events)

    r = evaluate.restore(tmp_path)
    res = evaluate.evaluate(r, max_tokens=4096)
    assert res.step == 20 and res.tokens >= 4096
    assert math.isclose(res.perplexity, math.exp(res.loss))
    assert math.isclose(res.bits_per_byte, res.loss / math.log(2))  # byte tokens
    assert res.loss < math.log(256)
    older = evaluate.evaluate(evaluate.restore(tmp_path, step=10), max_tokens=4096)
    assert older.step == 10 and older.loss > res.loss

    text_file = tmp_path / "sample.txt"
    text_file.write_text("def add(a, b):\n    return a + b\n" * 40)
    on_file = evaluate.evaluate(r, source=str(text_file), max_tokens=None)
    assert on_file.tokens > 0 and on_file.source == str(text_file)

    with pytest.raises(CheckpointError, match="--step 7: no such checkpoint"):
        evaluate.restore(tmp_path, step=7)


def test_non_finite_loss_stops_naming_the_step(tmp_path):
    cfg = tiny(
        **{
            "train.lr": 1e9,
            "train.warmup_steps": 0,
            "train.grad_clip": 0.0,
            "train.steps": 30,
            "train.checkpoint_every": 1,
        }
    )
    with pytest.raises(train.TrainingError, match=r"step \d+: non-finite") as err:
        train.run(cfg, tmp_path, log=lambda s: None)
    bad_step = int(str(err.value).split()[1].rstrip(":"))
    steps = Checkpointer(tmp_path).steps()
    # Every step before the bad one was checkpointed; the bad one was not.
    assert steps and max(steps) == bad_step - 1


def test_resume_refuses_a_config_with_other_shapes(tmp_path):
    train.run(tiny(**{"train.steps": 2}), tmp_path, log=lambda s: None)
    with pytest.raises(config.ConfigError, match="moe.num_experts"):
        train.run(tiny(**{"moe.num_experts": 8}), tmp_path, log=lambda s: None)


def test_greedy_generation_matches_full_forward_argmax(tmp_path):
    train.run(tiny(**{"train.steps": 4}), tmp_path, log=lambda s: None)
    r = evaluate.restore(tmp_path)
    lm = r.model()
    prompt = np.frombuffer(b"import os\n", np.uint8).astype(np.int32)[None]
    new = np.asarray(evaluate.sample(lm, prompt, 12, 0.0, 0, jax.random.key(0)))
    # Each greedy token is the argmax of one full causal forward pass without the cache.
    seq = np.concatenate([prompt, new], axis=1)  # [1, P + 12]
    logits, _ = lm(seq)
    p = prompt.shape[1]
    expected = np.argmax(np.asarray(logits[0, p - 1 : p + 11]), axis=-1)
    np.testing.assert_array_equal(expected, new[0])
    # Sampling is seeded: same seed, same text; it decodes to a string.
    a = evaluate.generate(r, "def ", 16, temperature=1.0, top_k=5, seed=3)
    b = evaluate.generate(r, "def ", 16, temperature=1.0, top_k=5, seed=3)
    assert a == b and isinstance(a, str)


@pytest.mark.slow
def test_command_line_train_eval_generate(tmp_path):
    """What `make train` does, on the tiny preset, through the installed command."""
    exe = SPARSEMODEL
    workdir = tmp_path / "run"
    out = subprocess.run(
        train_tiny(workdir, "--set", "train.steps=6", "train.checkpoint_every=3"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "mesh: data=1" in out.stdout and "compiled train step per device" in out.stdout
    assert "trained to step 6" in out.stdout
    assert (workdir / "config.yaml").is_file() and (workdir / "checkpoints" / "6").is_dir()

    ev = subprocess.run(
        exe + ["eval", "--workdir", str(workdir), "--json", "--max-tokens", "4096"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stderr
    res = json.loads(ev.stdout.strip().splitlines()[-1])
    assert set(res) >= {"loss", "perplexity", "bits_per_byte", "tokens", "step"}
    assert res["step"] == 6

    gen = subprocess.run(
        exe
        + [
            "generate",
            "--workdir",
            str(workdir),
            "--prompt",
            "class ",
            "--max-new-tokens",
            "20",
            "--temperature",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert gen.returncode == 0, gen.stderr
    assert gen.stdout.startswith("class ")

    bad = subprocess.run(
        exe + ["eval", "--workdir", str(workdir), "--step", "5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "sparsemodel: error: --step 5: no such checkpoint (have: 3, 6)"
    ]


@pytest.mark.slow
def test_sigterm_checkpoints_the_current_step_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    proc = train_tiny_process(
        workdir,
        "train.steps=100000",
        "train.checkpoint_every=100000",
        "train.eval_every=100000",
        "train.log_every=1",
    )
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    last = json.loads(metrics.read_text().splitlines()[-1])["step"]
    assert Checkpointer(workdir).latest_step() == last  # the step it was on, saved


# ------------------------------------------------------------- damaged checkpoints


def truncate_all(step_dir):
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"")


def remove_params(step_dir):
    for f in (step_dir / "params").rglob("*"):
        if f.is_file():
            f.unlink()


def remove_opt_state(step_dir):
    shutil.rmtree(step_dir / "opt_state")  # not a params-only step: its meta says otherwise


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate_all, remove_params, remove_opt_state])
def test_train_resumes_from_the_previous_good_checkpoint(tmp_path, damage):
    reference = tmp_path / "reference"
    train.run(tiny(), reference, log=lambda s: None)
    run = tmp_path / "run"
    train.run(tiny(), run, stop_after=8, log=lambda s: None)  # checkpoints 4 and 8
    damage(run / "checkpoints" / "8")

    if damage is not remove_opt_state:  # eval reads parameters only
        with pytest.raises(CheckpointError, match="^checkpoint step 8 is damaged or incomplete"):
            evaluate.restore(run, step=8)

    messages = []
    train.run(tiny(), run, log=messages.append)
    assert any("checkpoint step 8 is damaged" in m for m in messages), messages
    assert any("resumed from" in m and m.endswith("/4") for m in messages), messages
    assert losses(run) == losses(reference)  # steps 5..8 recomputed exactly
    assert (run / "checkpoints" / "8.damaged").is_dir()  # kept aside, not deleted
    assert (run / "checkpoints" / "4").is_dir()


# ------------------------------------------------------------------- kill anywhere


def _start(workdir):
    return train_tiny_process(
        workdir,
        "train.steps=12",
        "train.checkpoint_every=3",
        "train.keep_checkpoints=1",
        "train.eval_every=100",
        "train.log_every=1",
    )


def _kill_when(proc, ready, timeout=300):
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_equals_an_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    ref = _start(reference)
    assert ref.wait(timeout=600) == 0, ref.communicate()[1][-2000:]

    run = tmp_path / "run"
    metrics, ckpts = run / "metrics.jsonl", run / "checkpoints"
    steps_logged = lambda: len(metrics.read_text().splitlines()) if metrics.exists() else 0  # noqa: E731
    entries = lambda: sorted(p.name for p in ckpts.iterdir()) if ckpts.exists() else []  # noqa: E731

    def newest():
        return Checkpointer(run).latest_step() or 0

    # 1. mid-step: checkpoint 3 complete, step 4 logged, step 5 running.
    _kill_when(_start(run), lambda: steps_logged() >= 4 and "3" in entries())
    assert newest() == 3
    # 2. mid-save: as soon as a new entry appears (Orbax writes each step under a temporary
    #    name and renames it when complete). With keep_checkpoints=1, step 3 may only be
    #    deleted once the new step is complete: a completed checkpoint is never lost.
    _kill_when(_start(run), lambda: any(e != "3" for e in entries()))
    assert newest() >= 3, entries()
    # 3. just after a save: a complete step >= 9 is listed.
    _kill_when(_start(run), lambda: any(e.isdigit() and int(e) >= 9 for e in entries()))
    assert newest() >= 9, entries()
    final = _start(run)
    assert final.wait(timeout=600) == 0, final.communicate()[1][-2000:]

    assert losses(run) == losses(reference)  # every step, exactly
    a, b = evaluate.restore(reference), evaluate.restore(run)
    assert a.step == b.step == 12
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_orbax_io_metric_collection_is_off():
    # It leaks memory on every save (experiments/long_run.py); checkpoint.py turns it off.
    from orbax.checkpoint._src.serialization import tensorstore_utils

    import sparsemodel.checkpoint  # noqa: F401

    if not hasattr(tensorstore_utils, "get_tensorstore_raw_bytes"):
        pytest.skip("this Orbax does not collect TensorStore I/O metrics (nothing to turn off)")
    assert tensorstore_utils.get_tensorstore_raw_bytes() is None


def test_background_save_hands_freed_heap_back(tmp_path, monkeypatch):
    # A trim after every background save keeps resident memory from creeping (glibc keeps
    # the fragments of each save's buffers otherwise; experiments/long_run.py).
    from sparsemodel import checkpoint

    trims = []
    monkeypatch.setattr(checkpoint, "return_freed_heap", lambda: trims.append(1) or True)
    ckpt = checkpoint.Checkpointer(tmp_path)
    if not ckpt._background:
        pytest.skip("saves run in the background on CPU only; elsewhere there is none to trim")
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    ckpt.save(1, params, {"m": jnp.zeros(3)}, {"step": 1})
    ckpt.save(2, params, {"m": jnp.ones(3)}, {"step": 2})
    assert ckpt.steps() == [1, 2] and len(trims) == 2

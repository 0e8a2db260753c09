"""Ordinary accidents that must not lose a run or silently change a model: two trainers on
one workdir, an edited config, a partial log line, a full disk, flipped checkpoint bytes,
Ctrl-C while compiling. The faults are real: real processes, a real (small) filesystem.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import pytest
from cli_commands import train_tiny

from sparsemodel import cli, config, evaluate, train
from sparsemodel.checkpoint import Checkpointer


def tiny(**overrides):
    base = {"train.steps": 8, "train.checkpoint_every": 4, "train.eval_every": 100}
    return config.load("tiny", {**base, **overrides})


def losses(workdir) -> list[tuple[int, float]]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [(r["step"], r["loss"]) for r in map(json.loads, lines)]


def quiet(_line):
    pass


def run_cli(args, capsys) -> tuple[int, list[str]]:
    capsys.readouterr()  # what ran before
    rc = cli.main([str(a) for a in args])
    return rc, capsys.readouterr().err.strip().splitlines()


def start_training(workdir, *settings, env=None) -> subprocess.Popen:
    cmd = train_tiny(workdir, "--set", "train.eval_every=100000", *settings)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def wait_for(ready, proc=None, timeout=300):
    deadline = time.time() + timeout
    while not ready():
        assert proc is None or proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of `tiny()`: the curve every resumed run must continue."""
    workdir = tmp_path_factory.mktemp("reference")
    train.run(tiny(), workdir, log=quiet)
    return losses(workdir)


# ----------------------------------------------------------------- one workdir, one train


@pytest.mark.slow
def test_second_train_on_a_workdir_exits_2_and_readers_read_beside_it(tmp_path):
    workdir = tmp_path / "run"
    first = start_training(
        workdir, "train.steps=100000", "train.checkpoint_every=1", "train.keep_checkpoints=1"
    )
    try:
        wait_for(lambda: (workdir / "checkpoints" / "2").exists(), first)
        second = subprocess.run(train_tiny(workdir), capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"sparsemodel: error: --workdir {workdir}: another train is running in it "
            f"(pid {first.pid} on {os.uname().nodename}, since "
            + second.stderr.split("since ")[1].split(")")[0]
            + "); wait for it, stop it, or use another --workdir"
        ]
        # Readers read beside it while it saves and deletes a step every step.
        deadline, reads = time.time() + 5, 0
        while time.time() < deadline:
            assert evaluate.restore(workdir).step >= 1
            reads += 1
        assert reads >= 3
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # The killed run's lock died with it: the next train takes the workdir.
    third = subprocess.run(
        train_tiny(workdir, "--stop-after", "1"), capture_output=True, text=True, timeout=300
    )
    assert third.returncode == 0, third.stderr[-2000:]
    assert "resumed from" in third.stdout


# ------------------------------------------------------------- the checkpoint's own record


@pytest.fixture
def trained(tmp_path):
    workdir = tmp_path / "run"
    train.run(tiny(**{"train.steps": 4}), workdir, log=quiet)
    return workdir


def snapshot(workdir):
    return sorted(p.name for p in (workdir / "checkpoints").iterdir()), (
        workdir / "metrics.jsonl"
    ).read_text()


def edit_d_model(stored: Path) -> None:
    data = config.read_file(stored)
    stored.write_text(json.dumps({**data, "model": {**data["model"], "d_model": 128}}))


@pytest.mark.parametrize(
    "edit, args, named",
    [
        (edit_d_model, [], "model.d_model=128 (checkpoint: 64)"),
        (lambda stored: stored.write_text(""), [], "model.d_model=256 (checkpoint: 64)"),
        (Path.unlink, ["--config", "tiny", "--set", "moe.num_experts=8"], "moe.num_experts=8"),
    ],
    ids=["edited", "emptied", "deleted-with-other-sets"],
)
def test_a_config_of_another_model_is_refused_and_the_run_is_kept(
    trained, capsys, edit, args, named
):
    before = snapshot(trained)
    edit(trained / "config.yaml")
    rc, err = run_cli(["train", "--workdir", trained, *args], capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(
        f"sparsemodel: error: checkpoint step 4 in {trained} holds another model than the config: "
    )
    assert named in err[0]
    assert snapshot(trained) == before  # nothing renamed, nothing retrained, log intact
    if edit is edit_d_model:  # readers of the same config.yaml: refused too
        for command in (["eval"], ["export-hf", trained.parent / "hf"]):
            rc, err = run_cli([*command, "--workdir", trained], capsys)
            assert rc == 2 and "holds another model than the config" in err[0], err


def test_resume_keeps_a_config_that_changes_only_training(trained):
    cfg = tiny(**{"train.steps": 6, "train.lr": 1e-3})
    assert train.run(cfg, trained, log=quiet).step == 6


def write_legacy_checkpoint(workdir: Path, step: int, version: int) -> None:
    """Rewrites checkpoint `step` as format `version` wrote it: gate and up expert weights
    apart (w_gate, w_up), and for format 1 no record in its meta."""
    import orbax.checkpoint as ocp

    from sparsemodel import checksum, initialize, optim, sharding
    from sparsemodel.checkpoint import leaf_path, shapes_of

    cfg = config.load_stored(workdir / "config.yaml")
    mesh = sharding.make_mesh(cfg.mesh)
    _, params = initialize.init_params(cfg, mesh, 0)
    opt_state = initialize.init_opt_state(optim.make_optimizer(cfg.train), params, mesh)
    ckpt = Checkpointer(workdir, async_save=False)
    params, opt_state, meta = ckpt.restore(step, params, opt_state)

    def split(ffn):
        gate_up = ffn["w_gate_up"]
        halves = {"w_gate": gate_up[..., 0, :], "w_up": gate_up[..., 1, :]}
        out = {k: v for k, v in ffn.items() if k != "w_gate_up"}
        return type(ffn)(out | {k: gate_up.replace(v) for k, v in halves.items()})

    is_moe = lambda n: isinstance(n, dict) and "w_router" in n  # noqa: E731
    old = jax.tree.map(lambda n: split(n) if is_moe(n) else n, (params, opt_state), is_leaf=is_moe)
    meta = {k: v for k, v in meta.items() if k not in ("format", "model", "shapes", "checksums")}
    if version == 2:
        sums = checksum.checksums({"params": old[0], "opt_state": old[1]}, name=leaf_path)
        meta |= {"format": 2, "model": config.model_record(cfg), "shapes": shapes_of(old[0])}
        meta |= {"checksums": sums}
    shutil.rmtree(ckpt.directory / str(step))
    ckpt.manager.reload()
    items = {"params": old[0], "opt_state": old[1]}
    args = {k: ocp.args.StandardSave(v) for k, v in items.items()}
    ckpt.manager.save(step, args=ocp.args.Composite(**args, meta=ocp.args.JsonSave(meta)))
    ckpt.close()


@pytest.mark.parametrize("version", [1, 2])
def test_older_formats_are_upgraded_on_restore_and_checked_in_their_layout(
    tmp_path, reference, version
):
    """Formats 1 (no record) and 2 (gate and up apart) restore into today's fused layout
    exactly: a run resumed from one continues the uninterrupted curve bit for bit."""
    workdir = tmp_path / "run"
    train.run(tiny(), workdir, stop_after=4, log=quiet)
    write_legacy_checkpoint(workdir, 4, version)
    stored = Checkpointer(workdir).meta(4)
    assert stored["format"] == 2 and "units/blocks/0/ffn/w_gate" in stored["shapes"]
    assert evaluate.restore(workdir).step == 4
    other = tiny(**{"moe.d_expert": 32})
    with pytest.raises(config.ConfigError, match="ffn/w_down has shape|moe.d_expert=32"):
        train.run(other, workdir, log=quiet)
    train.run(tiny(), workdir, log=quiet)
    assert losses(workdir) == reference


# ----------------------------------------------------------------- logs and set-asides


def test_a_partial_metrics_line_is_set_aside_and_the_curve_continues(tmp_path, reference):
    workdir = tmp_path / "run"
    train.run(tiny(), workdir, stop_after=4, log=quiet)
    log = workdir / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 5, "loss": 2.3')  # a crash mid-write
    messages = []
    train.run(tiny(), workdir, log=messages.append)
    warned = [m for m in messages if "partial or garbled" in m]
    assert warned == [
        f"warning: {log} line 5 is partial or garbled: kept the 4 lines before it, "
        "set the other 1 aside in metrics.jsonl.damaged"
    ]
    assert (workdir / "metrics.jsonl.damaged").read_text() == '{"step": 5, "loss": 2.3\n'
    assert losses(workdir) == reference


def flip_bytes(step_dir: Path, item: str = "params") -> None:
    """Flips 16 bytes in the middle of an item's largest file: array data, not structure."""
    files = [p for p in (step_dir / item).rglob("*") if p.is_file()]
    target = max(files, key=lambda p: p.stat().st_size)
    data = bytearray(target.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
    target.write_bytes(bytes(data))


def test_a_step_damaged_twice_is_set_aside_again(tmp_path, reference):
    workdir = tmp_path / "run"
    train.run(tiny(), workdir, stop_after=8, log=quiet)
    (workdir / "checkpoints" / "8.damaged").mkdir()  # set aside once already
    flip_bytes(workdir / "checkpoints" / "8", "opt_state")
    messages = []
    train.run(tiny(), workdir, log=messages.append)
    assert any("opt_state" in m and "fails its checksum" in m for m in messages), messages
    assert (workdir / "checkpoints" / "8.damaged-2").is_dir()
    assert losses(workdir) == reference


@pytest.mark.slow
def test_flipped_checkpoint_bytes_are_refused_by_readers_and_set_aside_by_train(
    tmp_path, reference, capsys
):
    workdir = tmp_path / "run"
    train.run(tiny(), workdir, stop_after=8, log=quiet)
    flip_bytes(workdir / "checkpoints" / "8")
    for command in (
        ["eval", "--workdir", workdir],
        ["generate", "--workdir", workdir, "--prompt", "x"],
        ["export-hf", "--workdir", workdir, tmp_path / "hf"],
    ):
        rc, err = run_cli(command, capsys)
        assert rc == 2, (command, err)
        assert len(err) == 1 and err[0].startswith(
            "sparsemodel: error: checkpoint step 8 is damaged: "
        )
        assert err[0].endswith(" fails its checksum")
    assert not (tmp_path / "hf").exists()
    messages = []
    train.run(tiny(), workdir, log=messages.append)
    assert any(m.endswith(f"resumed from {workdir.absolute()}/checkpoints/4") for m in messages)
    assert losses(workdir) == reference


# ------------------------------------------------------------------------- full disks


@contextlib.contextmanager
def small_filesystem(path: Path, size: str):
    """A tmpfs of `size` mounted at path (root can mount; elsewhere the test skips)."""
    path.mkdir(parents=True)
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if mount.returncode:
        pytest.skip(f"cannot mount a small filesystem here: {mount.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(path: Path, leave_bytes: int) -> None:
    free = shutil.disk_usage(path).free
    with (path / "filler").open("wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))


@pytest.mark.slow
def test_a_full_disk_under_the_logs_stops_the_run_in_one_line(tmp_path):
    with small_filesystem(tmp_path / "disk", "4m") as disk:
        workdir = disk / "run"
        workdir.mkdir()
        fill(disk, 64 << 10)
        proc = start_training(workdir, "train.steps=100000", "train.checkpoint_every=100000")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"sparsemodel: error: cannot write {workdir}/"), last
        assert "No space left on device" in last and "MiB free on its filesystem" in last


@pytest.mark.slow
def test_a_full_disk_during_a_save_keeps_the_last_checkpoint_resumable(tmp_path, reference):
    with small_filesystem(tmp_path / "disk", "5m") as disk:
        workdir = disk / "run"
        settings = ("train.steps=8", "train.checkpoint_every=2", "train.keep_checkpoints=8")
        proc = start_training(workdir, *settings, "train.eval_every=100")
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 1, err[-3000:]
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        # The save fills the disk; whichever write meets the full disk first, the line
        # names the save when it failed (the loop waits for it before blaming a log file).
        assert last.startswith(f"sparsemodel: error: cannot write {workdir}/"), last
        assert "No space left on device" in last
        if "/checkpoints/" in last:
            assert "was not saved" in last
        saved = Checkpointer(workdir).steps()
        assert saved and max(saved) < 8
        shutil.copytree(workdir, tmp_path / "moved", ignore=shutil.ignore_patterns("filler"))
    moved = tmp_path / "moved"
    train.run(tiny(**{"train.checkpoint_every": 2}), moved, log=quiet)
    assert losses(moved) == reference


# ------------------------------------------------------------------------------ Ctrl-C


# The library, called from Python, keeps Python's own SIGINT handler around the run.
FROM_PYTHON = (
    "import sys; from sparsemodel import config, train\n"
    "cfg = config.load('tiny', {'train.steps': 100000, 'train.eval_every': 100000})\n"
    "print('trained to step', train.run(cfg, sys.argv[1]).step)"
)


@pytest.mark.slow
@pytest.mark.parametrize("caller", ["cli", "python"])
def test_ctrl_c_while_compiling_stops_before_the_first_step(tmp_path, caller):
    """A Ctrl-C during compilation stops the run cleanly once the compiler returns (Python
    runs no handler before). From Python it used to be a KeyboardInterrupt that could be
    swallowed by a callback, and the run went on."""
    workdir = tmp_path / "run"
    env = {"JAX_ENABLE_COMPILATION_CACHE": "false"}
    if caller == "cli":
        proc = start_training(workdir, "train.steps=100000", env=env)
    else:
        cmd = [sys.executable, "-c", FROM_PYTHON, str(workdir)]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
    for line in proc.stdout:
        if line.startswith("compiling the training step"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err
    assert "signal 2: stopping before step 1" in out + err
    assert "trained to step 0" in out.strip().splitlines()[-2 if caller == "cli" else -1]
    assert not Checkpointer(workdir).steps()


# ------------------------------------------------------------------ memory before compile


@pytest.mark.parametrize("command", ["train", "profile"])
@pytest.mark.parametrize(
    "setting, keys",
    [
        ("train.seq_len=100000", "train.batch_size x train.seq_len^2 x model.n_heads"),
        ("model.vocab_size=1000000000", "model.*, moe.*"),
    ],
)
def test_what_cannot_fit_is_refused_before_compiling(tmp_path, capsys, command, setting, keys):
    t0 = time.perf_counter()
    args = [command, "--config", "tiny", "--set", setting]
    args += ["--workdir", tmp_path] if command == "train" else []
    rc, err = run_cli(args, capsys)
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith(f"sparsemodel: error: {keys}: a training step needs at least ")
    assert err[0].endswith(" of memory available")
    assert time.perf_counter() - t0 < 20  # nothing compiled


def test_sigkill_of_the_lock_holder_is_not_a_stale_lock(tmp_path):
    """The lock is the kernel's: a process holding it that dies frees it."""
    code = (
        "import sys, time; from sparsemodel.workdir import WorkdirLock; "
        f"WorkdirLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from sparsemodel.workdir import WorkdirLock

    with pytest.raises(config.ConfigError, match=f"pid {holder.pid} on "):
        WorkdirLock(tmp_path).acquire()
    holder.kill()
    holder.wait()
    WorkdirLock(tmp_path).acquire().release()

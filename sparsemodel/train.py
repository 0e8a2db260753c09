"""The training loop, top to bottom: workdir -> mesh -> data -> model and optimizer (born
sharded) -> restore -> compiled step -> loop (log, validate, checkpoint).

A run stopped at any checkpoint and resumed continues the exact loss curve: parameters,
optimizer state and the data iterator's position are restored, and each step's random key
is derived from (seed, step) rather than carried.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sparsemodel import config as config_lib
from sparsemodel import data as data_lib
from sparsemodel import flops, hardware, memory, sharding
from sparsemodel.checkpoint import Checkpointer, CheckpointError
from sparsemodel.config import Config, ConfigError, model_record
from sparsemodel.events import EventLog
from sparsemodel.files import StorageError
from sparsemodel.health import RoutingHealth
from sparsemodel.initialize import count, init_opt_state, init_params
from sparsemodel.optim import make_optimizer
from sparsemodel.progress import Progress
from sparsemodel.steps import evaluate_batches, make_eval_step, make_train_step
from sparsemodel.workdir import MetricsLog, WorkdirLock, truncate_metrics


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step."""


@dataclass
class TrainResult:
    step: int
    train_loss: float
    val_loss: float | None
    tokens_per_s: float
    wall_s: float
    unigram_entropy: float  # nats/token of the validation split's unigram: the no-context loss
    checkpoint_s: float = 0.0  # time the loop spent blocked in checkpoint saves


# ------------------------------------------------------------------------- the run


def run(
    cfg: Config, workdir: str | Path, *, stop_after: int | None = None, log=print
) -> TrainResult:
    """Trains `cfg` in `workdir`, resuming from its newest checkpoint if there is one.

    stop_after: stop after this many steps of this call (with a checkpoint), as if
    preempted; the learning-rate schedule still runs to train.steps.
    """
    t_start = time.perf_counter()
    t = cfg.train
    # SIGTERM / SIGINT from here on: stop at the next safe point. A KeyboardInterrupt raised
    # while XLA compiles can land in a callback that swallows it, and the run went on.
    stop = StopRequest()

    # --- workdir: ours alone for the run (process 0 holds the lock for all) ------------
    workdir = make_workdir(workdir)
    lock = WorkdirLock(workdir).acquire() if jax.process_index() == 0 else None
    try:
        check_resumable(cfg, workdir)
        # --- mesh: every array and collective below lives on it --------------------------
        mesh = sharding.make_mesh(cfg.mesh)
        batch_div = sharding.batch_divisor(mesh)
        if t.batch_size % batch_div or (t.batch_size // t.grad_accum) % batch_div:
            raise ConfigError(
                f"train.batch_size: {t.batch_size} (per micro-batch "
                f"{t.batch_size // t.grad_accum}) is not divisible by the {batch_div} batch "
                "shards of the mesh (data x fsdp x expert)"
            )
        memory.check_training_fits(cfg, mesh)
        if jax.process_index() == 0:
            config_lib.dump(cfg, workdir / "config.yaml")
        with jax.set_mesh(mesh):
            return _train_on_mesh(cfg, workdir, mesh, stop_after, log, (t_start, stop))
    finally:
        stop.release()
        if lock is not None:
            lock.release()


def _train_on_mesh(cfg: Config, workdir: Path, mesh, stop_after, log, started) -> TrainResult:
    t = cfg.train

    # --- data ----------------------------------------------------------------------------
    corpus = data_lib.load_tokenized_corpus(cfg, workdir, log)
    data_lib.check_length(corpus.train, t.seq_len, t.batch_size, "train", cfg.data.source)
    data_lib.check_token_ids(cfg.data.source, cfg.model.vocab_size, corpus.train, corpus.val)
    train_iter = data_lib.train_iterator(corpus.train, t.seq_len, t.batch_size, t.seed, *_process())
    val_batches = lambda: data_lib.eval_batches(  # noqa: E731
        corpus.val, t.seq_len, t.batch_size, t.eval_batches, *_process()
    )

    # --- model and optimizer: created in their shardings, then restored if saved -----
    graphdef, params = init_params(cfg, mesh, t.seed)
    tx = make_optimizer(t)
    opt_state = init_opt_state(tx, params, mesh)
    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
    start, params, opt_state = restore_newest(cfg, ckpt, params, opt_state, train_iter, log)
    if jax.process_index() == 0:
        truncate_metrics(workdir / "metrics.jsonl", start, log)

    # --- the compiled step, and what it costs ---------------------------------------------
    train_step = jax.jit(make_train_step(graphdef, cfg, tx), donate_argnums=(0, 1))
    first = sharding.put_batch(
        np.zeros((t.batch_size // jax.process_count(), t.seq_len + 1), np.int32), mesh
    )
    log("compiling the training step ...")
    compiled = train_step.lower(params, opt_state, first, jnp.int32(start + 1)).compile()
    for line in startup_report(cfg, mesh, params, opt_state, compiled, corpus):
        log(line)

    # --- the loop ---------------------------------------------------------------------------
    loop = StepLoop(cfg, mesh, start, stop_after, *started)
    steps = (compiled, jax.jit(make_eval_step(graphdef)))
    _loop(cfg, workdir, loop, ckpt, steps, params, opt_state, train_iter, val_batches)
    return loop.result(data_lib.unigram_entropy(corpus.val))


def _loop(cfg, workdir, loop, ckpt, steps, params, opt_state, train_iter, val_batches) -> None:
    """Steps from loop's start to loop.last_step: log, validate and checkpoint as due."""
    t, (train_step, eval_step), stop = cfg.train, steps, loop.stop
    logs = RunLogs(workdir, loop.start + 1) if jax.process_index() == 0 else None
    try:
        for step in range(loop.start + 1, loop.last_step + 1):
            if stop.signal:  # it came before the first step (while compiling): nothing new
                loop.progress.message(f"signal {stop.signal}: stopping before step {step}")
                loop.last_step = step - 1
                break
            ckpt.check_saved()  # a background save that failed stops the run now
            batch = sharding.put_batch(next(train_iter), loop.mesh)
            t0 = time.perf_counter()
            params, opt_state, m = train_step(params, opt_state, batch, jnp.int32(step))
            record = loop.record(step, jax.device_get(m), time.perf_counter() - t0)
            if not loop.finite(record):
                ckpt.wait()
                raise TrainingError(loop.divergence(record, ckpt.latest_step()))
            loop.check_routing(step, record)
            if step % t.eval_every == 0 or step == t.steps:
                record["val_loss"] = loop.validate(eval_step, params, val_batches())
            if logs is not None:
                logs.write(step, record, ckpt)
            loop.show(step, record)
            if step % t.checkpoint_every == 0 or step == loop.last_step or stop.signal:
                meta = {"step": step, "data": train_iter.get_state(), "seed": t.seed}
                loop.timed_save(ckpt, step, params, opt_state, meta | {"model": model_record(cfg)})
            if stop.signal:
                loop.progress.message(f"signal {stop.signal}: saved step {step}, stopping")
                loop.last_step = step
                break
        ckpt.wait()
    finally:
        loop.progress.close()
        if logs is not None:
            logs.close()
        ckpt.close_quietly()


def restore_newest(cfg: Config, ckpt: Checkpointer, params, opt_state, train_iter, log):
    """(step, params, opt_state) of the newest good checkpoint, or (0, the fresh ones).

    A damaged checkpoint is set aside and the one before it tried; a checkpoint of another
    model is refused (ConfigError). The data iterator is moved to the restored position."""
    restored = ckpt.restore_newest_good(params, opt_state, warn=log, model=cfg)
    if restored is None:
        return 0, params, opt_state
    start, params, restored_opt_state, meta = restored
    if restored_opt_state is not None:
        opt_state = restored_opt_state
    else:  # a params-only step (e.g. from `sparsemodel import-hf`): fresh optimizer
        log(f"{ckpt.directory}/{start} holds parameters only: fresh optimizer state")
    if meta.get("data") is not None:
        train_iter.set_state(meta["data"])
    log(f"resumed from {ckpt.directory}/{start}")
    return start, params, opt_state


class StepLoop:
    """What the step loop keeps between steps: timings, the latest losses, the progress
    line, the step it will stop after, and the stop request (a signal) it polls."""

    def __init__(self, cfg, mesh, start: int, stop_after: int | None, t_start: float, stop):
        t = cfg.train
        self.cfg, self.mesh, self.start, self.t_start = cfg, mesh, start, t_start
        self.stop: StopRequest = stop
        self.tokens_per_step = t.batch_size * t.seq_len
        # MFU: model FLOPs (PaLM convention) against the devices' peak (measured on CPU).
        self.flops_per_step = flops.model_flops_per_token(cfg) * self.tokens_per_step
        self.peak = hardware.peak_flops_per_device()[0] * mesh.size
        self.last_step = t.steps if stop_after is None else min(t.steps, start + stop_after)
        self.progress = Progress(t.steps, start, every=t.log_every)
        self.health = RoutingHealth(t.log_every, cfg.moe.health_intervals)
        self.step_times: list[float] = []
        self.loss: float | None = None
        self.val_loss: float | None = None
        self.checkpoint_s = 0.0  # time the loop spent blocked in checkpoint saves

    def record(self, step: int, m: dict, step_s: float) -> dict:
        """The metrics.jsonl line of a step."""
        self.step_times.append(step_s)
        self.loss = float(m["loss"])
        recent = statistics.median(self.step_times[-20:])
        return {
            "step": step,
            **{k: _json(v) for k, v in m.items()},
            "tokens_per_s": self.tokens_per_step / recent,
            "mfu": self.flops_per_step / recent / self.peak,
            "rss_mib": resident_mib(),
            "time_s": time.perf_counter() - self.t_start,  # wall time since this run began
        }

    @staticmethod
    def finite(record: dict) -> bool:
        return all(math.isfinite(record[k]) for k in ("loss", "grad_norm", "param_norm"))

    @staticmethod
    def divergence(record: dict, last_saved: int | None) -> str:
        return (
            f"step {record['step']}: non-finite loss ({record['loss']}), gradient norm "
            f"({record['grad_norm']}) or parameter norm ({record['param_norm']}); stopped. "
            f"Last good checkpoint: {last_saved if last_saved is not None else 'none'} "
            "(try a lower train.lr)"
        )

    def check_routing(self, step: int, record: dict) -> None:
        """Adds the routing health counts to the record at the end of each log interval,
        and shows the health warning when one is due (health.py)."""
        if "load" not in record:
            return  # a dense model
        counts, warning = self.health.add(step, record["load"])
        record.update(counts)
        if warning:
            self.progress.message(warning)

    def validate(self, eval_step, params, batches) -> float:
        self.val_loss, _ = evaluate_batches(eval_step, params, batches, self.mesh)
        self.progress.message(
            f"validation loss {self.val_loss:.4f} ({self.val_loss / math.log(2):.3f} bits/token)"
        )
        return self.val_loss

    def show(self, step: int, record: dict) -> None:
        fields = {"loss": record["loss"], "lr": record["lr"]}
        fields |= {"tok/s": round(record["tokens_per_s"]), "mfu": f"{record['mfu']:.1%}"}
        self.progress.update(step, fields)

    def timed_save(self, ckpt: Checkpointer, step: int, params, opt_state, meta) -> None:
        t0 = time.perf_counter()
        ckpt.save(step, params, opt_state, meta)
        self.checkpoint_s += time.perf_counter() - t0  # the loop's blocked time

    def result(self, unigram_entropy: float) -> TrainResult:
        median = statistics.median(self.step_times) if self.step_times else 0.0
        return TrainResult(
            self.last_step,
            self.loss if self.loss is not None else float("nan"),
            self.val_loss,
            self.tokens_per_step / median if median else 0.0,
            time.perf_counter() - self.t_start,
            unigram_entropy,
            self.checkpoint_s,
        )


# ------------------------------------------------------------------------- helpers


class RunLogs:
    """Process 0's record of the run: metrics.jsonl and the TensorBoard events."""

    def __init__(self, workdir: Path, first_step: int):
        self.metrics = MetricsLog(workdir / "metrics.jsonl")
        self.events = EventLog(workdir, first_step)

    def write(self, step: int, record: dict, ckpt: Checkpointer) -> None:
        try:
            self.metrics.write(record)
            self.events.write(step, record)
        except StorageError:
            ckpt.wait()  # a background save that filled the disk is the cause: name it
            raise

    def close(self) -> None:
        self.metrics.close()
        self.events.close()


class StopRequest:
    """Turns the first SIGTERM or SIGINT into a request the loop polls after each step (so
    it checkpoints the step and exits cleanly); a second signal acts as usual."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum, _frame):
        self.signal = signum
        self.release()

    def release(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}


def make_workdir(workdir: str | Path) -> Path:
    """Creates the workdir and checks that this process can write in it."""
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise ConfigError(f"--workdir {workdir}: exists and is not a directory")
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write-test-{jax.process_index()}"  # one per process: no race
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--workdir {workdir}: not writable ({e.strerror})") from None
    return workdir


def check_resumable(cfg: Config, workdir: Path) -> None:
    """Refuses a config whose model differs from the record of the workdir's newest
    readable checkpoint, before anything is loaded or compiled (restore checks again,
    array by array). Steps whose meta cannot be read are left to restore's damage path."""
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        for step in reversed(ckpt.steps()):
            try:
                record = ckpt.meta(step).get("model")
            except CheckpointError:
                continue
            if record:
                config_lib.check_model_record(record, cfg, f"checkpoint step {step} in {workdir}")
            return
    finally:
        ckpt.close()


def startup_report(cfg, mesh, params, opt_state, compiled, corpus) -> list[str]:
    mem = compiled.memory_analysis()
    mib = lambda b: f"{b / 2**20:.1f} MiB"  # noqa: E731
    n_params, active = count(params), flops.param_counts(cfg).active_per_token
    shape = " x ".join(f"{a}={s}" for a, s in mesh.shape.items())
    lines = [
        f"mesh: {shape} ({mesh.size} {jax.devices()[0].platform} device(s), "
        f"{jax.process_count()} process(es))",
        f"parameters: {n_params:,} total, {active:,} active per token; per device "
        f"{mib(sharding.bytes_per_device(params))} params + "
        f"{mib(sharding.bytes_per_device(opt_state))} optimizer state",
    ]
    if mem is not None:
        lines.append(
            f"compiled train step per device: {mib(mem.argument_size_in_bytes)} arguments, "
            f"{mib(mem.output_size_in_bytes)} outputs, {mib(mem.temp_size_in_bytes)} temporaries"
        )
    lines.append(
        f"data: {corpus.description}: {len(corpus.train):,} train / "
        f"{len(corpus.val):,} validation tokens"
    )
    return lines


def resident_mib() -> float | None:
    """Resident memory of this process (Linux /proc; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _process() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def _json(v):
    v = np.asarray(v)
    return v.tolist() if v.ndim else float(v)

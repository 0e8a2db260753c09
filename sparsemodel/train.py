"""The training loop, top to bottom: workdir -> mesh -> data -> model and optimizer (born
sharded) -> restore -> compiled step -> loop (log, validate, checkpoint).

A run stopped at any checkpoint and resumed continues the exact loss curve: parameters,
optimizer state and the data iterator's position are restored, and each step's random key
is derived from (seed, step) rather than carried.
"""

from __future__ import annotations

import json
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
import optax
from flax import nnx

from sparsemodel import config as config_lib
from sparsemodel import data as data_lib
from sparsemodel import flops, hardware, sharding
from sparsemodel import tokenizer as tokenizer_lib
from sparsemodel.checkpoint import Checkpointer
from sparsemodel.config import Config, ConfigError
from sparsemodel.events import EventLog
from sparsemodel.model import aux_losses
from sparsemodel.optim import global_norm, make_optimizer, schedule
from sparsemodel.params import count, init_opt_state, init_params
from sparsemodel.progress import Progress


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


# ------------------------------------------------------------------------ the maths


def cross_entropy(logits, targets, mask=None):
    """Sum and count of token negative log-likelihoods over non-padding targets."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, S]
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def make_loss_fn(graphdef, cfg: Config):
    def loss_fn(params, batch, key):
        lm = nnx.merge(graphdef, params)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, S] each
        logits, stats = lm(inputs, key=key)
        nll_sum, n = cross_entropy(logits, targets)
        lm_loss = nll_sum / jnp.maximum(n, 1.0)
        lb, z = aux_losses(stats)
        loss = lm_loss + cfg.moe.lb_coef * lb + cfg.moe.z_coef * z
        return loss, {"lm_loss": lm_loss, "lb_loss": lb, "z_loss": z, "stats": stats}

    return loss_fn


def make_train_step(graphdef, cfg: Config, tx: optax.GradientTransformation):
    """(params, opt_state, batch [B, S+1], step) -> (params, opt_state, metrics)."""
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, cfg), has_aux=True)
    n_micro = cfg.train.grad_accum
    lr_at = schedule(cfg.train)

    def train_step(params, opt_state, batch, step):
        key = None
        if cfg.moe.jitter > 0:
            key = jax.random.fold_in(jax.random.key(cfg.train.seed), step)
        if n_micro == 1:
            (loss, aux), grads = grad_fn(params, batch, key)
        else:
            micro = batch.reshape(n_micro, -1, batch.shape[-1])  # [A, B/A, S+1]

            def accumulate(grads, mb):
                (loss, aux), g = grad_fn(params, mb, key)
                return jax.tree.map(jnp.add, grads, g), (loss, aux)

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (loss, aux) = jax.lax.scan(accumulate, zeros, micro)
            grads = jax.tree.map(lambda g: g / n_micro, grads)
            loss, aux = jax.tree.map(lambda x: x.mean(0), (loss, aux))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = aux.pop("stats")
        metrics = {
            "loss": loss,
            **aux,
            "grad_norm": global_norm(grads),
            "param_norm": global_norm(params),
            "lr": lr_at(step - 1),
        }
        if stats is not None:
            metrics.update(
                dropped=stats.dropped.mean(),
                layer_dropped=stats.dropped,
                max_load=stats.max_load.max(),
                load=stats.load,
            )
        return params, opt_state, metrics

    return train_step


def make_eval_step(graphdef):
    """(params, batch [B, S+1]) -> (sum of token NLLs, number of tokens)."""

    def eval_step(params, batch):
        logits, _ = nnx.merge(graphdef, params)(batch[:, :-1])
        return cross_entropy(logits, batch[:, 1:])

    return eval_step


def evaluate_batches(eval_step, params, batches, mesh) -> tuple[float, int]:
    """Mean NLL (nats/token) and token count over an iterable of host batches."""
    total, n = 0.0, 0
    for batch in batches:
        s, c = eval_step(params, sharding.put_batch(batch, mesh))
        total, n = total + float(s), n + int(c)
    return total / max(n, 1), n


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

    # --- workdir: the resolved config, checked against what earlier runs trained --------
    workdir = prepare_workdir(cfg, workdir)

    # --- mesh: every array and collective below lives on it ------------------------------
    mesh = sharding.make_mesh(cfg.mesh)
    batch_div = sharding.batch_divisor(mesh)
    if t.batch_size % batch_div or (t.batch_size // t.grad_accum) % batch_div:
        raise ConfigError(
            f"train.batch_size: {t.batch_size} (per micro-batch {t.batch_size // t.grad_accum}) "
            f"is not divisible by the {batch_div} batch shards of the mesh (data x fsdp x expert)"
        )
    with jax.set_mesh(mesh):
        return _train_on_mesh(cfg, workdir, mesh, stop_after, log, t_start)


def _train_on_mesh(cfg: Config, workdir: Path, mesh, stop_after, log, t_start) -> TrainResult:
    t = cfg.train
    is_lead = jax.process_index() == 0

    # --- data ----------------------------------------------------------------------------
    corpus = load_tokenized_corpus(cfg, workdir, log)
    data_lib.check_length(corpus.train, t.seq_len, t.batch_size, "train", cfg.data.source)
    data_lib.check_vocab(corpus.train, cfg.model.vocab_size, cfg.data.source)
    train_iter = data_lib.train_iterator(
        corpus.train, t.seq_len, t.batch_size, t.seed, jax.process_index(), jax.process_count()
    )
    val_batches = lambda: data_lib.eval_batches(  # noqa: E731
        corpus.val,
        t.seq_len,
        t.batch_size,
        t.eval_batches,
        jax.process_index(),
        jax.process_count(),
    )

    # --- model and optimizer, created in their shardings ------------------------------
    graphdef, params = init_params(cfg, mesh, t.seed)
    tx = make_optimizer(t)
    opt_state = init_opt_state(tx, params, mesh)

    # --- restore --------------------------------------------------------------------------
    ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
    start = 0
    restored = ckpt.restore_newest_good(params, opt_state, warn=log)
    if restored is not None:
        start, params, restored_opt_state, meta = restored
        if restored_opt_state is not None:
            opt_state = restored_opt_state
        else:  # a params-only step (e.g. from `sparsemodel import-hf`): fresh optimizer
            log(f"{workdir}/checkpoints/{start} holds parameters only: fresh optimizer state")
        if meta.get("data") is not None:
            train_iter.set_state(meta["data"])
        log(f"resumed from {workdir}/checkpoints/{start}")
    metrics_path = workdir / "metrics.jsonl"
    if is_lead:
        truncate_metrics(metrics_path, start)

    # --- the compiled step, and what it costs ---------------------------------------------
    train_step = jax.jit(make_train_step(graphdef, cfg, tx), donate_argnums=(0, 1))
    eval_step = jax.jit(make_eval_step(graphdef))
    first = sharding.put_batch(
        np.zeros((t.batch_size // jax.process_count(), t.seq_len + 1), np.int32), mesh
    )
    compiled = train_step.lower(params, opt_state, first, jnp.int32(start + 1)).compile()
    for line in startup_report(cfg, mesh, params, opt_state, compiled, corpus):
        log(line)

    # --- the loop ---------------------------------------------------------------------------
    # MFU: model FLOPs (PaLM convention) against the devices' peak (measured on CPU).
    flops_per_step = flops.model_flops_per_token(cfg) * t.batch_size * t.seq_len
    peak = hardware.peak_flops_per_device()[0] * mesh.size
    last_step = t.steps if stop_after is None else min(t.steps, start + stop_after)
    tokens_per_step = t.batch_size * t.seq_len
    progress = Progress(t.steps, start, every=t.log_every)
    step_times: list[float] = []
    loss = val_loss = None
    checkpoint_s = 0.0
    events = EventLog(workdir, start + 1) if is_lead else None
    stop = StopRequest()  # SIGTERM / SIGINT: checkpoint this step, then exit cleanly
    with metrics_path.open("a") if is_lead else open("/dev/null", "w") as metrics_file:
        for step in range(start + 1, last_step + 1):
            batch = sharding.put_batch(next(train_iter), mesh)
            t0 = time.perf_counter()
            params, opt_state, m = compiled(params, opt_state, batch, jnp.int32(step))
            m = jax.device_get(m)
            step_times.append(time.perf_counter() - t0)
            loss = float(m["loss"])
            if not all(map(math.isfinite, (loss, m["grad_norm"], m["param_norm"]))):
                ckpt.wait()
                last = ckpt.latest_step()
                stop.release()
                if events is not None:
                    events.close()
                raise TrainingError(
                    f"step {step}: non-finite loss ({loss}), gradient norm "
                    f"({float(m['grad_norm'])}) or parameter norm ({float(m['param_norm'])}); "
                    f"stopped. Last good checkpoint: {last if last is not None else 'none'} "
                    "(try a lower train.lr)"
                )
            step_s = statistics.median(step_times[-20:])
            tokens_per_s = tokens_per_step / step_s
            record = {
                "step": step,
                **{k: _json(v) for k, v in m.items()},
                "tokens_per_s": tokens_per_s,
                "mfu": flops_per_step / step_s / peak,
                "rss_mib": resident_mib(),
                "time_s": time.perf_counter() - t_start,  # wall time since this run began
            }
            if step % t.eval_every == 0 or step == t.steps:
                val_loss, _ = evaluate_batches(eval_step, params, val_batches(), mesh)
                record["val_loss"] = val_loss
                progress.message(
                    f"step {step}: validation loss {val_loss:.4f} "
                    f"({val_loss / math.log(2):.3f} bits/token)"
                )
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            if events is not None:
                events.write(step, record)
            progress.update(
                step,
                {
                    "loss": loss,
                    "lr": float(m["lr"]),
                    "tok/s": round(tokens_per_s),
                    "mfu": f"{record['mfu']:.1%}",
                },
            )
            if step % t.checkpoint_every == 0 or step == last_step or stop.signal:
                t_save = time.perf_counter()
                ckpt.save(
                    step,
                    params,
                    opt_state,
                    {"step": step, "data": train_iter.get_state(), "seed": t.seed},
                )
                checkpoint_s += time.perf_counter() - t_save  # the loop's blocked time
            if stop.signal:
                progress.message(f"signal {stop.signal}: saved step {step}, stopping")
                last_step = step
                break
    stop.release()
    progress.close()
    if events is not None:
        events.close()
    ckpt.wait()
    ckpt.close()
    wall = time.perf_counter() - t_start
    tokens_per_s = tokens_per_step / statistics.median(step_times) if step_times else 0.0
    return TrainResult(
        last_step,
        loss if loss is not None else float("nan"),
        val_loss,
        tokens_per_s,
        wall,
        data_lib.unigram_entropy(corpus.val),
        checkpoint_s,
    )


# ------------------------------------------------------------------------- helpers


def load_tokenized_corpus(cfg: Config, workdir: Path, log=print) -> data_lib.Corpus:
    """The corpus in the workdir's tokenizer's ids (training the tokenizer the first time).

    With several processes, process 0 trains and writes tokenizer.json and the token
    cache; the others wait at a barrier, then read the same file (shared workdir).
    """
    raw = data_lib.load_corpus(cfg.data.source, cfg.data.val_fraction)
    is_lead = jax.process_index() == 0
    tok = tokenizer_lib.for_workdir(
        cfg,
        workdir,
        lambda: data_lib.training_bytes(raw, cfg.data.source),
        is_lead=is_lead,
        wait=_barrier("tokenizer.json"),
        log=log,
    )
    return data_lib.tokenize(raw, tok, workdir, write=is_lead, log=log)


def _barrier(name: str):
    if jax.process_count() == 1:
        return lambda: None
    from jax.experimental import multihost_utils

    return lambda: multihost_utils.sync_global_devices(name)


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


def prepare_workdir(cfg: Config, workdir: str | Path) -> Path:
    """Creates the workdir, refuses a config whose shapes differ from its checkpoints', and
    writes the resolved config.yaml."""
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
    stored = workdir / "config.yaml"
    if stored.exists() and (workdir / "checkpoints").exists():
        config_lib.check_same_shapes(config_lib.load_stored(stored), cfg)
    if jax.process_index() == 0:
        config_lib.dump(cfg, stored)
    return workdir


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drops metric lines past the restored step, so a resumed run's log has one line
    per step (a killed run may have logged steps it never checkpointed)."""
    if not path.exists():
        return
    lines = [
        ln
        for ln in path.read_text().splitlines()
        if ln.strip() and json.loads(ln)["step"] <= last_step
    ]
    path.write_text("".join(ln + "\n" for ln in lines))


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


def _json(v):
    v = np.asarray(v)
    return v.tolist() if v.ndim else float(v)

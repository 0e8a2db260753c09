"""Training a study run into its result JSON, upcycling from a dense mid-point, and the
alternating step-time calibration (`python experiments/study.py --calibrate`)."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
from bench_record import cpu_model  # experiments/ is on sys.path
from study import (
    EVALS,
    PRESET,
    SIZES,
    Paths,
    Run,
    best_moe_arms,
    dense_overrides,
    gpu_runs,
    load_step_times,
    missing_feature,
    timing_key,
)

from sparsemodel import config, flops, train
from sparsemodel.files import write_atomic

ROOT = Path(__file__).resolve().parent.parent


class StudyError(RuntimeError):
    """A run cannot start (e.g. its upcycling source is gone): one line saying why."""


# ------------------------------------------------------------------- where and when


def code_version() -> dict:
    """The commit the code runs at, and whether the library or experiments differ from it."""

    def git(*args):
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return out.stdout.strip() if out.returncode == 0 else None

    # The report rewrites experiments/README.md and the plots: neither is code.
    code = ["sparsemodel", "experiments", ":!experiments/README.md", ":!experiments/results"]
    changed = git("status", "--porcelain", "--untracked-files=no", "--", *code)
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(changed)}


def provenance() -> dict:
    """What every record carries: code version, UTC time, machine and load."""
    return {
        **code_version(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "load_avg": os.getloadavg(),
    }


# ---------------------------------------------------------------------- one run


def train_and_record(run: Run, runs: dict[str, Run], paths: Paths) -> bool:
    """Trains `run` (resuming where a stopped attempt left it) and writes its result JSON;
    False when training stopped before the last step (Ctrl-C, SIGTERM)."""
    workdir = paths.runs / run.name
    spec_file = workdir / "study_spec.json"
    # A workdir of another command under this name would resume a different run; an
    # upcycled run's workdir without checkpoints is an upcycle that did not finish.
    other = workdir.exists() and _read(spec_file) != _spec_text(run)
    if other or (run.upcycle and not (workdir / "checkpoints").exists()):
        shutil.rmtree(workdir, ignore_errors=True)
    if run.upcycle and not workdir.exists():
        upcycle(run, runs[run.upcycle["source"]], paths, workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_atomic(spec_file, _spec_text(run))
    cfg = run.config()
    result = train.run(cfg, workdir, log=lambda line: print(f"[{run.name}] {line}", flush=True))
    if result.step < cfg.train.steps:
        return False
    record = make_record(run, cfg, workdir, result)
    if run.upcycle:
        record["upcycle_log"] = _read(workdir / "upcycle.log")
    paths.results.mkdir(parents=True, exist_ok=True)
    write_atomic(paths.result(run.name), json.dumps(record, indent=1) + "\n")
    return True


def _spec_text(run: Run) -> str:
    return json.dumps(run.spec(), sort_keys=True)


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def upcycle(run: Run, source: Run, paths: Paths, workdir: Path) -> None:
    """Writes the upcycled parameters-only step 0 into workdir with `sparsemodel upcycle`,
    from a copy of the source run's mid-point checkpoint; its output to upcycle.log."""
    step = run.upcycle["step"]
    mid = paths.runs / source.name / "checkpoints" / str(step)
    if not mid.exists():
        raise StudyError(
            f"{mid} is gone: delete {paths.result(source.name)} to train {source.name} again"
            if paths.result(source.name).exists()
            else f"train {source.name} first: its mid-point checkpoint seeds this run"
        )
    # The command upcycles a workdir's newest step: give it one whose newest is the middle.
    src = paths.runs / f"{source.name}-step{step}"
    if not src.exists():
        (src / "checkpoints").mkdir(parents=True)
        shutil.copy(paths.runs / source.name / "config.yaml", src / "config.yaml")
        shutil.copytree(mid, src / "checkpoints" / str(step))
    moe = [f"{k}={v}" for k, v in run.overrides.items() if k.startswith("moe.")]
    command = [sys.executable, "-m", "sparsemodel.cli", "upcycle", "--from", str(src)]
    command += ["--workdir", str(workdir), "--method", run.upcycle["method"]]
    if "drop" in run.upcycle:
        command += ["--drop", str(run.upcycle["drop"])]
    command += ["--set", *moe]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        last = output.strip().splitlines()[-1] if output.strip() else f"exit {done.returncode}"
        raise StudyError(f"{run.name}: sparsemodel upcycle failed: {last}")
    write_atomic(workdir / "upcycle.log", output)
    print(f"[{run.name}] {output.strip()}", flush=True)


# ------------------------------------------------------------------- the record


def make_record(run: Run, cfg: config.Config, workdir: Path, result: train.TrainResult) -> dict:
    """The result JSON of a finished run, from its metrics.jsonl and TrainResult."""
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    wall = cumulative_wall(records)
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    counts = flops.param_counts(cfg)
    flop = flops.model_flops_per_token(cfg)
    evals = [r for r in records if "val_loss" in r]
    train_curve = window_means(records, cfg.train.log_every)
    return {
        "name": run.name,
        "size": run.size,
        "arm": run.arm,
        "parts": run.parts,
        "twin": run.twin,
        "spec": run.spec(),
        **provenance(),
        "preset": PRESET,
        "overrides": run.overrides,
        "config": cfg.to_dict(),
        "seed": cfg.train.seed,
        "steps": records[-1]["step"],
        "tokens": records[-1]["step"] * tokens_per_step,
        "tokens_per_step": tokens_per_step,
        "unique_params": counts.unique,
        "total_params": counts.total,
        "active_params": counts.active_per_token,
        "flops_per_token": flop,
        "train_curve": train_curve,
        "val_curve": {
            "step": [r["step"] for r in evals],
            "tokens": [r["step"] * tokens_per_step for r in evals],
            "flops": [r["step"] * tokens_per_step * flop for r in evals],
            "val_loss": [r["val_loss"] for r in evals],
            "wall_s": [wall[r["step"]] for r in evals],
        },
        "final_train_loss": train_curve["loss"][-1],
        "final_val_loss": evals[-1]["val_loss"],
        "median_step_s": tokens_per_step / result.tokens_per_s,
        "wall_s": wall[records[-1]["step"]],
        "segments": 1 + sum(b["time_s"] < a["time_s"] for a, b in itertools.pairwise(records)),
        "dropped": statistics.mean(r.get("dropped", 0.0) for r in records[len(records) // 2 :]),
        "unigram_entropy": result.unigram_entropy,
    }


def cumulative_wall(records: list[dict]) -> dict[int, float]:
    """Seconds since the run first started at each step, setup included, summed over the
    segments of a resumed run (each restarts its `time_s` clock)."""
    out, offset, last = {}, 0.0, 0.0
    for r in records:
        if r["time_s"] < last:  # a resumed segment: its clock restarted
            offset += last
        last = r["time_s"]
        out[r["step"]] = offset + r["time_s"]
    return out


def window_means(records: list[dict], every: int) -> dict:
    """The training LM loss averaged over each window of `every` steps (one step is noisy)."""
    steps, losses = [], []
    for end in range(every, records[-1]["step"] + 1, every):
        window = [r["lm_loss"] for r in records if end - every < r["step"] <= end]
        steps.append(end)
        losses.append(sum(window) / len(window))
    return {"step": steps, "loss": losses}


# -------------------------------------------------------------- step-time calibration


def calibrate(chosen: list[Run], paths: Paths, repeats: int, again: bool, dry_run: bool):
    """Step times of every shape among `chosen` that has none at this commit (every shape
    with `again`), each measured alternating with its size's dense twin in this process
    (`repeats` rounds), appended to step_times.jsonl."""
    commit = code_version()["commit"]
    measured = load_step_times(paths)
    by_size: dict[int, dict[str, Run]] = {}
    for run in chosen:
        missing = missing_feature(run)
        if missing:
            print(f"skip {run.name}: {missing}")
            continue
        by_size.setdefault(run.size, {}).setdefault(timing_key(run.overrides), run)
    for size, shapes in sorted(by_size.items()):
        twin = {**dense_overrides(size), **_batch(next(iter(shapes.values())))}
        stale = {
            k: r for k, r in shapes.items() if again or measured.get(k, {}).get("commit") != commit
        }
        others = {k: r for k, r in stale.items() if k != timing_key(twin)}
        if not stale:
            print(f"d_model {size}: every shape measured at {commit[:9]} already")
            continue
        names = ", ".join(r.name for r in others.values()) or "none"
        print(f"d_model {size}: against the dense twin: {names}")
        if not dry_run:
            _calibrate_size(size, twin, others, chosen, paths, repeats)


def _batch(run: Run) -> dict:
    return {k: run.overrides[k] for k in ("train.batch_size", "train.seq_len")}


def _calibrate_size(size, twin, others, chosen, paths, repeats):
    import bench

    twin_runner = bench._train_step_runner(config.load(PRESET, twin))
    twin_times = []
    for key, run in others.items():
        runner = bench._train_step_runner(run.config())
        rounds = bench.alternate({"run": runner, "twin": twin_runner}, repeats)
        times = [r["run"] for r in rounds]
        twins = [r["twin"] for r in rounds]
        twin_times += twins
        sharing = [r.name for r in chosen if timing_key(r.overrides) == key]
        record = _timing_record(key, sharing, size, times, twins)
        _append(paths, record)
        print(
            f"  {run.name}: {record['step_s']['median'] * 1e3:.0f} ms, "
            f"x{record['ratio']:.3f} of dense ({record['twin_step_s']['median'] * 1e3:.0f} ms)"
        )
        del runner
    if not others:  # only the dense twin itself: time it alone
        twin_times = [r["twin"] for r in bench.alternate({"twin": twin_runner}, repeats)]
    dense_names = [r.name for r in chosen if timing_key(r.overrides) == timing_key(twin)]
    _append(paths, _timing_record(timing_key(twin), dense_names, size, twin_times, twin_times))


def _timing_record(key, names, size, times, twin_times) -> dict:
    def stats(xs):
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}

    ratios = [a / b for a, b in zip(times, twin_times, strict=True)]
    return {
        "key": key,
        "names": names,
        "size": size,
        **provenance(),
        "repeats": len(times),
        "step_s": stats(times),
        "twin_step_s": stats(twin_times),
        "ratio": statistics.median(ratios),
    }


def _append(paths: Paths, record: dict) -> None:
    paths.results.mkdir(parents=True, exist_ok=True)
    with (paths.results / "step_times.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------ the GPU headline


def gpu_headline(results: dict[str, dict], paths: Paths, seconds: float) -> int:
    """Dense and the best MoE of the CPU study's largest size (8 experts top-2 until it is
    known, or when its routing is not merged) on this machine's GPU: step times measured
    alternating, then both trained for the steps the slower one runs in `seconds`, so
    they see equal tokens. Writes results/study/gpu-<arm>.json."""
    import tempfile

    import bench

    if jax.default_backend() != "gpu":
        print(f"--gpu: no GPU here (jax backend {jax.default_backend()})", file=sys.stderr)
        return 2
    arm = best_moe_arms(results).get(SIZES[-1], "moe8")
    if missing_feature(gpu_runs(arm, EVALS)[1]):
        arm = "moe8"
    runners = {run.name: bench._train_step_runner(run.config()) for run in gpu_runs(arm, EVALS)}
    rounds = [bench.alternate(runners, 1) for _ in range(3)]
    step_s = {name: statistics.median(r[name] for r in rounds) for name in runners}
    del runners
    steps = max(EVALS, EVALS * int(seconds / max(step_s.values()) / EVALS))
    print(f"GPU step times {step_s}; {steps} steps each", flush=True)
    for run in gpu_runs(arm, steps):
        workdir = Path(tempfile.mkdtemp(prefix=f"study-{run.name}-"))
        cfg = run.config()
        result = train.run(cfg, workdir, log=lambda line, n=run.name: print(f"[{n}] {line}"))
        record = make_record(run, cfg, workdir, result)
        record |= {"alternating_step_s": step_s[run.name], "twin_step_s": step_s["gpu-dense"]}
        paths.results.mkdir(parents=True, exist_ok=True)
        write_atomic(paths.result(run.name), json.dumps(record, indent=1) + "\n")
        shutil.rmtree(workdir)  # parameters of ~26M: nothing resumes from them
        print(f"{run.name}: val {record['final_val_loss']:.4f} after {record['tokens']:,} tokens")
    return 0

"""Harness of the five `make experiments` scripts: run a config + overrides, collect a row, plot.

A run lives in `experiments/runs/<name>-<hash of its resolved config>/` (ignored by git).
When a finished `row.json` there has the same preset and overrides, the row is reused, so
scripts that share a baseline (e.g. the 8-expert top-2 model) train it once and an
interrupted experiment picks up where it stopped. Stopping a run with SIGTERM (train.run
checkpoints and returns) keeps it as a shorter row: its schedule stays the one configured.

Every row names: config name and overrides, seed, tokens, unique / total / active params,
model FLOPs per token, final train and validation loss, wall time, and carries the curves
(validation loss per eval step with the wall time at which it was measured, smoothed
training loss, dropped fraction, per-layer expert load).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import jax

from sparsemodel import config, flops, train

HERE = Path(__file__).parent
# EXPERIMENTS_OUT=DIR sends results and run directories elsewhere (e.g. for a smoke test).
_OUT = Path(os.environ["EXPERIMENTS_OUT"]) if os.environ.get("EXPERIMENTS_OUT") else None
RESULTS = _OUT / "results" if _OUT else HERE / "results"
RUNS = _OUT / "runs" if _OUT else HERE / "runs"

# The shared smaller model of experiments 2-5: `small` at half width (d_model 128,
# d_expert 256, 8 experts top-2, 4 layers, seq 128, batch 16).
SMALLER = {
    "model.d_model": 128,
    "model.n_heads": 4,
    "model.n_kv_heads": 4,
    "model.d_ff": 512,
    "moe.d_expert": 256,
}


def schedule(steps: int, eval_every: int, eval_batches: int = 8) -> dict:
    """Training-length overrides: warmup 10% of the run, cosine to the end, eval cadence,
    and checkpoints only at the end (a save costs ~0.1 s; we never resume these runs)."""
    return {
        "train.steps": steps,
        "train.warmup_steps": max(1, steps // 10),
        "train.eval_every": min(eval_every, steps),
        "train.eval_batches": eval_batches,
        "train.checkpoint_every": steps,
        "train.keep_checkpoints": 1,
        "train.log_every": max(1, eval_every),
    }


def hardware_note() -> str:
    return (
        f"{os.cpu_count()} CPU cores ({platform.machine()}), shared with other jobs "
        f"(wall times measured under contention), jax {jax.__version__} on "
        f"{jax.default_backend()}, float32"
    )


def run(name: str, preset: str, overrides: dict, *, label: str | None = None, log=None) -> dict:
    """Trains preset + overrides (or reuses a finished identical run) and returns its row."""
    cfg = config.load(preset, overrides)
    key = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode()).hexdigest()[:10]
    workdir = RUNS / f"{name}-{key}"
    # Reuse a finished run of the same preset + overrides (under any name). Matching the
    # command rather than the resolved config keeps rows valid while the library's defaults
    # move (e.g. a preset's block size); delete experiments/runs/ to retrain from scratch.
    spec = _spec(preset, overrides)
    for done in sorted(RUNS.glob("*/row.json")):
        row = json.loads(done.read_text())
        if _spec(row["config"], row["overrides"]) == spec:
            row["label"] = label or name
            _say(f"[{name}] reusing {done.parent.name}: val {row['final_val_loss']:.4f}")
            return row
    row_path = workdir / "row.json"
    if workdir.exists():  # an interrupted run: start it afresh so wall times are whole
        import shutil

        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    _say(f"[{name}] training {preset} {overrides} in {workdir}")
    watcher = _MetricsWatcher(workdir / "metrics.jsonl")
    watcher.start()
    t0 = time.perf_counter()
    try:
        result = train.run(cfg, workdir, log=log or (lambda s: None))
    finally:
        watcher.stop()
    wall = time.perf_counter() - t0
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    row = _row(name, preset, overrides, cfg, records, wall, watcher.seen, t0, result)
    row["label"] = label or name
    row_path.write_text(json.dumps(row) + "\n")
    _say(
        f"[{name}] done in {wall:.0f} s: train {row['final_train_loss']:.4f} "
        f"val {row['final_val_loss']:.4f}"
    )
    return row


def _spec(preset: str, overrides: dict) -> str:
    """The command as a key: overrides that restate the preset's value are left out."""
    sections = config.load(preset).to_dict().items()
    flat = {f"{s}.{k}": v for s, vals in sections for k, v in vals.items()}
    kept = {k: v for k, v in overrides.items() if flat.get(k, object()) != v}
    return json.dumps([preset, kept], sort_keys=True)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _MetricsWatcher:
    """Timestamps each metrics.jsonl line as it appears (train.run logs no wall clock)."""

    def __init__(self, path: Path, every: float = 0.2):
        self.path, self.every = path, every
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()
        self._read()

    def _poll(self):
        while not self._stop.wait(self.every):
            self._read()

    def _read(self):
        if not self.path.exists():
            return
        now = time.perf_counter()
        for line in self.path.read_text().splitlines():
            try:
                step = json.loads(line)["step"]
            except (json.JSONDecodeError, KeyError):
                continue  # a line being written
            self.seen.setdefault(step, now)


def _row(name, preset, overrides, cfg, records, wall, seen, t0, result) -> dict:
    t = cfg.train
    tokens_per_step = t.batch_size * t.seq_len
    counts = flops.param_counts(cfg)
    evals = [r for r in records if "val_loss" in r]
    # Training loss: the mean lm_loss of the steps in each eval interval (one batch is noisy).
    train_curve = []
    for e in evals:
        window = [
            r["lm_loss"] for r in records if e["step"] - t.eval_every < r["step"] <= e["step"]
        ]
        train_curve.append(sum(window) / len(window))
    first = min(seen.values()) if seen else t0
    loads = [(r["step"], r["load"]) for r in records if "load" in r]
    return {
        "name": name,
        "config": preset,
        "overrides": overrides,
        "seed": t.seed,
        # A run stopped early (SIGTERM: train.run checkpoints and returns) keeps its
        # schedule; its row reports the steps it trained and its last evaluation.
        "steps": records[-1]["step"],
        "schedule_steps": t.steps,
        "tokens": records[-1]["step"] * tokens_per_step,
        "unique_params": counts.unique,
        "total_params": counts.total,
        "active_params": counts.active_per_token,
        "flops_per_token": flops.model_flops_per_token(cfg),
        "final_train_loss": train_curve[-1],
        "final_val_loss": evals[-1]["val_loss"],
        "wall_s": wall,
        "step_s": tokens_per_step / result.tokens_per_s,
        "dropped": _mean([r.get("dropped", 0.0) for r in records[len(records) // 2 :]]),
        "curve": {
            "step": [e["step"] for e in evals],
            "tokens": [e["step"] * tokens_per_step for e in evals],
            "val_loss": [e["val_loss"] for e in evals],
            "train_loss": train_curve,
            # seconds since the first logged step finished (compile time excluded)
            "wall_s": [seen.get(e["step"], first) - first for e in evals],
        },
        "load": loads[:: max(1, len(loads) // 100)],
        "unigram_entropy": result.unigram_entropy,
    }


def _mean(xs):
    return sum(xs) / len(xs) if xs else 0.0


# ----------------------------------------------------------------------- reporting


def write_json(stem: str, rows: list[dict], extra: dict | None = None) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}.json"
    data = {"hardware": hardware_note(), **(extra or {}), "rows": rows}
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


TABLE_COLUMNS = (
    ("label", "run", "{}"),
    ("overrides", "overrides", "{}"),
    ("seed", "seed", "{}"),
    ("tokens", "tokens", "{:,}"),
    ("unique_params", "unique", "{:,}"),
    ("total_params", "total", "{:,}"),
    ("active_params", "active/token", "{:,}"),
    ("flops_per_token", "FLOPs/token", "{:.3g}"),
    ("final_train_loss", "train loss", "{:.4f}"),
    ("final_val_loss", "val loss", "{:.4f}"),
    ("dropped", "dropped", "{:.3f}"),
    ("step_s", "s/step", "{:.2f}"),
    ("wall_s", "wall s", "{:.0f}"),
)


def markdown_table(rows: list[dict], columns=TABLE_COLUMNS, base: dict | None = None) -> str:
    """Rows as a Markdown table; overrides shown relative to `base` (the shared ones)."""
    head = "| " + " | ".join(title for _, title, _ in columns) + " |"
    lines = [head, "|" + " --- |" * len(columns)]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            if key == "overrides":
                shown = {k: x for k, x in v.items() if base is None or base.get(k) != x}
                v = " ".join(f"{k}={x}" for k, x in shown.items()) or "-"
                cells.append(f"`{v}`" if v != "-" else v)
            else:
                cells.append(fmt.format(v) if v is not None else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_val_curves(ax, rows, x: str = "tokens", y: str = "val_loss", style=None):
    """One line per row on `ax`: validation (or train) loss against tokens/step/wall_s."""
    for r in rows:
        c = r["curve"]
        kwargs = (style or {}).get(r["label"], {})
        xs = [v / 1e6 for v in c[x]] if x == "tokens" else c[x]
        ax.plot(xs, c[y], marker="o", ms=3, lw=1.5, label=r["label"], **kwargs)
    ax.set_xlabel(
        {"tokens": "training tokens (millions)", "step": "step", "wall_s": "wall time (s)"}[x]
    )
    ax.set_ylabel({"val_loss": "validation loss (nats/token)", "train_loss": "train loss"}[y])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def zoom_ylim(ax, rows, skip: int = 1, pad: float = 0.04) -> None:
    """Y range from the best loss to the worst after the first `skip` evals, so the ends of
    the curves (where the runs differ) are readable rather than the initial drop."""
    vals = [v for r in rows for v in r["curve"]["val_loss"]]
    later = [v for r in rows for v in r["curve"]["val_loss"][skip:]] or vals
    ax.set_ylim(min(vals) - pad, max(later) + pad)


def save(fig, stem: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{stem}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path

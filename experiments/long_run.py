"""Long run: does memory stay flat, and what do checkpoints cost?

Trains `tiny` for a few thousand steps with frequent checkpoints, then reports resident
memory after warm-up, half-way and at the end, with the slope over the second half (the
allocator settles in the first half; growth that goes on would be a leak), the time the
training loop spent blocked in checkpoint saves as a fraction of wall time (target < 2%
with async saves), the wall time against the same run saving only its last step (the
background writes share the CPU), and the blocking time of one async save against one
synchronous save of the same state. Writes results JSON and a memory plot beside this file.

    python experiments/long_run.py [--steps 3000] [--checkpoint-every 50]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from sparsemodel import config, initialize, optim, sharding, train
from sparsemodel.checkpoint import Checkpointer

OUT = Path(__file__).parent / "results"


def save_blocking_s(async_save: bool, repeats: int = 5) -> float:
    """Median time `save` blocks the caller, for the tiny model's full training state."""
    cfg = config.load("tiny")
    mesh = sharding.make_mesh(cfg.mesh)
    _, p = initialize.init_params(cfg, mesh, 0)
    o = initialize.init_opt_state(optim.make_optimizer(cfg.train), p, mesh)
    workdir = Path(tempfile.mkdtemp())
    ckpt = Checkpointer(workdir, keep=2, async_save=async_save)
    times = []
    for step in range(1, repeats + 1):
        t0 = time.perf_counter()
        ckpt.save(step, p, o, {"step": step})
        times.append(time.perf_counter() - t0)
        ckpt.wait()  # let the write finish outside the timed part
    ckpt.close()
    shutil.rmtree(workdir)
    return statistics.median(times)


def _train(steps: int, checkpoint_every: int, workdir: Path):
    cfg = config.load(
        "tiny",
        {
            "train.steps": steps,
            "train.checkpoint_every": checkpoint_every,
            "train.eval_every": steps,
            "train.log_every": 250,
        },
    )
    result = train.run(cfg, workdir, log=lambda s: print(s, file=sys.stderr))
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    return result, [(r["step"], r["rss_mib"]) for r in records if r.get("rss_mib") is not None]


def _slope_mib_per_1k_steps(rss) -> float:
    """Least-squares slope of resident memory over steps: ~0 when memory is flat."""
    x = np.array([s for s, _ in rss], float)
    y = np.array([v for _, v in rss], float)
    return float(np.polyfit(x, y, 1)[0] * 1000)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--checkpoint-every", type=int, default=50)
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp())
    result, rss = _train(args.steps, args.checkpoint_every, root / "long")
    # The same run saving only its last step: what checkpoints cost in wall time.
    plain, _ = _train(args.steps, args.steps, root / "plain")
    start = statistics.median(v for s, v in rss if 50 <= s <= 150)  # after warm-up
    half = [(s, v) for s, v in rss if s > args.steps // 2]
    mid = statistics.median(v for _, v in half[:100])
    end = statistics.median(v for _, v in rss[-100:])
    sync_s, async_s = save_blocking_s(False), save_blocking_s(True)
    figures = {
        "steps": args.steps,
        "checkpoints": args.steps // args.checkpoint_every,
        "wall_s": result.wall_s,
        "wall_s_without_checkpoints": plain.wall_s,
        "rss_start_mib": start,
        "rss_mid_mib": mid,
        "rss_end_mib": end,
        "rss_growth_mib": end - start,
        "rss_growth_second_half_mib": end - mid,
        "rss_slope_second_half_mib_per_1k_steps": _slope_mib_per_1k_steps(half),
        "checkpoint_blocking_s": result.checkpoint_s,
        "checkpoint_fraction_of_wall": result.checkpoint_s / result.wall_s,
        "checkpoint_wall_overhead": result.wall_s / plain.wall_s - 1,
        "save_blocking_sync_s": sync_s,
        "save_blocking_async_s": async_s,
        "backend": jax.default_backend(),
    }
    OUT.mkdir(exist_ok=True)
    (OUT / "long_run.json").write_text(json.dumps(figures, indent=2) + "\n")
    _plot(rss, OUT / "long_run_memory.png", args.checkpoint_every)
    for k, v in figures.items():
        print(f"{k:<40} {v:.4g}" if isinstance(v, float) else f"{k:<40} {v}")
    print(json.dumps(figures))
    shutil.rmtree(root)
    return 0


def _plot(rss, path: Path, every: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([s for s, _ in rss], [v for _, v in rss], lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("resident memory (MiB)")
    ax.set_title(f"tiny, checkpoint every {every} steps (async)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

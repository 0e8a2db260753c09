"""Step time of two commits, A/B: `sparsemodel profile` runs alternating between them.

    python experiments/ab_commits.py BEFORE AFTER [--repeats 3] [--steps 10]

Two versions of the code cannot share a process, so each measurement is a fresh process
(`profile --json --no-flop-count`: the median of its timed steps), and the processes
alternate A, B, A, B, ... for every config, so slow phases of a shared machine hit both.
Each config's ratio is reported as the median over repeats of after / before, with min and
max, and every run is appended to experiments/results/ab_commits.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_record import cpu_model  # experiments/ is on sys.path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results" / "ab_commits.jsonl"

CONFIGS = {
    "small": ["--config", "small"],
    "small-32-experts": ["--config", "small", "--set", "moe.num_experts=32"],
}


def checkout(commit: str, where: Path) -> str:
    """A detached worktree of commit at where; returns the full hash."""
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-f", str(where), commit],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=where, check=True, capture_output=True, text=True
    ).stdout.strip()


def step_time(tree: Path, args: list[str], steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [
        sys.executable,
        "-m",
        "sparsemodel.cli",
        "profile",
        *args,
        "--json",
        "--no-flop-count",
        "--steps",
        str(steps),
    ]
    out = subprocess.run(cmd, cwd=tree, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["measured"]["step_time_s"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        trees = {name: Path(tmp) / name for name in ("before", "after")}
        commits = {name: checkout(getattr(args, name), tree) for name, tree in trees.items()}
        try:
            runs = {c: {"before": [], "after": []} for c in CONFIGS}
            for repeat in range(args.repeats):
                for config, cli_args in CONFIGS.items():
                    for name, tree in trees.items():
                        runs[config][name].append(step_time(tree, cli_args, args.steps))
                        print(
                            f"repeat {repeat + 1}/{args.repeats} {config} {name}: "
                            f"{runs[config][name][-1] * 1e3:.0f} ms",
                            file=sys.stderr,
                        )
        finally:
            for tree in trees.values():
                subprocess.run(
                    ["git", "worktree", "remove", "--force", str(tree)],
                    cwd=ROOT,
                    capture_output=True,
                )
    figures = {}
    for config, times in runs.items():
        ratios = [a / b for a, b in zip(times["after"], times["before"], strict=True)]
        figures[config] = {
            "after_over_before": {
                "median": statistics.median(ratios),
                "min": min(ratios),
                "max": max(ratios),
            },
            "before_ms": [t * 1e3 for t in times["before"]],
            "after_ms": [t * 1e3 for t in times["after"]],
        }
        r = figures[config]["after_over_before"]
        print(
            f"{config}: after / before {r['median']:.3f} (min {r['min']:.3f}, "
            f"max {r['max']:.3f}) over {args.repeats} alternating pairs"
        )
    row = {
        "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "before": commits["before"],
        "after": commits["after"],
        "steps": args.steps,
        "figures": figures,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The bench's history: each run appends one JSON line to results/bench.jsonl (what ran
where, and every figure), and `bench.py --history` prints every run's headline figures
against their targets, so no run is overwritten or chosen after the fact.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIZES = (64, 128, 256)  # d_model of the three MoE / dense pairs


def spread(values) -> dict[str, float]:
    """Median, min and max of a figure's per-repeat values."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("spread: no values")
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def median(figure) -> float | None:
    """A figure's median: a spread's, or the value itself (the old bench's single medians)."""
    if isinstance(figure, dict):
        return figure.get("median")
    return float(figure) if isinstance(figure, int | float) else None


# ----------------------------------------------------------------------------- a run


def run_context(repeats: int, quick: bool) -> dict:
    """What a run's figures depend on besides the code: commit, time, machine, jax."""
    import jax

    commit, dirty = _git_state()
    return {
        "commit": commit,
        "dirty": dirty,
        "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "jax": jax.__version__,
        "repeats": repeats,
        "quick": quick,
    }


def busy_cpu_s(stat: Path = Path("/proc/stat")) -> float | None:
    """CPU seconds every process on the machine has used since boot (None off Linux)."""
    try:
        fields = stat.read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[:7])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def cpu_clocks() -> tuple[float | None, float]:
    """(CPU seconds of the whole machine, of this process and its waited-for children)."""
    return busy_cpu_s(), sum(os.times()[:4])


def others_cpu_share(start: tuple[float | None, float], wall_s: float) -> float | None:
    """The share of the machine's cores that other processes used since `start`
    (cpu_clocks()): what the run competed with, 0 on a quiet machine."""
    (busy_start, own_start), (busy_end, own_end) = start, cpu_clocks()
    if busy_start is None or busy_end is None or wall_s <= 0:
        return None
    others = (busy_end - busy_start) - (own_end - own_start)
    return max(0.0, others) / (wall_s * (os.cpu_count() or 1))


def _git_state() -> tuple[str | None, bool | None]:
    """HEAD's hash, and whether tracked files differ from it (results/ aside: each run
    changes results/bench.jsonl); (None, None) outside a git checkout."""

    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        changes = git(
            "status", "--porcelain", "--untracked-files=no", "--", ".", ":!experiments/results"
        )
    except (OSError, subprocess.CalledProcessError):
        return None, None
    return commit, bool(changes.strip())


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The host CPU's model name (Linux), else what platform says."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def append(path: Path, record: dict) -> None:
    """Adds one run as one JSON line at the end of path (created if absent)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read(path: Path) -> list[dict]:
    """Every run recorded in path, oldest first."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------- the table


def _at_most(limit: float):
    return lambda value, figures: value <= limit


def _at_least(limit: float):
    return lambda value, figures: value >= limit


def _scaling_met(value: float, figures: dict) -> bool:
    """Expert scaling meets its target at 1.15 or at the floor measured in the same run."""
    floor = median(figures.get("expert_scaling_floor"))
    return value <= max(1.15, floor if floor is not None else 1.15)


# (column, figure, target as shown, test of a median; None: reported only). A figure
# measured at the three sizes (name_d64, ...) shows its worst size.
HEADLINES = [
    *((f"step{d}", f"step_ratio_d{d}", "<=1.20", _at_most(1.20)) for d in SIZES),
    *((f"layer{d}", f"layer_ratio_d{d}", "<=1.30", _at_most(1.30)) for d in SIZES),
    ("effD", "step_efficiency_dense", ">=0.85", _at_least(0.85)),
    ("effM", "step_efficiency_moe", ">=0.85", _at_least(0.85)),
    ("effM@D", "step_efficiency_moe_dense_shapes", ">=0.85", _at_least(0.85)),
    ("real", "real_routing_step_ratio", "report", None),
    ("scaling", "expert_scaling_ratio", "<=1.15|fl", _scaling_met),
    ("floor", "expert_scaling_floor", "report", None),
    ("hf", "hf_mixtral_speedup", ">=1.0", _at_least(1.0)),
    ("small", "moe_dense_step_ratio", "<=1.20", _at_most(1.20)),
    ("smLayer", "moe_dense_layer_ratio", "<=1.30", _at_most(1.30)),
]


def headline_value(figures: dict, name: str) -> float | None:
    """The figure's median; for a figure measured per size, the worst size's (by its
    target's direction: the highest ratio, the lowest efficiency)."""
    if name in figures:
        return median(figures[name])
    per_size = [median(figures.get(f"{name}_d{d}")) for d in SIZES]
    per_size = [v for v in per_size if v is not None]
    if not per_size:
        return None
    return min(per_size) if name.startswith("step_efficiency") else max(per_size)


BUSY = 0.05  # others' share of the cores above which a run's label says it was not alone


def _run_label(record: dict) -> str:
    commit = (record.get("commit") or "?")[:7] + ("+" if record.get("dirty") else "")
    busy = (record.get("others_cpu_share") or 0) > BUSY
    tags = [t for t, on in (("old", record.get("old_bench")), ("quick", record.get("quick"))) if on]
    tags += [f"busy {record['others_cpu_share']:.0%}"] if busy else []
    return f"{str(record.get('utc', '?'))[:16]} {commit}" + (f" ({','.join(tags)})" if tags else "")


def history_table(records: list[dict]) -> str:
    """One line per run: its headline figures, `!` after each that misses its target."""
    label_width = max([len("target")] + [len(_run_label(r)) for r in records])
    width = max(len(c) for c, *_ in HEADLINES) + 2
    lines = [
        f"{'run':<{label_width}} " + "".join(f"{c:>{width}}" for c, *_ in HEADLINES),
        f"{'target':<{label_width}} " + "".join(f"{t:>{width}}" for _, _, t, _ in HEADLINES),
    ]
    for record in records:
        cells = []
        for _, name, _, met in HEADLINES:
            value = headline_value(record.get("figures", {}), name)
            if value is None:
                cells.append(f"{'-':>{width - 1}} ")
            else:
                missed = met is not None and not met(value, record["figures"])
                cells.append(f"{value:>{width - 1}.3f}" + ("!" if missed else " "))
        lines.append(f"{_run_label(record):<{label_width}} " + "".join(cells))
    lines.append(
        "! misses its target. Per-size figures (effD, effM, effM@D) show the worst of d_model "
        f"{', '.join(map(str, SIZES))}. +: uncommitted changes. old: the bench before issue #18. "
        "busy: other processes used that share of the cores during the run (recorded since "
        "2026-12-02 15:05)."
    )
    return "\n".join(lines)

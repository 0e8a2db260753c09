"""The bench's history (experiments/bench_record.py): spreads of repeats, one appended
JSON line per run, and the table of every run against the targets."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str):
    """experiments/<name>.py as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


record = _module("bench_record")


def _spread(median, low=None, high=None):
    return {"median": median, "min": low or median, "max": high or median}


def test_spread_is_the_median_min_and_max_of_the_repeats():
    assert record.spread([1.3, 1.1, 1.2, 1.0]) == {"median": 1.15, "min": 1.0, "max": 1.3}
    with pytest.raises(ValueError, match="no values"):
        record.spread([])


def test_each_run_appends_one_line_and_leaves_the_earlier_ones(tmp_path):
    path = tmp_path / "results" / "bench.jsonl"
    first = {"commit": "a" * 40, "figures": {"step_ratio_d64": _spread(1.1)}}
    second = {"commit": "b" * 40, "figures": {"step_ratio_d64": _spread(1.3)}}
    record.append(path, first)
    before = path.read_text()
    record.append(path, second)
    assert path.read_text().startswith(before)
    assert len(path.read_text().splitlines()) == 2
    assert record.read(path) == [first, second]
    assert json.loads(path.read_text().splitlines()[0]) == first


def test_a_per_size_figure_shows_its_worst_size():
    figures = {
        "step_efficiency_moe_d64": _spread(0.90),
        "step_efficiency_moe_d128": _spread(0.80),
        "step_efficiency_moe_d256": _spread(0.95),
        "step_ratio_d64": _spread(1.05),
    }
    assert record.headline_value(figures, "step_efficiency_moe") == 0.80  # lowest efficiency
    assert record.headline_value(figures, "step_ratio_d64") == 1.05
    assert record.headline_value(figures, "step_efficiency_dense") is None


def test_the_old_bench_single_medians_read_as_medians():
    assert record.median(1.11) == 1.11
    assert record.median(_spread(1.2, 1.1, 1.4)) == 1.2
    assert record.median(None) is None


def _row(table: str, label: str) -> dict[str, str]:
    """A run's cells by column, from history_table's fixed-width text."""
    lines = table.splitlines()
    header, row = lines[0], next(line for line in lines if line.startswith(label))
    columns = [c for c, *_ in record.HEADLINES]
    width = max(len(c) for c in columns) + 2
    start = len(header) - width * len(columns)
    return {
        c: row[start + i * width : start + (i + 1) * width].strip() for i, c in enumerate(columns)
    }


def test_history_marks_each_missed_target_and_only_those():
    new = {
        "commit": "c" * 40,
        "utc": "2027-01-02T03:04:05+00:00",
        "figures": {
            "step_ratio_d64": _spread(1.25),  # misses <= 1.20
            "step_ratio_d128": _spread(1.15),
            "step_efficiency_dense_d64": _spread(0.90),
            "step_efficiency_dense_d128": _spread(0.80),  # the worst size misses >= 0.85
            "expert_scaling_ratio": _spread(1.20),
            "expert_scaling_floor": _spread(1.22),  # above 1.15: the floor is the target
            "hf_mixtral_speedup": _spread(1.05),
        },
    }
    old = {
        "commit": "8bf50cf",
        "utc": "2026-11-29",
        "old_bench": "converted",
        "figures": {"moe_dense_step_ratio": 1.11, "expert_scaling_ratio": 1.247},
    }
    table = record.history_table([old, new])
    cells = _row(table, "2027-01-02T03:04 ccccccc")
    assert cells["step64"] == "1.250!"
    assert cells["step128"] == "1.150"
    assert cells["effD"] == "0.800!"
    assert cells["scaling"] == "1.200"
    assert cells["hf"] == "1.050"
    assert cells["step256"] == "-"
    old_cells = _row(table, "2026-11-29 8bf50cf (old)")
    assert old_cells["small"] == "1.110"
    assert old_cells["scaling"] == "1.247!"  # no floor recorded: 1.15 is the target


def test_cpu_model_is_read_from_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\nflags\t: sse\n")
    assert record.cpu_model(cpuinfo) == "Some CPU @ 2.0GHz"


def test_busy_cpu_counts_every_state_but_idle_and_iowait(tmp_path):
    stat = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal ...
    stat.write_text("cpu  100 20 30 5000 400 6 4 0 0 0\ncpu0 50 10 15 2500 200 3 2 0 0 0\n")
    tick = __import__("os").sysconf("SC_CLK_TCK")
    assert record.busy_cpu_s(stat) == pytest.approx(160 / tick)
    assert record.busy_cpu_s(tmp_path / "missing") is None


def test_a_run_beside_a_busy_process_records_the_share_it_used(tmp_path):
    import subprocess
    import sys
    import time

    start, t0 = record.cpu_clocks(), time.perf_counter()
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # not waited for
    time.sleep(1.5)
    share = record.others_cpu_share(start, time.perf_counter() - t0)
    spinner.kill()
    spinner.wait()
    cores = __import__("os").cpu_count()
    assert share is not None and share > 0.5 / cores, share  # one core, most of the time

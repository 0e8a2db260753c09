"""The scaling study's pure parts (experiments/study*.py): the registry's matched compute,
the budget arithmetic, skipping finished runs, the power-law fit and its bootstrap, and the
steps and seconds to reach dense's final loss. Nothing here trains."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))

import study  # noqa: E402  (experiments/ is not a package)
import study_report  # noqa: E402
import study_run  # noqa: E402

from sparsemodel import config, flops  # noqa: E402


def _counts(overrides: dict):
    cfg = config.load(study.PRESET, study.trainable_overrides(overrides))
    return cfg, flops.param_counts(cfg).active_per_token, flops.model_flops_per_token(cfg)


# ------------------------------------------------------------------------ registry


@pytest.mark.parametrize("d", study.SIZES)
def test_arms_of_a_size_differ_from_dense_by_their_routers_alone(d):
    """Equal active FFN width (4 x d_model) and tokens: active parameters and FLOPs per
    token exceed dense's by exactly the routers (d x E per layer, 6 FLOPs each)."""
    runs = study.registry()
    dense = runs[study.run_name(d, "dense")]
    _, dense_active, dense_flops = _counts(dense.overrides)
    for arm in study.MOE_ARMS:
        run = runs[study.run_name(d, arm)]
        cfg, active, flop = _counts(run.overrides)
        routers = study.N_LAYERS * d * cfg.moe.num_experts
        assert study.active_ffn_width(cfg) == 4 * d
        assert active - dense_active == routers
        assert flop - dense_flops == 6 * routers
        assert run.tokens == dense.tokens


def test_the_expert_sweep_keeps_active_width_and_grows_total_parameters():
    runs = [r for r in study.registry().values() if "experts" in r.parts]
    configs = sorted((_counts(r.overrides)[0] for r in runs), key=lambda c: c.moe.num_experts)
    totals = [flops.param_counts(c).total for c in configs]
    assert [c.moe.num_experts for c in configs] == [0, *study.EXPERTS]
    assert {study.active_ffn_width(c) for c in configs} == {4 * study.FOCUS}
    assert all(a < b for a, b in zip(totals, totals[1:], strict=False))


def test_listing_names_an_arm_whose_active_width_differs_from_dense():
    """The scratch twin of the upcycled MoEs computes two dense-width experts: said."""
    run = study.registry()[study.run_name(study.FOCUS, "moe8x4d")]
    note = study._mismatch(study.describe(run))
    assert f"active FFN width {8 * study.FOCUS} vs dense {4 * study.FOCUS}" in note


def test_a_second_seed_pairs_with_its_first():
    runs = study.registry({study.NOISE_SIZES[0]: "fine32"})
    noise = [r for r in runs.values() if "noise" in r.parts]
    assert {r.seed0 for r in noise} <= set(runs)
    assert study.run_name(study.NOISE_SIZES[0], "fine32", 1) in runs
    assert all(r.seed == 1 and r.overrides["train.seed"] == 1 for r in noise)


def test_best_moe_is_the_lowest_final_loss_once_every_arm_has_finished():
    d = study.NOISE_SIZES[-1]
    losses = {"moe8": 1.30, "fine32": 1.27, "moe8-free": 1.29}
    results = {study.run_name(d, a): {"final_val_loss": v} for a, v in losses.items()}
    assert study.best_moe_arms(results) == {d: "fine32"}
    del results[study.run_name(d, "moe8")]
    assert study.best_moe_arms(results) == {}


# ------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("d", study.SIZES)
def test_steps_give_thirty_tokens_per_active_parameter(d):
    steps = study.dense_steps(d)
    _, active, _ = _counts(study.dense_overrides(d))
    assert steps % study.STEP_MULTIPLE == 0
    assert 30 * active <= steps * 4096 < 30 * active + study.STEP_MULTIPLE * 4096


def test_schedule_warms_up_five_percent_and_evaluates_every_five():
    run = study.registry()[study.run_name(64, "dense")]
    o = run.overrides
    assert o["train.batch_size"] * o["train.seq_len"] == 4096 and o["train.lr"] == 3e-3
    assert o["train.warmup_steps"] * 20 == run.steps
    assert o["train.eval_every"] * 20 == run.steps
    assert o["train.checkpoint_every"] * 2 == run.steps  # the mid-point is kept


def test_an_upcycled_run_trains_the_second_half_from_the_dense_learning_rate():
    runs = study.registry()
    dense = runs[study.run_name(study.FOCUS, "dense")]
    up = runs[study.run_name(study.FOCUS, "up-drop")]
    half, total, warmup = dense.steps // 2, dense.steps, dense.overrides["train.warmup_steps"]
    end = 0.1 * study.LR
    # optax's warmup + cosine at step `half` (train.run indexes the schedule from 0)
    expected = end + (study.LR - end) * 0.5 * (
        1 + math.cos(math.pi * (half - 1 - warmup) / (total - warmup))
    )
    assert up.steps == half
    assert up.upcycle == {"source": dense.name, "step": half, "method": "drop", "drop": 0.5}
    assert up.overrides["train.lr"] == pytest.approx(expected, rel=1e-6)
    assert up.overrides["train.lr"] * up.overrides["train.min_lr_ratio"] == pytest.approx(end)
    assert up.overrides["train.warmup_steps"] == total // 50


def test_estimate_uses_the_measured_step_time_of_the_shape():
    run = study.registry()[study.run_name(32, "moe8")]
    times = {study.timing_key(run.overrides): {"step_s": {"median": 0.3}}}
    minutes, measured = study.estimate_minutes(run, times)
    evals = study.EVALS * study.EVAL_BATCHES * 0.3 / 3
    assert measured
    assert minutes == pytest.approx((run.steps * 0.3 + evals) / 60 + study.SETUP_MIN)


# ------------------------------------------------------------------- resume / skip


def _fake_result(paths: study.Paths, run: study.Run, spec: dict | None = None) -> None:
    paths.results.mkdir(parents=True, exist_ok=True)
    record = {"name": run.name, "spec": spec or run.spec(), "final_val_loss": 2.0}
    paths.result(run.name).write_text(json.dumps(record))


def test_a_finished_run_is_skipped_and_one_with_another_spec_trains_again(tmp_path):
    paths = study.Paths.under(tmp_path)
    runs = study.registry(scale=0.05)
    dense, moe = runs["d32-dense"], runs["d32-moe8"]
    _fake_result(paths, dense)
    todo, skipped = study.plan([dense, moe], study.load_results(paths), {}, None)
    assert [(r.name, state) for r, _, state in todo] == [("d32-moe8", "to run")]
    assert skipped == []

    _fake_result(paths, dense, {**dense.spec(), "overrides": {**dense.overrides, "train.lr": 1e-3}})
    todo, _ = study.plan([dense, moe], study.load_results(paths), {}, None)
    assert [(r.name, state) for r, _, state in todo] == [
        ("d32-dense", "spec changed"),
        ("d32-moe8", "to run"),
    ]


def test_dry_run_lists_only_what_is_not_done(tmp_path, capsys):
    paths = study.Paths.under(tmp_path)
    runs = study.registry(scale=0.05)
    _fake_result(paths, runs["d32-dense"])
    argv = ["arms", "--only", "d32-dense", "d32-moe8", "--budget-scale", "0.05"]
    assert study.main([*argv, "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "would train d32-moe8" in out and "d32-dense" not in out


def test_a_run_needing_a_key_the_library_lacks_is_skipped_in_one_line():
    run = study.arm_run(32, "dense", scale=0.05, extra={"moe.not_merged_yet": 1})
    todo, skipped = study.plan([run], {}, {}, None)
    assert todo == []
    assert skipped == [(run, "needs moe.not_merged_yet: merge pending")]


def test_max_minutes_starts_only_runs_that_fit():
    runs = study.registry(scale=0.05)
    slow, fast = runs["d32-dense"], runs["d32-moe8"]
    times = {
        study.timing_key(slow.overrides): {"step_s": {"median": 60.0}},
        study.timing_key(fast.overrides): {"step_s": {"median": 0.1}},
    }
    todo, skipped = study.plan([slow, fast], {}, times, max_minutes=10)
    assert [r.name for r, _, _ in todo] == ["d32-moe8"]
    assert skipped[0][0] is slow and "does not fit in the 10 left" in skipped[0][1]


def test_an_unknown_part_is_refused(capsys):
    with pytest.raises(SystemExit) as e:
        study.main(["arm"])
    assert e.value.code == 2
    assert "part 'arm': not one of arms, experts" in capsys.readouterr().err


# ---------------------------------------------------------------- the run record


def test_wall_time_adds_up_over_resumed_segments():
    records = [{"step": s, "time_s": t} for s, t in ((1, 10.0), (2, 11.0), (3, 4.0), (4, 5.5))]
    assert study_run.cumulative_wall(records) == {1: 10.0, 2: 11.0, 3: 15.0, 4: 16.5}


def test_train_curve_is_the_mean_of_each_window():
    records = [{"step": s, "lm_loss": float(s)} for s in range(1, 7)]
    assert study_run.window_means(records, 3) == {"step": [3, 6], "loss": [2.0, 5.0]}


# ------------------------------------------------------------------------ the fit


def test_fit_recovers_a_known_exponent_within_its_bootstrap_interval():
    rng = np.random.default_rng(1)
    n = np.geomspace(2e5, 4e6, 6).repeat(2)  # six sizes, two seeds
    loss = 1.2 + 40 * n**-0.35 + rng.normal(0, 0.002, n.size)
    fit = study_report.fit_power_law(n, loss)
    lo, hi, kept = study_report.bootstrap_alpha(n, loss, fit, draws=300)
    assert fit.model == study_report.OFFSET
    assert fit.c == pytest.approx(1.2, abs=0.03)
    assert lo <= 0.35 <= hi and hi - lo < 0.25
    assert kept > 250


def test_with_fewer_than_four_sizes_the_fit_is_log_linear():
    """Three distinct N cannot pin down c as well as a and alpha: a N^-alpha instead."""
    rng = np.random.default_rng(2)
    n = np.geomspace(1e5, 2e6, 3).repeat(2)
    loss = 50 * n**-0.3 * (1 + rng.normal(0, 1e-3, n.size))
    fit = study_report.fit_power_law(n, loss)
    lo, hi, _ = study_report.bootstrap_alpha(n, loss, fit, draws=300)
    assert fit.model == study_report.POWER and fit.c == 0
    assert fit.alpha == pytest.approx(0.3, abs=0.005)
    assert lo <= 0.3 <= hi


def test_without_scipy_the_fit_is_numpys_least_squares(monkeypatch):
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)  # import fails
    n = np.geomspace(2e5, 4e6, 6)
    fit = study_report.fit_power_law(n, 1.2 + 40 * n**-0.35)
    slope, _ = np.polyfit(np.log(n), np.log(1.2 + 40 * n**-0.35), 1)
    assert fit.model == study_report.POWER and fit.alpha == pytest.approx(-slope)


# -------------------------------------------------------------- reach and seconds


def _arm(name, steps, losses, step_s, total=1000):
    record = {
        "name": name,
        "steps": steps[-1],
        "final_val_loss": losses[-1],
        "total_params": total,
        "val_curve": {"step": steps, "val_loss": losses, "tokens": [s * 4096 for s in steps]},
    }
    return study_report.Arm(record, step_s, True)


def test_steps_and_seconds_to_reach_dense_final_loss_interpolate_between_evals():
    dense = _arm("dense", [100, 200, 300, 400], [3.1, 2.6, 2.2, 2.0], step_s=1.0)
    moe = _arm("moe", [100, 200, 300, 400], [3.0, 2.5, 1.9, 1.8], step_s=1.25)
    r = study_report.reach(moe, dense)
    reached = 200 + 100 * (2.5 - 2.0) / (2.5 - 1.9)  # 283.3: between the evals at 200 and 300
    assert r["step_fraction"] == pytest.approx(reached / 400)
    assert r["time_fraction"] == pytest.approx(reached * 1.25 / 400)
    # dense's 400 s buy the MoE 320 steps: 1.9 + (1.8 - 1.9) * 0.2 = 1.88
    assert r["gap_at_dense_time"] == pytest.approx(1.88 / 2.0 - 1)


def test_an_arm_that_never_reaches_dense_has_no_fraction():
    dense = _arm("dense", [100, 200], [2.5, 2.0], step_s=1.0)
    moe = _arm("moe", [100, 200], [2.6, 2.1], step_s=1.0)
    r = study_report.reach(moe, dense)
    assert r["step_fraction"] is None and r["time_fraction"] is None


def test_calibrated_step_time_is_the_ratio_times_the_twins_median():
    o = {**study.dense_overrides(32), "moe.num_experts": 8, "train.batch_size": 32}
    o["train.seq_len"] = 128
    twin = {**study.dense_overrides(32), "train.batch_size": 32, "train.seq_len": 128}
    record = {"overrides": o, "size": 32, "median_step_s": 9.0}
    times = {
        study.timing_key(o): {"ratio": 1.2, "ratio_range": [1.1, 1.3], "step_s": {"median": 0.5}},
        study.timing_key(twin): {"ratio": 1.0, "ratio_range": [1, 1], "step_s": {"median": 0.4}},
    }
    assert study_report.calibrated_step_s(record, times) == (pytest.approx(0.48), True, (1.1, 1.3))
    del times[study.timing_key(twin)]
    assert study_report.calibrated_step_s(record, times) == (9.0, False, None)


def test_calibration_pools_the_rounds_of_the_newest_commit(tmp_path):
    """A shape's ratio is the median of its rounds' ratios over every record at the commit
    of its newest record; records of older code are left out."""

    def record(commit, own, twin):
        return {
            "key": "k",
            "commit": commit,
            "utc": f"2026-12-0{len(own)}T00:00:00Z",
            "step_s": {"all": own},
            "twin_step_s": {"all": twin},
        }

    paths = study.Paths.under(tmp_path)
    paths.results.mkdir(parents=True)
    lines = [
        record("old", [9.0, 9.0, 9.0], [1.0, 1.0, 1.0]),
        record("new", [1.2, 5.0, 1.1], [1.0, 1.0, 1.0]),  # a burst of load in round 2
        record("new", [2.6, 2.4], [2.0, 2.0]),
    ]
    (paths.results / "step_times.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    pooled = study.load_step_times(paths)["k"]
    assert pooled["rounds"] == 5 and pooled["ratio_range"] == [1.1, 5.0]
    assert pooled["ratio"] == pytest.approx(1.2)  # of 1.2, 5.0, 1.1, 1.3, 1.2
    assert pooled["step_s"]["median"] == pytest.approx(2.4)
    assert pooled["utcs"] == ["2026-12-03T00:00:00Z", "2026-12-02T00:00:00Z"]


def test_a_gap_inside_the_seed_spread_is_called_nothing():
    dense = _arm("dense", [100, 200], [2.5, 2.000], step_s=1.0, total=1000)
    close = _arm("moe", [100, 200], [2.5, 1.990], step_s=1.0, total=3000)
    far = _arm("moe", [100, 200], [2.5, 1.900], step_s=1.0, total=3000)
    inside = study_report.answer([study_report.Size(32, {"dense": dense, "moe8": close}, 0.01)])
    outside = study_report.answer([study_report.Size(32, {"dense": dense, "moe8": far}, 0.01)])
    assert "nothing yet: -0.50% is inside the seed spread (1.00%)" in inside[0]
    assert "buy 5.00% lower loss" in outside[0]


def test_the_largest_sizes_targets_are_judged_on_the_mean_of_its_seeds():
    steps = [100, 200]
    dense, dense1 = (_arm("dense", steps, [2.5, x], step_s=1.0) for x in (2.0, 2.0))
    moe, moe1 = (_arm("moe", steps, [2.5, x], step_s=1.0) for x in (1.95, 1.85))  # -2.5%, -7.5%
    one = study_report.Size(72, {"dense": dense, "moe8": moe}, None)
    two = study_report.Size(72, {"dense": dense, "moe8": moe}, 0.01, second=(dense1, moe1))
    assert study_report.targets_section([one])[2].endswith("-2.50% (seed spread unmeasured) | no |")
    line = study_report.targets_section([two])[2]
    assert "seed 0 -2.50%, seed 1 -7.50%; mean -5.00% (seed spread 1.00%) | yes |" in line


def test_the_readme_block_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"head\n{study_report.BEGIN}\nold\n{study_report.END}\ntail\n")
    study_report.write_readme_block(f"{study_report.BEGIN}\nnew\n{study_report.END}\n", readme)
    assert readme.read_text() == f"head\n{study_report.BEGIN}\nnew\n{study_report.END}\ntail\n"
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no <!-- study-report:begin -->"):
        study_report.write_readme_block("x", readme)


# ------------------------------------------------------------- the report, end to end


def _fake_record(run: study.Run, loss_at_end: float) -> dict:
    """What study_run writes for a finished run, with a made-up 1/sqrt(step) loss curve."""
    cfg = config.load(study.PRESET, study.trainable_overrides(run.overrides))
    counts, flop = flops.param_counts(cfg), flops.model_flops_per_token(cfg)
    steps = list(range(run.steps // study.EVALS, run.steps + 1, run.steps // study.EVALS))
    losses = [loss_at_end + 2 * (1 / math.sqrt(s) - 1 / math.sqrt(run.steps)) for s in steps]
    per_step = run.overrides["train.batch_size"] * run.overrides["train.seq_len"]
    return {
        "name": run.name,
        "size": run.size,
        "arm": run.arm,
        "parts": run.parts,
        "spec": run.spec(),
        "commit": "0" * 40,
        "dirty": False,
        "utc": "2026-12-02T00:00:00Z",
        "device": "cpu",
        "overrides": run.overrides,
        "config": cfg.to_dict(),
        "seed": run.seed,
        "steps": run.steps,
        "tokens": run.tokens,
        "unique_params": counts.unique,
        "total_params": counts.total,
        "active_params": counts.active_per_token,
        "flops_per_token": flop,
        "val_curve": {
            "step": steps,
            "tokens": [s * per_step for s in steps],
            "flops": [s * per_step * flop for s in steps],
            "val_loss": losses,
            "wall_s": [0.3 * s for s in steps],
        },
        "final_val_loss": losses[-1],
        "median_step_s": 0.3,
        "wall_s": 0.3 * run.steps,
    }


@pytest.mark.slow
def test_report_draws_every_plot_and_table_from_finished_runs(tmp_path):
    paths = study.Paths.under(tmp_path)
    paths.results.mkdir(parents=True)
    for _ in range(2):  # the arms' results choose the noise part's MoE: a second pass
        runs = study.registry(study.best_moe_arms(study.load_results(paths)), scale=0.05)
        for i, run in enumerate(runs.values()):
            experts = run.overrides.get("moe.num_experts", 0) or 1
            loss = 2.0 - 0.02 * math.log2(experts) - 0.001 * i
            paths.result(run.name).write_text(json.dumps(_fake_record(run, loss)))
    for run in study.gpu_runs("moe8", study.EVALS):
        record = {**_fake_record(run, 1.5), "alternating_step_s": 0.1, "twin_step_s": 0.1}
        paths.result(run.name).write_text(json.dumps(record))
    block, written = study_report.report(paths, scale=0.05)
    stems = {p.stem for p in written}
    assert stems == {
        *(f"study_curves_d{d}" for d in study.SIZES),
        *("study_gap", "study_reach", "study_params", "study_sharing", "study_upcycle"),
    }
    assert all(p.stat().st_size > 10_000 for p in written)  # a drawn PNG, not an empty one
    assert f"from {len(runs)} of {len(runs)} runs" in block
    assert "| gpu-moe8 | cpu |" in block
    assert block.count("#### ") == 9 and "(fewer than" not in block
    assert re.search(r"ends at or below dense's final \| d72-[a-z0-9-]+-short: -", block)


@pytest.mark.slow
def test_calibration_times_each_shape_against_its_dense_twin(tmp_path, capsys):
    """--calibrate compiles each shape and its size's dense twin and times them in turn:
    one record per shape, the twin's with ratio 1, each with every round's time."""
    argv = ["--calibrate", "--only", "d32-dense", "d32-moe8", "--repeats", "3"]
    assert study.main([*argv, "--out", str(tmp_path)]) == 0
    paths = study.Paths.under(tmp_path)
    records = [json.loads(x) for x in (paths.results / "step_times.jsonl").read_text().splitlines()]
    by_name = {tuple(r["names"]): r for r in records}
    assert set(by_name) == {("d32-dense",), ("d32-moe8",)}
    for r in records:
        assert len(r["step_s"]["all"]) == len(r["twin_step_s"]["all"]) == 3
        assert 0 < r["step_s"]["min"] <= r["step_s"]["median"] <= r["step_s"]["max"]
    assert by_name[("d32-dense",)]["ratio"] == 1.0
    assert "d32-moe8:" in capsys.readouterr().out


def test_two_numbers_of_experts_show_their_table_but_no_fit():
    def point(name, experts, total, loss):
        arm = "dense" if experts == 0 else f"moe{experts}"
        return {
            "name": name,
            "arm": arm,
            "seed": 0,
            "total_params": total,
            "active_params": 1000,
            "final_val_loss": loss,
            "config": {"moe": {"num_experts": experts}},
        }

    table = lambda rows, columns: " ".join(r["label"] for r in rows)  # noqa: E731
    points = [point("d48-dense", 0, 172_464, 1.33), point("d48-moe8", 8, 505_776, 1.28)]
    lines, fit = study_report.experts_section(points, table)
    assert fit is None and lines[0] == "d48-dense d48-moe8"
    assert "no fit until 3" in lines[-1]
    lines, fit = study_report.experts_section([*points, point("d48-moe4", 4, 283_824, 1.30)], table)
    assert fit is not None and "Fit over 3 points" in "\n".join(lines)

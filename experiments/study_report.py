"""The scaling study's report: plots (PNG beside the results), Markdown tables (printed, in
results/study/report.md, and in the block of experiments/README.md between the
study-report markers), from the result JSONs and step times `experiments/study.py` writes.

    python experiments/study_report.py [--out DIR] [--budget-scale F] [--no-readme]

Seconds on this machine are steps x the step time measured alternating with the size's
dense twin (`study.py --calibrate`), so runs made one after another on a shared machine
compare; each run's raw wall time is shown beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import study
from dense_vs_moe import steps_to_reach

README = Path(__file__).parent / "README.md"
BEGIN, END = "<!-- study-report:begin -->", "<!-- study-report:end -->"
ARM_LABELS = {
    "dense": "dense",
    "moe8": "8 experts top-2",
    "fine32": "32 x d/2 top-7 + 1 shared",
    "moe8-free": "8 top-2, aux-loss-free",
}


# ----------------------------------------------------------------- small arithmetic


def gap(loss: float, reference: float) -> float:
    """Relative change of loss against reference: -0.03 is 3% lower."""
    return loss / reference - 1


def value_at(xs: list[float], ys: list[float], x: float) -> float:
    """ys linearly interpolated at x (the last value beyond the end)."""
    return float(np.interp(x, xs, ys))


@dataclass(frozen=True)
class Fit:
    model: str  # "c + a N^-alpha", or "a N^-alpha" when c is not identifiable
    c: float
    a: float
    alpha: float

    def __call__(self, n):
        return self.c + self.a * np.power(n, -self.alpha)

    def text(self) -> str:
        law = f"{self.a:.3g} N^-{self.alpha:.3f}"
        return law if self.c == 0 else f"{self.c:.3f} + {law}"


OFFSET, POWER = "c + a N^-alpha", "a N^-alpha"


def fit_power_law(n, loss) -> Fit:
    """L = c + a N^-alpha by least squares (scipy's curve_fit) when c is identifiable from
    the points (>= 4 distinct N, the fit converges, 0 <= c < min L, and c's standard error
    is below c); else a N^-alpha, a straight line in log-log (numpy)."""
    n, loss = np.asarray(n, float), np.asarray(loss, float)
    if len(np.unique(n)) >= 4:
        found = _fit_offset(n, loss)
        if found is not None:
            fit, c_err = found
            if 0 <= fit.c < loss.min() and c_err < fit.c:
                return fit
    return _fit_power(n, loss)


def _fit_power(n, loss) -> Fit:
    slope, intercept = np.polyfit(np.log(n), np.log(loss), 1)
    return Fit(POWER, 0.0, float(np.exp(intercept)), float(-slope))


def _fit_offset(n, loss) -> tuple[Fit, float] | None:
    """(the fit of c + a N^-alpha, c's standard error), or None when it does not converge
    to a decreasing law or scipy is missing."""
    try:
        from scipy.optimize import curve_fit
    except ImportError:
        return None
    scale = float(np.median(n))  # fitting N / median keeps a and the Jacobian well scaled

    def law(x, c, a, alpha):
        return c + a * np.power(x, -alpha)

    p0 = (0.9 * loss.min(), 0.1 * loss.min() + loss.max() - loss.min(), 0.3)
    try:
        (c, a, alpha), cov = curve_fit(law, n / scale, loss, p0=p0, maxfev=20000)
    except (RuntimeError, ValueError):
        return None
    if not (alpha > 0 and a > 0):
        return None
    c_err = math.sqrt(cov[0, 0]) if np.isfinite(cov[0, 0]) and cov[0, 0] >= 0 else math.inf
    return Fit(OFFSET, float(c), float(a * scale**alpha), float(alpha)), c_err


def bootstrap_alpha(n, loss, fit: Fit, draws: int = 1000, seed: int = 0):
    """(2.5th, 97.5th percentile of alpha, fits kept) over fits of fit's form to the points
    resampled with replacement. Draws with too few distinct N for the form, or whose
    fit does not converge, are left out; c is not held to identifiability here, so the
    interval is not narrowed to the draws that happen to pin it down."""
    n, loss = np.asarray(n, float), np.asarray(loss, float)
    rng = np.random.default_rng(seed)
    alphas = []
    for _ in range(draws):
        idx = rng.integers(0, len(n), len(n))
        distinct = len(np.unique(n[idx]))
        if fit.model == POWER and distinct >= 2:
            alphas.append(_fit_power(n[idx], loss[idx]).alpha)
        elif fit.model == OFFSET and distinct >= 4:
            found = _fit_offset(n[idx], loss[idx])
            if found is not None:
                alphas.append(found[0].alpha)
    if not alphas:
        return math.nan, math.nan, 0
    lo, hi = np.percentile(alphas, [2.5, 97.5])
    return float(lo), float(hi), len(alphas)


# ------------------------------------------------------------------- the results


@dataclass
class Arm:
    """A finished run and the seconds one of its steps takes on this machine."""

    record: dict
    step_s: float  # calibrated, else the run's own median step
    calibrated: bool
    ratio_range: tuple[float, float] | None = None  # calibration rounds' min, max vs twin

    @property
    def name(self) -> str:
        return self.record["name"]

    @property
    def final(self) -> float:
        return self.record["final_val_loss"]

    @property
    def curve(self) -> dict:
        return self.record["val_curve"]

    @property
    def steps(self) -> int:
        return self.record["steps"]

    def seconds(self) -> list[float]:
        return [s * self.step_s for s in self.curve["step"]]


def calibrated_step_s(record: dict, step_times: dict[str, dict]) -> tuple:
    """(seconds per step, calibrated?, the rounds' ratio range): the run's ratio to its
    dense twin times the twin's median, both measured alternating in one process; else the
    run's own median step."""
    own = step_times.get(study.timing_key(record["overrides"]))
    batch = {k: record["overrides"][k] for k in ("train.batch_size", "train.seq_len")}
    twin = step_times.get(study.timing_key({**study.dense_overrides(record["size"]), **batch}))
    if own is not None and twin is not None:
        return own["ratio"] * twin["step_s"]["median"], True, tuple(own["ratio_range"])
    return record["median_step_s"], False, None


def reach(arm: Arm, dense: Arm) -> dict:
    """Steps and calibrated seconds for `arm` to reach dense's final validation loss (as
    fractions of dense's), and its loss once dense's calibrated seconds are spent."""
    steps = steps_to_reach(arm.curve, dense.final)
    dense_s = dense.steps * dense.step_s
    at_dense_time = value_at(arm.curve["step"], arm.curve["val_loss"], dense_s / arm.step_s)
    return {
        "step_fraction": None if steps is None else steps / dense.steps,
        "time_fraction": None if steps is None else steps * arm.step_s / dense_s,
        "gap_at_dense_time": gap(at_dense_time, dense.final),
    }


class Results:
    """The finished runs that match the registry, with their calibrated step times."""

    def __init__(self, paths: study.Paths, scale: float = 1.0):
        results = study.load_results(paths)
        self.runs = study.registry(study.best_moe_arms(results), scale)
        self.done = {
            name: results[name]
            for name, run in self.runs.items()
            if study.status(run, results) == "done"
        }
        self.step_times = study.load_step_times(paths)

    def arm(self, name: str) -> Arm | None:
        record = self.done.get(name)
        return Arm(record, *calibrated_step_s(record, self.step_times)) if record else None

    def part(self, part: str) -> list[study.Run]:
        """The part's runs, finished or not, in registry order."""
        return [r for r in self.runs.values() if part in r.parts]

    def arms_at(self, d: int) -> dict[str, Arm]:
        """The arms part's finished seed-0 runs of size d, by arm."""
        arms = {a: self.arm(study.run_name(d, a)) for a in ("dense", *study.MOE_ARMS)}
        return {a: arm for a, arm in arms.items() if arm is not None}

    def seed_spread(self, d: int) -> float | None:
        """The largest relative seed-to-seed spread of final loss among size d's runs
        with a second seed (None without one): gaps inside it are not differences."""
        spreads = [
            abs(gap(self.done[r.name]["final_val_loss"], self.done[r.seed0]["final_val_loss"]))
            for r in self.part("noise")
            if r.size == d and r.name in self.done and r.seed0 in self.done
        ]
        return max(spreads) if spreads else None

    def second_seed(self, d: int, best: Arm | None) -> tuple[Arm, Arm] | None:
        """Size d's noise pair, (dense, best MoE) at seed 1, once both have finished."""
        if best is None:
            return None
        pair = (
            self.arm(study.run_name(d, "dense", 1)),
            self.arm(study.run_name(d, best.record["arm"], 1)),
        )
        return pair if None not in pair else None


@dataclass
class Size:
    """One size of the arms part: its arms, the dense one, the best MoE, the seed spread
    and the (dense, best MoE) pair of the second seed, when it has run."""

    d: int
    arms: dict[str, Arm]
    spread: float | None
    second: tuple[Arm, Arm] | None = None

    @property
    def dense(self) -> Arm | None:
        return self.arms.get("dense")

    @property
    def best(self) -> Arm | None:
        moes = [a for k, a in self.arms.items() if k != "dense"]
        return min(moes, key=lambda a: a.final) if moes else None


def sizes_of(res: Results) -> list[Size]:
    sizes = (Size(d, res.arms_at(d), res.seed_spread(d)) for d in study.SIZES if res.arms_at(d))
    return [replace(s, second=res.second_seed(s.d, s.best)) for s in sizes]


# ------------------------------------------------------------------------ the tables

ARM_COLUMNS = (
    ("label", "arm", "{}"),
    ("total_params", "total params", "{:,}"),
    ("active_params", "active", "{:,}"),
    ("flops_per_token", "FLOPs/token", "{:.3g}"),
    ("final_val_loss", "val loss", "{:.4f}"),
    ("vs_dense", "vs dense", "{:+.2%}"),
    ("step_fraction", "steps to dense's final", "{:.2f}"),
    ("step_ratio", "s/step vs dense [min, max]", "{}"),
    ("time_fraction", "seconds to dense's final", "{:.2f}"),
    ("gap_at_dense_time", "vs dense at dense's seconds", "{:+.2%}"),
    ("wall_min", "raw wall min", "{:.1f}"),
)
PART_COLUMNS = (
    ("label", "run", "{}"),
    ("unique_params", "unique params", "{:,}"),
    ("total_params", "total", "{:,}"),
    ("active_params", "active", "{:,}"),
    ("flops_per_token", "FLOPs/token", "{:.3g}"),
    ("tokens", "tokens", "{:,}"),
    ("final_val_loss", "val loss", "{:.4f}"),
    ("vs_dense", "vs dense", "{:+.2%}"),
    ("wall_min", "raw wall min", "{:.1f}"),
)
EXPERT_COLUMNS = (
    ("label", "run", "{}"),
    ("experts", "E", "{}"),
    ("seed", "seed", "{}"),
    ("total_params", "total params", "{:,}"),
    ("active_params", "active", "{:,}"),
    ("final_val_loss", "val loss", "{:.4f}"),
    ("vs_dense", "vs dense", "{:+.2%}"),
)


def row(arm: Arm, dense: Arm | None, label: str) -> dict:
    """A table row: the run's numbers and, beside a dense reference, gaps and reach."""
    r = {**arm.record, "label": label, "wall_min": arm.record["wall_s"] / 60}
    if dense is not None and arm.name != dense.name:
        r |= reach(arm, dense)
        r["vs_dense"] = gap(arm.final, dense.final)
        r["step_ratio"] = f"{arm.step_s / dense.step_s:.2f}"
        if arm.ratio_range is not None:
            r["step_ratio"] += " [{:.2f}, {:.2f}]".format(*arm.ratio_range)
    return r


def arms_section(sizes: list[Size], table) -> list[str]:
    """Per size: the arms at equal tokens and active compute, and its curves."""
    lines = []
    for s in sizes:
        first = next(iter(s.arms.values())).record
        spread = "one seed" if s.spread is None else f"seed spread {s.spread:.2%}"
        timing = (
            "calibrated" if all(a.calibrated for a in s.arms.values()) else "raw (no calibration)"
        )
        lines += [
            f"**d_model {s.d}**: {first['active_params']:,} active parameters (dense), "
            f"{first['steps']:,} steps, {first['tokens'] / 1e6:.1f}M tokens; {spread}; "
            f"step times {timing}.",
            "",
            table([row(a, s.dense, ARM_LABELS.get(k, k)) for k, a in s.arms.items()], ARM_COLUMNS),
            "",
            f"![d_model {s.d}](results/study/study_curves_d{s.d}.png)",
            "",
        ]
    return lines


def experts_points(res: Results) -> list[dict]:
    """The experts part's finished runs, with any second seed of them."""
    names = {r.name for r in res.part("experts")} | {
        r.name for r in res.part("noise") if r.seed0 in {x.name for x in res.part("experts")}
    }
    return [res.done[n] for n in sorted(names) if n in res.done]


def experts_section(points: list[dict], table) -> tuple[list[str], tuple | None]:
    """Loss against total parameters at fixed active parameters, with the power-law fit
    and its exponent's bootstrap interval."""
    if not points:
        return ["(no run of the experts part has finished: no fit yet)"], None
    dense = next((p for p in points if p["arm"] == "dense" and p["seed"] == 0), None)
    rows = [
        {
            **p,
            "label": p["name"],
            "experts": p["config"]["moe"]["num_experts"] or 1,
            "vs_dense": _gap_to(p, dense),
        }
        for p in sorted(points, key=lambda p: (p["total_params"], p["seed"]))
    ]
    n_sizes = len({p["total_params"] for p in points})
    if n_sizes < 3:  # a line through two points has no uncertainty to estimate
        why = f"{n_sizes} number(s) of experts finished: no fit until 3 have"
        return [table(rows, EXPERT_COLUMNS), "", f"({why})"], None
    n = [p["total_params"] for p in points]
    loss = [p["final_val_loss"] for p in points]
    fit = fit_power_law(n, loss)
    lo, hi, kept = bootstrap_alpha(n, loss, fit)
    lines = [
        table(rows, EXPERT_COLUMNS),
        "",
        f"Fit over {len(points)} points ({fit.model}): L = {fit.text()}; alpha {fit.alpha:.3f}, "
        f"95% bootstrap interval [{lo:.3f}, {hi:.3f}] ({kept} resamplings of the points).",
        "",
        "![loss vs total parameters](results/study/study_params.png)",
    ]
    return lines, (fit, lo, hi)


def _gap_to(record: dict, dense: dict | None) -> float | None:
    """record's final loss against dense's (None for dense itself, or without one)."""
    if dense is None or record is dense:
        return None
    return gap(record["final_val_loss"], dense["final_val_loss"])


def part_section(res: Results, part: str, table, d: int = study.FOCUS) -> list[str]:
    """A part's runs in one table, against the dense run of size d."""
    dense = res.arm(study.run_name(d, "dense"))
    rows = [row(res.arm(r.name), dense, r.name) for r in res.part(part) if r.name in res.done]
    if not rows:
        return [f"(no run of the {part} part has finished)"]
    missing = [r.name for r in res.part(part) if r.name not in res.done]
    return [table(rows, PART_COLUMNS), ""] + (
        [f"Not finished: {', '.join(missing)}.", ""] if missing else []
    )


def short_run(res: Results) -> Arm | None:
    """The short part's MoE (trained for 0.6 of dense's steps), once it has finished."""
    return next((res.arm(r.name) for r in res.part("short") if r.arm != "dense"), None)


def targets_section(sizes: list[Size], short: Arm | None = None) -> list[str]:
    """The issue's targets as measured at the largest size, and across sizes."""
    paired = [s for s in sizes if s.dense and s.best]
    if not paired:
        return ["(no size has dense and an MoE finished yet)"]
    top = paired[-1]
    # With a second seed, each target is judged on the mean over the seeds' pairs.
    pairs = [(top.dense, top.best), *([top.second] if top.second else [])]
    gaps = [gap(moe.final, dense.final) for dense, moe in pairs]
    fractions = [reach(moe, dense)["step_fraction"] for dense, moe in pairs]
    g = float(np.mean(gaps))
    fraction = None if None in fractions else float(np.mean(fractions))
    at_time = [s.d for s in paired if reach(s.best, s.dense)["gap_at_dense_time"] <= 0]
    return [
        "| target | measured | met? |",
        "| --- | --- | --- |",
        f"| d_model {top.d} (largest): best MoE >= 3% below dense at equal tokens | "
        f"{top.best.name}: {_per_seed(gaps, '{:+.2%}')} (seed spread {_pct(top.spread)}) | "
        f"{_yes(g <= -0.03)} |",
        f"| d_model {top.d}: dense's final loss in <= 0.6 of the steps | "
        f"{_per_seed(fractions, '{:.2f}')} | {_yes(fraction is not None and fraction <= 0.6)} |",
        f"| at dense's calibrated seconds, MoE at or below dense at >= 2 sizes | "
        f"{len(at_time)} of {len(paired)}: {', '.join(f'd{d}' for d in at_time) or 'none'} | "
        f"{_yes(len(at_time) >= 2)} |",
    ] + _short_target(top, short)


def _short_target(top: Size, short: Arm | None) -> list[str]:
    """The row of the short part's MoE against dense's final loss, once it has finished."""
    if short is None or short.record["size"] != top.d:
        return []
    g = gap(short.final, top.dense.final)
    return [
        f"| d_model {top.d}: the MoE trained for {short.steps / top.dense.steps:.2f} of the "
        f"steps (own cosine) ends at or below dense's final | {short.name}: {g:+.2%} | "
        f"{_yes(g <= 0)} |"
    ]


def answer(sizes: list[Size]) -> list[str]:
    """What a parameter buys when it is not active, size by size: a gap inside the seed
    spread (measured at that size, else the widest measured) is called nothing."""
    spreads = [s.spread for s in sizes if s.spread is not None]
    widest = max(spreads, default=None)
    lines = []
    for s in (s for s in sizes if s.dense and s.best):
        g = gap(s.best.final, s.dense.final)
        spread = s.spread if s.spread is not None else widest
        extra = s.best.record["total_params"] - s.dense.record["total_params"]
        r = reach(s.best, s.dense)
        if spread is not None and abs(g) <= spread:
            bought = f"nothing yet: {g:+.2%} is inside the seed spread ({spread:.2%})"
        else:
            bought = f"{-g:.2%} lower loss" if g < 0 else f"a {g:.2%} higher loss"
        reached = (
            "it does not reach dense's final loss within the run"
            if r["step_fraction"] is None
            else f"it reaches dense's final loss in {r['step_fraction']:.2f} of the steps and "
            f"{r['time_fraction']:.2f} of the seconds"
        )
        lines.append(
            f"- d_model {s.d}: {extra:,} parameters that a token does not use ({s.best.name}) "
            f"buy {bought} at equal tokens; {reached}; when dense's seconds are spent the MoE "
            f"is {r['gap_at_dense_time']:+.2%} from it."
        )
    if widest is None:
        lines.append("- No second seed has finished: no gap above can be told from noise yet.")
    return lines


def gpu_section(paths: study.Paths, table) -> list[str]:
    """The headline pair trained on a GPU (`study.py --gpu`), when it has been."""
    records = [json.loads(p.read_text()) for p in sorted(paths.results.glob("gpu-*.json"))]
    if not records:
        return ["(not run yet: `GPU_CHECK_STUDY=1 bash experiments/gpu_check.sh` on a GPU)"]
    dense = next((r for r in records if r["arm"] == "dense"), None)
    rows = [
        {
            **r,
            "label": r["name"],
            "vs_dense": _gap_to(r, dense),
            "step_ratio": r["alternating_step_s"] / r["twin_step_s"],
        }
        for r in records
    ]
    columns = (
        ("label", "run", "{}"),
        ("device", "device", "{}"),
        ("utc", "UTC", "{}"),
        ("active_params", "active", "{:,}"),
        ("total_params", "total", "{:,}"),
        ("tokens", "tokens", "{:,}"),
        ("final_val_loss", "val loss", "{:.4f}"),
        ("vs_dense", "vs dense", "{:+.2%}"),
        ("alternating_step_s", "s/step", "{:.4f}"),
        ("step_ratio", "x dense", "{:.2f}"),
    )
    return [table(rows, columns)]


def _pct(x: float | None) -> str:
    return "unmeasured" if x is None else f"{x:.2%}"


def _frac(x: float | None) -> str:
    return "never within the run" if x is None else f"{x:.2f}"


def _per_seed(values: list, fmt: str) -> str:
    """One seed's value, or each seed's and their mean."""
    shown = [_frac(v) if v is None else fmt.format(v) for v in values]
    if len(values) == 1:
        return shown[0]
    mean = "none" if None in values else fmt.format(float(np.mean(values)))
    return ", ".join(f"seed {i} {v}" for i, v in enumerate(shown)) + f"; mean {mean}"


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


# ------------------------------------------------------------------------- the plots

CURVE_AXES = (
    ("tokens", 1e6, "training tokens (millions)"),
    ("flops", 1e12, "training FLOPs (TFLOP, model count)"),
    ("seconds", 60, "minutes here (calibrated step times)"),
    ("wall_s", 60, "raw wall minutes (one after another, shared)"),
)


def plot_curves(s: Size, plt):
    """Validation loss against tokens, training FLOPs, calibrated and raw time."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2), sharey=True)
    for ax, (key, unit, label) in zip(axes, CURVE_AXES, strict=True):
        for k, arm in s.arms.items():
            xs = arm.seconds() if key == "seconds" else arm.curve[key]
            ax.plot(
                [x / unit for x in xs],
                arm.curve["val_loss"],
                marker="o",
                ms=2.5,
                lw=1.4,
                label=ARM_LABELS.get(k, k),
            )
        raw = key == "seconds" and not all(a.calibrated for a in s.arms.values())
        ax.set_xlabel(label.replace("calibrated", "raw median") if raw else label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss (nats/token)")
    axes[0].legend(fontsize=8)
    _zoom(axes[0], [a.curve["val_loss"] for a in s.arms.values()])
    fig.suptitle(f"d_model {s.d}: equal active parameters and tokens")
    return fig


def _zoom(ax, curves: list[list[float]], skip: int = 2, pad: float = 0.03) -> None:
    """Y range from the best loss to the worst after the first evals: the ends are readable."""
    later = [v for c in curves for v in c[skip:]] or [v for c in curves for v in c]
    ax.set_ylim(min(later) - pad, max(later) + pad)


def plot_gap(sizes: list[Size], plt):
    """The best MoE against dense at each evaluation, by size: how the gap moves with the
    budget (experiments 1 and 2 below sat at its start)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for s in (s for s in sizes if s.dense and s.best):
        dense, best = s.dense.curve["val_loss"], s.best.curve["val_loss"]
        gaps = [100 * gap(b, a) for a, b in zip(dense, best, strict=True)]
        tokens = [t / 1e6 for t in s.best.curve["tokens"]]
        (line,) = ax.plot(tokens, gaps, marker="o", ms=2.5, label=f"d{s.d}: {s.best.name}")
        if s.spread is not None:
            ax.axhspan(-100 * s.spread, 100 * s.spread, color=line.get_color(), alpha=0.08)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("best MoE vs dense validation loss (%)")
    ax.set_title("the MoE's gap against the budget (bands: seed spread)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_reach(sizes: list[Size], plt):
    """Fractions of dense's steps and calibrated seconds each MoE arm needs to reach
    dense's final loss (no bar: not reached within the run)."""
    paired = [s for s in sizes if s.dense]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    width = 0.8 / len(study.MOE_ARMS)
    at = np.arange(len(paired))
    for ax, key, title in zip(
        axes, ("step_fraction", "time_fraction"), ("steps", "calibrated seconds"), strict=True
    ):
        for i, k in enumerate(study.MOE_ARMS):
            values = [(reach(s.arms[k], s.dense)[key] or 0) if k in s.arms else 0 for s in paired]
            ax.bar(at + i * width, values, width, label=ARM_LABELS[k])
        ax.axhline(1, color="k", lw=0.8)
        ax.axhline(0.6, color="k", lw=0.6, ls=":")
        ax.set_xticks(at + width * (len(study.MOE_ARMS) - 1) / 2, [f"d{s.d}" for s in paired])
        ax.set_title(f"{title} to reach dense's final loss (x dense's)")
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    return fig


def plot_params(points: list[dict], fit_result: tuple, plt):
    """Final loss against total parameters at fixed active parameters, with the fit."""
    fit, lo, hi = fit_result
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    n = [p["total_params"] for p in points]
    ax.plot(n, [p["final_val_loss"] for p in points], "o")
    for p in points:
        label = f"E={p['config']['moe']['num_experts'] or 1}" + (f" s{p['seed']}" * bool(p["seed"]))
        ax.annotate(
            label,
            (p["total_params"], p["final_val_loss"]),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
        )
    grid = np.geomspace(min(n), max(n))
    ax.plot(grid, fit(grid), "--", label=f"{fit.model}: alpha {fit.alpha:.3f} [{lo:.3f}, {hi:.3f}]")
    ax.set_xscale("log")
    ax.set_xlabel("total parameters (log)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"d_model {study.FOCUS}: more experts, the same active parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_sharing(res: Results, plt):
    """Final loss against unique (stored) parameters at equal FLOPs per token."""
    points = [res.done[r.name] for r in res.part("sharing") if r.name in res.done]
    if not points:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for p in points:
        ax.plot(p["unique_params"], p["final_val_loss"], "o")
        ax.annotate(
            p["arm"],
            (p["unique_params"], p["final_val_loss"]),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_xlabel("unique (stored) parameters (log)")
    ax.set_ylabel("final validation loss (nats/token)")
    ax.set_title(f"d_model {study.FOCUS}: shared layers and the expert pool, equal FLOPs")
    ax.grid(alpha=0.3)
    return fig


def plot_upcycle(res: Results, plt):
    """The dense run, the MoEs upcycled from its mid-point (drawn after the tokens the dense
    run had seen by then) and the MoE from scratch, against training tokens."""
    runs = [r for r in res.part("upcycle") if r.name in res.done]
    if not runs:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for r in runs:
        curve = res.done[r.name]["val_curve"]
        start = r.upcycle["step"] * study.TOKENS_PER_STEP if r.upcycle else 0
        tokens = [(start + t) / 1e6 for t in curve["tokens"]]
        ax.plot(tokens, curve["val_loss"], marker="o", ms=2.5, label=r.arm)
    _zoom(ax, [res.done[r.name]["val_curve"]["val_loss"] for r in runs])
    ax.set_xlabel("training tokens (millions; upcycled runs after the dense half)")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(f"d_model {study.FOCUS}: upcycling the dense mid-point")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


# -------------------------------------------------------------------------- the report


def report(paths: study.Paths, scale: float = 1.0) -> tuple[str, list[Path]]:
    """The Markdown block, and the plots it links (written beside the results)."""
    import harness

    plt = harness.pyplot()
    res = Results(paths, scale)
    sizes = sizes_of(res)
    points = experts_points(res)
    experts_lines, fit = experts_section(points, harness.markdown_table)
    figures = {f"study_curves_d{s.d}": plot_curves(s, plt) for s in sizes}
    if sizes:
        figures |= {"study_gap": plot_gap(sizes, plt), "study_reach": plot_reach(sizes, plt)}
    if fit:
        figures["study_params"] = plot_params(points, fit, plt)
    figures |= {"study_sharing": plot_sharing(res, plt), "study_upcycle": plot_upcycle(res, plt)}
    written = [
        _save(fig, paths.results / f"{stem}.png", plt) for stem, fig in figures.items() if fig
    ]
    lines = [
        BEGIN,
        f"*Written by `experiments/study_report.py` from {len(res.done)} of {len(res.runs)} "
        f"runs; {_provenance(res)}.*",
        "",
        "#### 1. Each size's arms: equal tokens, equal active compute",
        "",
        *arms_section(sizes, harness.markdown_table),
        "![gap against the budget](results/study/study_gap.png)" if sizes else "",
        "",
        "#### 2. Total parameters at fixed active parameters",
        "",
        *experts_lines,
        "",
        "#### 3. Steps and seconds to reach dense's final loss",
        "",
        "The columns `steps to dense's final` and `seconds to dense's final` of 1, as "
        "fractions of dense's (blank: not reached within the run).",
        "",
        "![reach](results/study/study_reach.png)" if sizes else "",
        "",
        "#### Shared layers and the global expert pool (equal FLOPs per token)",
        "",
        *part_section(res, "sharing", harness.markdown_table),
        "![sharing](results/study/study_sharing.png)" if figures["study_sharing"] else "",
        "",
        "#### Upcycling",
        "",
        *part_section(res, "upcycle", harness.markdown_table),
        "![upcycling](results/study/study_upcycle.png)" if figures["study_upcycle"] else "",
        "",
        "#### The largest size's best MoE on 0.6 of the steps",
        "",
        *part_section(res, "short", harness.markdown_table, d=study.SIZES[-1]),
        "#### The headline pair on a GPU",
        "",
        *gpu_section(paths, harness.markdown_table),
        "",
        "#### Targets",
        "",
        *targets_section(sizes, short_run(res)),
        "",
        "#### 4. What does a parameter buy when it is not active?",
        "",
        *answer(sizes),
        END,
    ]
    return "\n".join(lines) + "\n", written


def _provenance(res: Results) -> str:
    """Which code the runs and the step-time calibration ran at."""
    runs = sorted({r["commit"][:9] + "+" * r["dirty"] for r in res.done.values()})
    days: dict[str, set[str]] = {}
    for r in res.step_times.values():
        days.setdefault(r["commit"][:9], set()).update(u[:10] for u in r["utcs"])
    calibrations = [f"{c} ({', '.join(sorted(d))})" for c, d in sorted(days.items())]
    # the dense twin's own record pools every shape's twin rounds; a shape's are its own
    rounds = sorted(
        {r["rounds"] for r in res.step_times.values() if r["step_s"] != r["twin_step_s"]}
    )
    return (
        f"code {', '.join(runs) or '-'}; step times calibrated at "
        f"{', '.join(calibrations) or 'none: raw step times'}"
        + (f", {rounds[0]}-{rounds[-1]} alternating rounds a shape" if rounds else "")
    )


def _save(fig, path: Path, plt) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_readme_block(block: str, readme: Path = README) -> None:
    """Replaces the README's text between the study-report markers with `block`."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{readme}: no {BEGIN} ... {END} markers to write the report between")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(head + block.rstrip("\n") + tail)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="results under DIR, as study.py --out (README left alone)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="as study.py's")
    ap.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    args = ap.parse_args(argv)
    paths = study.Paths.under(args.out)
    block, written = report(paths, args.budget_scale)
    print(block)
    if args.out or args.no_readme:  # the block has no README to go to: keep it beside
        written.append(paths.results / "report.md")
        written[-1].write_text(block)
    else:
        write_readme_block(block)
        written.append(README)
    print("\n".join(f"wrote {p}" for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())

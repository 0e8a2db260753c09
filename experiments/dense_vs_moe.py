"""Experiment 1 (`make experiments`): dense vs MoE at equal active compute per token.

`small-dense` (SwiGLU 1024 wide) against `small` (8 experts of 512, top-2: 2 x 512 = 1024
active) and a top-1 variant with d_expert doubled (8 experts of 1024, top-1: again 1024
active, so the same active parameters and FLOPs per token; twice the stored expert
parameters). Same tokens, seed, data order and optimiser settings, on the stdlib corpus;
the same validation batches for all. Writes results/dense_vs_moe.{json,png}.

    python experiments/dense_vs_moe.py [--steps 500] [--eval-every 50]
"""

from __future__ import annotations

import argparse
import sys

import harness
import numpy as np

VARIANTS = (
    ("dense", "small-dense", {}),
    ("moe-top2", "small", {}),
    ("moe-top1-2xwide", "small", {"moe.top_k": 1, "moe.d_expert": 1024}),
)


def steps_to_reach(curve: dict, target: float) -> float | None:
    """First step at which the val curve reaches `target` (linear between evals)."""
    steps, vals = curve["step"], curve["val_loss"]
    for i, v in enumerate(vals):
        if v <= target:
            if i == 0:
                return float(steps[0])
            s0, s1, v0 = steps[i - 1], steps[i], vals[i - 1]
            return s0 + (s1 - s0) * (v0 - target) / (v0 - v)
    return None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--variants",
        nargs="+",
        default=[v[0] for v in VARIANTS],
        choices=[v[0] for v in VARIANTS],
        help="which models to train (the first is the baseline)",
    )
    args = ap.parse_args(argv)

    base = {**harness.schedule(args.steps, args.eval_every, args.eval_batches)}
    base["train.seed"] = args.seed
    rows = [
        harness.run(f"e1-{label}", preset, {**base, **ov}, label=label)
        for label, preset, ov in VARIANTS
        if label in args.variants
    ]
    dense = rows[0]
    summary = {}
    for r in rows[1:]:
        # Equal tokens: every eval both runs reached (a run stopped early with SIGTERM keeps
        # the same learning-rate schedule, so its curve is comparable step for step).
        n = min(len(r["curve"]["val_loss"]), len(dense["curve"]["val_loss"]))
        gaps = 1 - np.array(r["curve"]["val_loss"][:n]) / np.array(dense["curve"]["val_loss"][:n])
        reach = steps_to_reach(r["curve"], dense["final_val_loss"])
        summary[r["label"]] = {
            "compared_at_step": r["curve"]["step"][n - 1],
            "val_loss_reduction_vs_dense": float(gaps[-1]),
            "val_loss_reduction_by_eval": gaps.tolist(),
            "steps_to_dense_final": reach,
            "fraction_of_dense_steps": None if reach is None else reach / dense["steps"],
            "wall_to_dense_final_s": _wall_at(r["curve"], reach),
            "dense_wall_s": dense["curve"]["wall_s"][-1],
            "step_time_ratio_vs_dense": r["step_s"] / dense["step_s"],
        }
    path = harness.write_json(
        "dense_vs_moe",
        rows,
        {
            "targets": {"val_loss_reduction": ">= 0.02", "fraction_of_dense_steps": "<= 0.7"},
            "summary": summary,
        },
    )
    _plot(rows)
    print(harness.markdown_table(rows, base=base))
    for label, s in summary.items():
        frac = s["fraction_of_dense_steps"]
        print(
            f"{label}: val loss {100 * abs(s['val_loss_reduction_vs_dense']):.2f}% "
            f"{'below' if s['val_loss_reduction_vs_dense'] > 0 else 'above'} dense "
            f"at step {s['compared_at_step']}; "
            f"reaches dense's final loss at "
            f"{'never' if frac is None else f'{frac:.2f} of the steps'}; "
            f"step time x{s['step_time_ratio_vs_dense']:.2f}"
        )
    print(f"wrote {path}")
    return 0


def _wall_at(curve, step):
    if step is None:
        return None
    return float(np.interp(step, curve["step"], curve["wall_s"]))


def _plot(rows):
    plt = harness.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    harness.plot_val_curves(axes[0], rows, "tokens")
    harness.plot_val_curves(axes[1], rows, "wall_s")
    axes[0].set_title("validation loss vs tokens (equal active params/token)")
    axes[1].set_title("validation loss vs wall time (2 shared CPU cores)")
    axes[1].set_ylabel("")
    for ax in axes:
        harness.zoom_ylim(ax, rows, skip=1)
    harness.save(fig, "dense_vs_moe")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

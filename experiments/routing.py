"""Experiment 3 (`make experiments`): routing choices on the shared smaller model (8 experts).

  * top-1 vs top-2 at fixed d_expert 256 (top-1 does half the expert FLOPs; experiment 1
    compares them at equal compute);
  * moe.dispatch=capacity with capacity factor 1.0 / 1.25 / 2.0 vs dropless: loss and the
    fraction of assignments dropped;
  * load-balance coefficient 0 vs 0.01: expert load over time, per layer.

Writes results/routing.{json,png} and results/routing_load.png.

    python experiments/routing.py [--steps 150] [--eval-every 50]
"""

from __future__ import annotations

import argparse
import math
import sys

import harness
import numpy as np


def variants():
    return (
        ("top-2 dropless (lb 0.01)", {}),
        ("top-1 dropless", {"moe.top_k": 1}),
        ("capacity 1.0", {"moe.dispatch": "capacity", "moe.capacity_factor": 1.0}),
        ("capacity 1.25", {"moe.dispatch": "capacity", "moe.capacity_factor": 1.25}),
        ("capacity 2.0", {"moe.dispatch": "capacity", "moe.capacity_factor": 2.0}),
        ("lb_coef 0", {"moe.lb_coef": 0.0}),
    )


def load_summary(row) -> dict:
    """Final per-layer max load (x E: 1 = balanced) and normalised entropy of the load."""
    load = np.array(row["load"][-1][1])  # [L, E]
    e = load.shape[-1]
    ent = -(load * np.log(np.clip(load, 1e-12, None))).sum(-1) / math.log(e)
    return {
        "final_max_load_by_layer": (load.max(-1) * e).tolist(),
        "final_load_entropy_by_layer": ent.tolist(),
        "min_expert_load": float(load.min()),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    args = ap.parse_args(argv)

    base = {
        **harness.SMALLER,
        **harness.schedule(args.steps, args.eval_every),
        "moe.num_experts": 8,
        "train.seed": 0,
    }
    rows = []
    for label, ov in variants():
        name = "e3-" + label.replace(" ", "_").replace("(", "").replace(")", "")
        rows.append(harness.run(name, "small", {**base, **ov}, label=label))
    loads = {r["label"]: load_summary(r) for r in rows}
    path = harness.write_json("routing", rows, {"load": loads})
    print(harness.markdown_table(rows, base=base))
    for label, s in loads.items():
        print(
            f"{label}: final max load x E per layer "
            f"{[round(x, 2) for x in s['final_max_load_by_layer']]}, "
            f"load entropy {[round(x, 3) for x in s['final_load_entropy_by_layer']]}"
        )

    plt = harness.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    harness.plot_val_curves(axes[0], rows, "tokens")
    harness.zoom_ylim(axes[0], rows, skip=2)
    axes[0].set_title("validation loss vs tokens (8 experts)")
    x = np.arange(len(rows))
    axes[1].bar(x, [r["final_val_loss"] for r in rows], color="C0")
    axes[1].set_xticks(x, [r["label"] for r in rows], rotation=25, ha="right", fontsize=8)
    axes[1].set_ylabel("final validation loss (nats/token)")
    vals = [r["final_val_loss"] for r in rows]
    axes[1].set_ylim(min(vals) - 0.05, max(vals) + 0.03)
    for xi, r in zip(x, rows, strict=True):
        if r["overrides"].get("moe.dispatch") == "capacity":
            axes[1].text(
                xi, r["final_val_loss"] + 0.005, f"drop {r['dropped']:.1%}", ha="center", fontsize=8
            )
    axes[1].set_title("final validation loss (dropped share of assignments)")
    axes[1].grid(alpha=0.3, axis="y")
    harness.save(fig, "routing")
    plt.close(fig)

    _plot_load([r for r in rows if r["label"] in ("top-2 dropless (lb 0.01)", "lb_coef 0")])
    print(f"wrote {path}")
    return 0


def _plot_load(rows):
    """Per expert load over time for each layer: lb 0.01 (top row) vs lb 0 (bottom row)."""
    plt = harness.pyplot()
    n_layers = len(rows[0]["load"][0][1])
    fig, axes = plt.subplots(
        len(rows),
        n_layers,
        figsize=(3.2 * n_layers, 3.0 * len(rows)),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for i, r in enumerate(rows):
        steps = [s for s, _ in r["load"]]
        load = np.array([v for _, v in r["load"]])  # [T, L, E]
        for layer in range(n_layers):
            ax = axes[i, layer]
            ax.stackplot(
                steps, load[:, layer, :].T, labels=[f"e{j}" for j in range(load.shape[-1])]
            )
            ax.set_title(f"{r['label']}: layer {layer}", fontsize=9)
            ax.set_ylim(0, 1)
            if layer == 0:
                ax.set_ylabel("share of assignments (stacked)")
            if i == len(rows) - 1:
                ax.set_xlabel("step")
    axes[0, -1].legend(fontsize=6, loc="upper right", ncol=2)
    harness.save(fig, "routing_load")
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

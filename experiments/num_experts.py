"""Experiment 2 (`make experiments`): number of experts at fixed top-2 and d_expert.

The shared smaller model (harness.SMALLER: d_model 128, 4 layers, d_expert 256, top-2)
with 4, 8, 16 and 32 experts: parameters grow with E, FLOPs per token stay flat. Reports
loss at equal tokens and step time. Writes results/num_experts.{json,png}.

    python experiments/num_experts.py [--steps 150] [--experts 4 8 16 32]
"""

from __future__ import annotations

import argparse
import sys

import harness


def rows_for(experts, steps, eval_every, seed=0):
    base = {**harness.SMALLER, **harness.schedule(steps, eval_every), "train.seed": seed}
    rows = [
        harness.run(f"e2-E{e}", "small", {**base, "moe.num_experts": e}, label=f"E={e}")
        for e in experts
    ]
    return rows, base


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16, 32])
    args = ap.parse_args(argv)

    rows, base = rows_for(args.experts, args.steps, args.eval_every)
    path = harness.write_json("num_experts", rows)
    print(harness.markdown_table(rows, base=base))

    plt = harness.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    harness.plot_val_curves(axes[0], rows, "tokens")
    axes[0].set_title("validation loss vs tokens")
    harness.zoom_ylim(axes[0], rows, skip=2)
    e = [r["overrides"]["moe.num_experts"] for r in rows]
    axes[1].plot(e, [r["final_val_loss"] for r in rows], "o-", label="final val loss")
    axes[1].set_xscale("log", base=2)
    axes[1].set_xticks(e, [str(x) for x in e])
    axes[1].set_xlabel("experts (top-2, d_expert 256)")
    axes[1].set_ylabel("final validation loss (nats/token)")
    axes[1].set_title(f"loss at {rows[0]['tokens']:,} tokens")
    axes[1].grid(alpha=0.3)
    ax2 = axes[1].twinx()
    ax2.plot(e, [r["unique_params"] / 1e6 for r in rows], "s--", color="C2", label="params")
    ax2.set_ylabel("parameters (M)", color="C2")
    ax2.set_ylim(0, None)
    axes[1].legend(
        axes[1].get_lines() + ax2.get_lines(), ["final val loss", "parameters"], fontsize=8
    )
    axes[2].plot(e, [r["step_s"] for r in rows], "o-", label="measured s/step")
    axes[2].set_xscale("log", base=2)
    axes[2].set_xticks(e, [str(x) for x in e])
    axes[2].set_xlabel("experts (top-2, d_expert 256)")
    axes[2].set_ylabel("median step time (s, shared CPU)")
    axes[2].set_ylim(0, None)
    ax3 = axes[2].twinx()
    ax3.plot(e, [r["flops_per_token"] / 1e6 for r in rows], "s--", color="C2", label="FLOPs")
    ax3.set_ylabel("model MFLOPs / token (flat)", color="C2")
    ax3.set_ylim(0, None)
    axes[2].set_title("step time vs compute per token")
    axes[2].grid(alpha=0.3)
    axes[2].legend(
        axes[2].get_lines() + ax3.get_lines(),
        ["measured s/step", "model FLOPs/token"],
        loc="lower right",
        fontsize=8,
    )
    harness.save(fig, "num_experts")
    plt.close(fig)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

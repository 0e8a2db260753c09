"""Experiment 4 (`make experiments`): cross-layer sharing at equal FLOPs, alone and with experts.

The shared smaller model's 4 layers built from g unique blocks reused cyclically
(`model.share_layers = g`; g = 0 means no sharing), dense (SwiGLU 512) and MoE (8 experts
of 256, top-2): FLOPs per token are the same for every g, unique parameters shrink.
Plots final validation loss against unique parameters. Writes results/sharing.{json,png}.

    python experiments/sharing.py [--steps 150] [--share 0 1]
"""

from __future__ import annotations

import argparse
import sys

import harness


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--share", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args(argv)

    base = {**harness.SMALLER, **harness.schedule(args.steps, args.eval_every), "train.seed": 0}
    rows = []
    for kind, extra in (("dense", {"moe.num_experts": 0}), ("moe", {"moe.num_experts": 8})):
        for g in args.share:
            label = f"{kind} {'unshared' if g == 0 else f'{g} unique block(s)'}"
            ov = {**base, **extra, "model.share_layers": g}
            rows.append(harness.run(f"e4-{kind}-g{g}", "small", ov, label=label))
    path = harness.write_json("sharing", rows)
    print(harness.markdown_table(rows, base=base))

    plt = harness.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    harness.plot_val_curves(axes[0], rows, "tokens")
    harness.zoom_ylim(axes[0], rows, skip=2)
    axes[0].set_title("validation loss vs tokens (equal FLOPs/token)")
    for kind, color in (("dense", "C0"), ("moe", "C3")):
        sel = [r for r in rows if r["label"].startswith(kind)]
        sel.sort(key=lambda r: r["unique_params"])
        axes[1].plot(
            [r["unique_params"] / 1e6 for r in sel],
            [r["final_val_loss"] for r in sel],
            "o-",
            color=color,
            label=f"{kind} ({sel[0]['flops_per_token'] / 1e6:.1f} MFLOPs/token)",
        )
        for r in sel:
            g = r["overrides"].get("model.share_layers", 0)
            axes[1].annotate(
                f"g={g or 4}",
                (r["unique_params"] / 1e6, r["final_val_loss"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
    axes[1].set_xscale("log")
    axes[1].set_xlabel("unique (stored) parameters, millions (log)")
    axes[1].set_ylabel("final validation loss (nats/token)")
    axes[1].set_title(f"loss vs unique params at {rows[0]['tokens']:,} tokens")
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    harness.save(fig, "sharing")
    plt.close(fig)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Experiment 5 (`make experiments`): a many-parameter MoE on a ~200 KB slice vs the full corpus.

The slice is built deterministically at run time: stdlib training files (by the library's
own path-hash split) taken in hash order until ~200 KB, plus every validation file, copied
under their stdlib-relative paths into the run directory. The library's split hashes those
same relative paths, so both runs are validated on exactly the same held-out files. The
model is the shared smaller config with 32 experts (top-2). Writes
results/overfitting.{json,png}.

    python experiments/overfitting.py [--steps 150] [--slice-kb 200] [--experts 32]
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import sys
from pathlib import Path

import harness

from sparsemodel import data as data_lib


def build_slice(root: Path, kb: int, val_fraction: float) -> tuple[Path, int]:
    """Writes the slice under `root` (once); returns it and its training bytes."""
    out = root / f"stdlib-slice-{kb}kb"
    marker = out / ".done"
    src = data_lib.stdlib_root()
    files = sorted(p for p in src.rglob("*.py") if "site-packages" not in p.parts)

    def h(p):
        return int.from_bytes(
            hashlib.sha256(str(p.relative_to(src)).encode()).digest()[:8], "little"
        )

    val = [p for p in files if h(p) / 2**64 < val_fraction]  # the library's split rule
    train = sorted((p for p in files if h(p) / 2**64 >= val_fraction), key=lambda p: (h(p), p))
    chosen, size = [], 0
    for p in train:
        n = p.stat().st_size
        if n == 0 or n > 40_000:  # many mid-sized files rather than one or two big ones
            continue
        chosen.append(p)
        size += n
        if size >= kb * 1000:
            break
    if not marker.exists():
        shutil.rmtree(out, ignore_errors=True)
        for p in chosen + val:
            dst = out / p.relative_to(src)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dst)
        marker.write_text("")
    return out, size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--eval-every", type=int, default=25)
    ap.add_argument("--slice-kb", type=int, default=200)
    ap.add_argument("--experts", type=int, default=32)
    args = ap.parse_args(argv)

    harness.RUNS.mkdir(parents=True, exist_ok=True)
    slice_dir, slice_bytes = build_slice(harness.RUNS, args.slice_kb, 0.05)
    base = {
        **harness.SMALLER,
        **harness.schedule(args.steps, args.eval_every),
        "moe.num_experts": args.experts,
        "train.seed": 0,
    }
    rows = [
        harness.run(f"e2-E{args.experts}", "small", base, label="full corpus (~30 MB)"),
        harness.run(
            f"e5-slice{args.slice_kb}kb-E{args.experts}",
            "small",
            {**base, "data.source": str(slice_dir)},
            label=f"{slice_bytes / 1000:.0f} KB slice",
        ),
    ]
    for r in rows:
        c = r["curve"]
        r["gap"] = [v - t for v, t in zip(c["val_loss"], c["train_loss"], strict=True)]
    epochs = rows[1]["tokens"] / slice_bytes
    path = harness.write_json(
        "overfitting",
        rows,
        {"slice_train_bytes": slice_bytes, "slice_epochs": epochs, "slice_dir": slice_dir.name},
    )
    print(harness.markdown_table(rows, base=base))
    for r in rows:
        print(f"{r['label']}: val - train gap by eval {[round(g, 3) for g in r['gap']]}")
    print(f"slice: {slice_bytes:,} training bytes, {epochs:.1f} epochs")

    plt = harness.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r, color in zip(rows, ("C0", "C3"), strict=True):
        c = r["curve"]
        mtok = [t / 1e6 for t in c["tokens"]]
        axes[0].plot(mtok, c["train_loss"], "--", color=color, label=f"{r['label']}: train")
        axes[0].plot(
            mtok, c["val_loss"], "o-", ms=3, color=color, label=f"{r['label']}: validation"
        )
        axes[1].plot(mtok, r["gap"], "o-", ms=3, color=color, label=r["label"])
    axes[0].set_xlabel("training tokens (millions)")
    axes[0].set_ylabel("loss (nats/token)")
    axes[0].set_title(f"{args.experts}-expert MoE ({rows[0]['unique_params'] / 1e6:.1f}M params)")
    axes[0].set_ylim(0, 3.5)
    axes[1].axhline(0, color="k", lw=0.6)
    later = [g for r in rows for g in r["gap"][1:]] or [0.0]
    axes[1].set_ylim(min(later) - 0.05, max(later) + 0.05)  # the first eval's window holds init
    axes[1].set_xlabel("training tokens (millions)")
    axes[1].set_ylabel("validation - train loss (nats/token)")
    axes[1].set_title(f"generalisation gap (slice: {epochs:.1f} epochs)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    harness.save(fig, "overfitting")
    plt.close(fig)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The scaling study (`make study`): what sparse activation buys, matched in tokens, FLOPs and time.

Parts (each a list of runs; a run shared by several parts trains once):
  arms     every size (d_model 32, 48, 64, 72; 4 layers) x {dense, 8 experts top-2,
           fine-grained 32 experts top-7 + 1 shared, 8 experts top-2 with aux-loss-free
           balancing};
  experts  at d_model 48: E = 1 (dense), 4, 8, 16, 32 experts top-2 of 2 x d_model;
  sharing  at d_model 48: shared layers, the global expert pool, and both, beside dense
           and per-layer MoE;
  upcycle  at d_model 48: the dense run's mid-point checkpoint copy- and drop-upcycled to
           8 experts, trained for the other half, against that MoE from scratch;
  noise    a second seed of dense and the best MoE at the two largest sizes.

Every arm of a size has the dense twin's active FFN width (4 x d_model) and trains the same
tokens: ~30 per active parameter of the dense twin at 4,096 tokens per step. A finished
run is experiments/results/study/<run>.json (committed); a rerun skips runs whose JSON
matches the registry's spec and resumes a run stopped part-way (its checkpoints are under
experiments/runs/study/, git-ignored).

    python experiments/study.py [PART ...] [--list] [--dry-run] [--max-minutes M]
    python experiments/study.py --calibrate [PART ...]   # alternating step times
    python experiments/study_report.py                   # plots, tables, README block
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import functools
import io
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sparsemodel import config, flops

HERE = Path(__file__).parent
PRESET = "small"  # every run overrides the whole model and schedule; the preset fills the rest

# ------------------------------------------------------------------------ the design

# d_model: 74k-351k active parameters (4.7x). 80 instead of 72 would add ~75 min to the
# ~6.5 h estimate of `--list`, 96 ~5 h; 64 is the CLI run (2,000 steps) at 30/param.
SIZES = (32, 48, 64, 72)
N_LAYERS = 4
N_HEADS = 4  # heads of d/4: even at every size, as rotary embeddings need
BATCH, SEQ = 32, 128  # 4,096 tokens per step, as the CLI run
TOKENS_PER_STEP = BATCH * SEQ
TOKENS_PER_PARAM = 30
LR = 3e-3
EVALS = 20  # validation every 5% of a run
EVAL_BATCHES = 16  # the same 16 x 32 windows of the validation split for every run
STEP_MULTIPLE = 2 * EVALS  # an upcycled half run still evaluates every 5% of itself
FOCUS = 48  # the size of the experts, sharing and upcycle parts (64 would add ~2 h)
EXPERTS = (4, 8, 16, 32)  # the E sweep besides dense; 64 does not fit 6 hours
NOISE_SIZES = SIZES[-2:]
UPCYCLE_DROP = 0.5  # drop-upcycling's re-initialised fraction (the paper's r = 0.5)
SHORT = 0.6  # the short part's budget, as a fraction of the dense twin's steps
PARTS = ("arms", "experts", "sharing", "upcycle", "noise", "short")
MOE_ARMS = ("moe8", "fine32", "moe8-free")  # the candidates for "the best MoE"
# Minutes a run spends outside its steps: compilation, the CPU peak measurement, data.
SETUP_MIN = 1.0
# The headline pair on one GPU (`--gpu SECONDS`, experiments/gpu_check.sh): ~26M active
# parameters (4 layers of d_model 640, heads of 128), bfloat16, 64 x 1,024 tokens a step.
GPU = {"d": 640, "heads": 5, "batch": 64, "seq": 1024, "lr": 1e-3, "eval_batches": 4}


def model_overrides(d: int) -> dict:
    """The dense twin of size d: 4 layers of 4 heads, a SwiGLU MLP 4 x d wide."""
    return {
        "model.d_model": d,
        "model.n_layers": N_LAYERS,
        "model.n_heads": N_HEADS,
        "model.n_kv_heads": N_HEADS,
        "model.d_ff": 4 * d,
    }


def moe_overrides(d: int, arm: str) -> dict:
    """The FFN of an arm at size d; each keeps 4 x d active FFN width per token."""
    if arm == "dense":
        return {"moe.num_experts": 0}
    if arm == "fine32":  # 7 routed + 1 shared expert of d/2: 8 x d/2 = 4d active
        return {
            "moe.num_experts": 32,
            "moe.top_k": 7,
            "moe.d_expert": d // 2,
            "moe.num_shared": 1,
        }
    if arm == "moe8-free":  # DeepSeek-V3's routing: sigmoid scores, bias balancing, no lb loss
        return {
            **moe_overrides(d, "moe8"),
            "moe.score": "sigmoid",
            "moe.bias_rate": 1e-3,
            "moe.lb_coef": 0.0,
        }
    experts = int(arm.removeprefix("moe"))  # moeE: E experts of 2d, top-2: 2 x 2d = 4d active
    return {"moe.num_experts": experts, "moe.top_k": 2, "moe.d_expert": 2 * d}


def active_ffn_width(cfg: config.Config) -> int:
    """Width of the FFN a token passes through (routed + shared experts, or the dense MLP)."""
    e = cfg.moe
    if not cfg.is_moe:
        return cfg.model.d_ff
    return e.d_expert * (e.top_k + e.num_shared)


def dense_steps(d: int, scale: float = 1.0) -> int:
    """Steps for ~TOKENS_PER_PARAM tokens per active parameter of the dense twin (times
    `scale`), rounded up to a whole number of evaluation intervals of both halves."""
    cfg = config.load(PRESET, {**model_overrides(d), **moe_overrides(d, "dense")})
    tokens = scale * TOKENS_PER_PARAM * flops.param_counts(cfg).active_per_token
    return max(STEP_MULTIPLE, STEP_MULTIPLE * math.ceil(tokens / TOKENS_PER_STEP / STEP_MULTIPLE))


def schedule_overrides(steps: int, seed: int, warmup: int | None = None) -> dict:
    """Warmup 5% then cosine, validation every 5%, checkpoints at the middle and the end."""
    return {
        "train.steps": steps,
        "train.batch_size": BATCH,
        "train.seq_len": SEQ,
        "train.lr": LR,
        "train.warmup_steps": max(1, steps // 20) if warmup is None else warmup,
        "train.eval_every": steps // EVALS,
        "train.eval_batches": EVAL_BATCHES,
        "train.log_every": max(1, steps // 100),
        "train.checkpoint_every": steps // 2,
        # All of them (a stopped run adds one): the middle one seeds the upcycled runs.
        "train.keep_checkpoints": 10,
        "train.seed": seed,
    }


# --------------------------------------------------------------------------- the runs


@dataclass
class Run:
    """One training run of the study: what it trains, and which parts it belongs to."""

    name: str
    size: int  # d_model
    arm: str
    overrides: dict
    seed: int = 0
    parts: list[str] = field(default_factory=list)
    twin: str = ""  # the dense run of the same size and seed (step-time calibration)
    upcycle: dict | None = None  # {"source": run, "step": mid, "method": ..., "drop": ...}

    @property
    def steps(self) -> int:
        return self.overrides["train.steps"]

    @property
    def seed0(self) -> str:
        """The name of this arm's seed-0 run (the pair of a second-seed run)."""
        return run_name(self.size, self.arm)

    @property
    def tokens(self) -> int:
        return self.steps * self.overrides["train.batch_size"] * self.overrides["train.seq_len"]

    def config(self) -> config.Config:
        return config.load(PRESET, self.overrides)

    def spec(self) -> dict:
        """What makes a finished result this run's: the command (preset + overrides + seed)
        and the upcycling source; not the library's defaults, which move under it."""
        return {"preset": PRESET, "overrides": self.overrides, "upcycle": self.upcycle}


def run_name(d: int, arm: str, seed: int = 0) -> str:
    return f"d{d}-{arm}" + (f"-s{seed}" if seed else "")


def arm_run(
    d: int,
    arm: str,
    seed: int = 0,
    scale: float = 1.0,
    ffn: str | None = None,
    extra: dict | None = None,
) -> Run:
    """A run trained from scratch for the size's full budget: the FFN of arm `ffn` (default
    `arm`), then `extra` overrides (sharing, the expert pool, another expert shape)."""
    overrides = {
        **model_overrides(d),
        **moe_overrides(d, ffn or arm),
        **(extra or {}),
        **schedule_overrides(dense_steps(d, scale), seed),
    }
    return Run(run_name(d, arm, seed), d, arm, overrides, seed, twin=run_name(d, "dense", seed))


def upcycled_run(dense: Run, method: str, moe: dict) -> Run:
    """The dense run's mid-point checkpoint upcycled (`sparsemodel upcycle --method`) and
    trained for the other half: fresh AdamW, a 2% warmup to the dense run's learning rate
    at the mid-point, cosine to the dense run's final learning rate."""
    half = dense.steps // 2
    dense_cfg = dense.config()
    peak = float(f"{_lr_at(dense_cfg.train, half):.8g}")  # as written in the JSON spec
    final = LR * dense_cfg.train.min_lr_ratio
    overrides = {
        **model_overrides(dense.size),
        **moe,
        **schedule_overrides(half, dense.seed + 1000, warmup=max(1, dense.steps // 50)),
        "train.lr": peak,
        "train.min_lr_ratio": final / peak,
    }
    # Seed + 1000: the second half draws new training windows (the upcycled workdir's data
    # iterator starts afresh) instead of repeating the first half's batches.
    upcycle = {"source": dense.name, "step": half, "method": method}
    if method == "drop":
        upcycle["drop"] = UPCYCLE_DROP
    return Run(
        run_name(dense.size, f"up-{method}", dense.seed),
        dense.size,
        f"up-{method}",
        overrides,
        dense.seed,
        twin=dense.name,
        upcycle=upcycle,
    )


def _lr_at(t: config.TrainConfig, step: int) -> float:
    """The learning rate train.run uses at `step` (its schedule is indexed from 0)."""
    from sparsemodel import optim

    return float(optim.schedule(t)(step - 1))


def registry(best_moe: dict[int, str] | None = None, scale: float = 1.0) -> dict[str, Run]:
    """Every run of the study by name, in the order they train.

    best_moe: the MoE arm of the headline pair at each noise size (see `best_moe_arms`);
    the 8-expert top-2 arm until the arms part has finished there."""
    runs: dict[str, Run] = {}

    def add(run: Run, part: str) -> Run:
        run = runs.setdefault(run.name, run)
        if part not in run.parts:
            run.parts.append(part)
        return run

    for d in SIZES:
        for arm in ("dense", *MOE_ARMS):
            add(arm_run(d, arm, scale=scale), "arms")
    add(arm_run(FOCUS, "dense", scale=scale), "experts")
    for e in EXPERTS:
        add(arm_run(FOCUS, f"moe{e}", scale=scale), "experts")
    pool = {"moe.pool": "global"}
    for arm, ffn, extra in (
        ("dense", "dense", {}),
        ("moe8", "moe8", {}),
        ("dense-share1", "dense", {"model.share_layers": 1}),
        ("moe8-share1", "moe8", {"model.share_layers": 1}),
        ("pool8", "moe8", pool),  # as many unique FFN parameters as dense
        ("pool32", "moe32", pool),  # as many unique FFN parameters as per-layer moe8
        ("pool16-share2", "moe16", {**pool, "model.share_layers": 2}),  # both ideas
    ):
        add(arm_run(FOCUS, arm, scale=scale, ffn=ffn, extra=extra), "sharing")
    dense = add(arm_run(FOCUS, "dense", scale=scale), "upcycle")
    # Copy-upcycling makes every expert the dense MLP (d_expert = d_ff): top-2 computes two
    # of them, as in sparse upcycling and drop-upcycling; the scratch MoE has that shape.
    wide = {"moe.num_experts": 8, "moe.top_k": 2, "moe.d_expert": 4 * FOCUS}
    add(upcycled_run(dense, "copy", wide), "upcycle")
    add(upcycled_run(dense, "drop", wide), "upcycle")
    add(arm_run(FOCUS, "moe8x4d", scale=scale, ffn="moe8", extra=wide), "upcycle")
    for d in NOISE_SIZES:
        arm = (best_moe or {}).get(d, "moe8")
        add(arm_run(d, "dense", seed=1, scale=scale), "noise")
        add(arm_run(d, arm, seed=1, scale=scale), "noise")
    # The largest size's best MoE trained for 0.6 of dense's steps on its own warmup and
    # cosine: whether it ends at dense's final loss, which steps-to-reach on the full
    # schedule cannot tell (dense's last 40% of steps gain most from the learning rate's decay).
    top = SIZES[-1]
    arm = (best_moe or {}).get(top, "moe8")
    add(arm_run(top, "dense", scale=scale), "short")
    add(arm_run(top, f"{arm}-short", scale=SHORT * scale, ffn=arm), "short")
    return runs


def best_moe_arms(results: dict[str, dict]) -> dict[int, str]:
    """At each noise size whose MoE arms have all finished: the one with the lowest final
    validation loss (seed 0)."""
    best = {}
    for d in NOISE_SIZES:
        finished = {a: results.get(run_name(d, a)) for a in MOE_ARMS}
        if all(finished.values()):
            best[d] = min(finished, key=lambda a: finished[a]["final_val_loss"])
    return best


def gpu_runs(arm: str, steps: int) -> list[Run]:
    """The headline pair on a GPU: dense and `arm` at GPU's size, `steps` steps each."""
    d, heads = GPU["d"], GPU["heads"]
    schedule = {
        **schedule_overrides(steps, 0),
        "train.batch_size": GPU["batch"],
        "train.seq_len": GPU["seq"],
        "train.lr": GPU["lr"],
        "train.dtype": "bfloat16",
        "train.eval_batches": GPU["eval_batches"],
        "train.checkpoint_every": steps,  # the end only: nothing resumes or upcycles these
        "train.keep_checkpoints": 1,
    }
    runs = []
    for name in ("dense", arm):
        overrides = {
            **model_overrides(d),
            "model.n_heads": heads,
            "model.n_kv_heads": heads,
            **moe_overrides(d, name),
            **schedule,
        }
        runs.append(Run(f"gpu-{name}", d, name, overrides, parts=["gpu"], twin="gpu-dense"))
    return runs


# ------------------------------------------------------------------ results on disk


@dataclass(frozen=True)
class Paths:
    results: Path  # <run>.json and step_times.jsonl (committed)
    runs: Path  # workdirs (checkpoints; git-ignored)

    @classmethod
    def under(cls, out: str | os.PathLike | None) -> Paths:
        """Default experiments/results/study and experiments/runs/study; `out` (or the
        harness's EXPERIMENTS_OUT) moves both, e.g. for a smoke run."""
        base = Path(out) if out else None
        if base is None and os.environ.get("EXPERIMENTS_OUT"):
            base = Path(os.environ["EXPERIMENTS_OUT"])
        root = base if base else HERE
        return cls(root / "results" / "study", root / "runs" / "study")

    def result(self, name: str) -> Path:
        return self.results / f"{name}.json"


def load_results(paths: Paths) -> dict[str, dict]:
    """Every finished run's record, by name (the step-time file is not one)."""
    out = {}
    for path in sorted(paths.results.glob("*.json")):
        record = json.loads(path.read_text())
        if "spec" in record:
            out[record["name"]] = record
    return out


def status(run: Run, results: dict[str, dict]) -> str:
    """'done', 'to run', or 'spec changed' (a result of another command under this name)."""
    record = results.get(run.name)
    if record is None:
        return "to run"
    return "done" if _same_spec(record["spec"], run.spec()) else "spec changed"


def _same_spec(a: dict, b: dict) -> bool:
    """Specs equal as JSON would store them (tuples and lists alike, floats as written)."""
    return json.loads(json.dumps(a, sort_keys=True)) == json.loads(json.dumps(b, sort_keys=True))


def unknown_keys(overrides: dict) -> list[str]:
    """Override keys this library's config does not have (features other branches add)."""
    known = {f"{s}.{k}" for s, values in config.Config().to_dict().items() for k in values}
    return [k for k in overrides if k not in known]


def missing_feature(run: Run) -> str | None:
    """Why the library cannot train `run` yet (a key or command another branch adds), or
    None when it can."""
    unknown = unknown_keys(run.overrides)
    if unknown:
        return f"needs {', '.join(unknown)}: merge pending"
    if run.upcycle and not upcycle_command_exists():
        return "needs `sparsemodel upcycle`: merge pending"
    return None


@functools.cache
def upcycle_command_exists() -> bool:
    """Whether the installed CLI has the `upcycle` command (its --help exits 0; argparse
    refuses an unknown command with 2)."""
    from sparsemodel import cli

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(["upcycle", "--help"])
        except SystemExit as e:
            return e.code == 0
    return False


# ------------------------------------------------------------------------ estimates


def timing_key(overrides: dict) -> str:
    """What a step's time depends on: the model, the experts and the batch shape."""
    kept = {
        k: v
        for k, v in overrides.items()
        if k.startswith(("model.", "moe."))
        or k in ("train.batch_size", "train.seq_len", "train.dtype")
    }
    return json.dumps(kept, sort_keys=True)


def load_step_times(paths: Paths) -> dict[str, dict]:
    """Each timing key's calibration: every round of every record at the commit of its
    newest record, pooled (step_times.jsonl, appended). A burst of load on a shared machine
    spoils a round or two, so the median over all of a commit's rounds is the robust figure,
    and a rule fixed in advance picks it rather than a choice among records."""
    path = paths.results / "step_times.jsonl"
    if not path.exists():
        return {}
    by_key: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_key.setdefault(record["key"], []).append(record)
    return {key: pool_rounds(records) for key, records in by_key.items()}


def pool_rounds(records: list[dict]) -> dict:
    """The newest record, with step_s, twin_step_s and ratio over every round of every
    record at its commit; a round's ratio is its own time over its twin's."""
    newest = records[-1]
    same = [r for r in records if r["commit"] == newest["commit"]]
    own = [t for r in same for t in r["step_s"]["all"]]
    twin = [t for r in same for t in r["twin_step_s"]["all"]]
    ratios = [a / b for a, b in zip(own, twin, strict=True)]

    def stats(xs: list[float]) -> dict:
        return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "all": xs}

    return {
        **newest,
        "step_s": stats(own),
        "twin_step_s": stats(twin),
        "ratio": statistics.median(ratios),
        "ratio_range": [min(ratios), max(ratios)],
        "rounds": len(ratios),
        "utcs": [r["utc"] for r in same],
    }


def dense_overrides(d: int) -> dict:
    """The model and FFN overrides of the dense twin of size d."""
    return {**model_overrides(d), **moe_overrides(d, "dense")}


def step_seconds(run: Run, step_times: dict[str, dict]) -> tuple[float, bool]:
    """(seconds per training step, measured?): the calibration of the run's shape, else its
    dense twin's scaled by model FLOPs (x1.3 for routing), else a throughput guess."""
    key = timing_key(run.overrides)
    if key in step_times:
        return step_times[key]["step_s"]["median"], True
    cfg = config.load(PRESET, trainable_overrides(run.overrides))
    step_flops = flops.model_flops_per_token(cfg) * TOKENS_PER_STEP
    twin = step_times.get(
        timing_key({**dense_overrides(run.size), "train.batch_size": BATCH, "train.seq_len": SEQ})
    )
    if twin is not None:
        twin_cfg = config.load(PRESET, dense_overrides(run.size))
        rate = flops.model_flops_per_token(twin_cfg) * TOKENS_PER_STEP / twin["step_s"]["median"]
    else:
        rate = 20e9  # FLOP/s of a float32 train step on two cores, roughly
    return step_flops / rate * (1.3 if cfg.is_moe else 1.0), False


def estimate_minutes(run: Run, step_times: dict[str, dict]) -> tuple[float, bool]:
    """(minutes to train `run` here, from a measured step time?): steps, validation (a
    forward pass costs ~1/3 of a training step) and setup."""
    step_s, measured = step_seconds(run, step_times)
    evals = EVALS * EVAL_BATCHES * step_s / 3
    return (run.steps * step_s + evals) / 60 + SETUP_MIN, measured


def trainable_overrides(overrides: dict) -> dict:
    """The overrides without keys this library lacks: the same shape, for estimates."""
    unknown = set(unknown_keys(overrides))
    return {k: v for k, v in overrides.items() if k not in unknown}


# ------------------------------------------------------------------------- listing


def describe(run: Run) -> dict:
    """The numbers --list shows: parameters, FLOPs, and their match with the dense twin
    (for a run that needs a pending feature, of its shape without that feature)."""
    cfg = config.load(PRESET, trainable_overrides(run.overrides))
    twin = config.load(PRESET, dense_overrides(run.size))
    counts, twin_counts = flops.param_counts(cfg), flops.param_counts(twin)
    flop, twin_flop = flops.model_flops_per_token(cfg), flops.model_flops_per_token(twin)
    return {
        "unique": counts.unique,
        "total": counts.total,
        "active": counts.active_per_token,
        "flops": flop,
        "ffn_width": active_ffn_width(cfg),
        "twin_ffn_width": active_ffn_width(twin),
        "active_vs_twin": counts.active_per_token / twin_counts.active_per_token - 1,
        "flops_vs_twin": flop / twin_flop - 1,
    }


def listing(runs: list[Run], parts, results, step_times, paths: Paths) -> list[str]:
    """The --list table: each run's parameters, FLOPs, budget, estimate and status, then
    the minutes per part (of `parts`, all when empty) and in all."""
    head = (
        f"{'run':<18} {'unique':>9} {'total':>9} {'active':>8} {'dAct':>6} {'FFN':>4} "
        f"{'MFLOP/t':>7} {'dFLOP':>6} {'steps':>5} {'Mtok':>5} {'min':>5}  {'parts':<28} status"
    )
    lines, minutes = [head], {}
    for run in runs:
        n = describe(run)
        est, measured = estimate_minutes(run, step_times)
        state = missing_feature(run) or status(run, results)
        notes = "; ".join(x for x in (_mismatch(n), _pending_note(run)) if x)
        lines.append(
            f"{run.name:<18} {n['unique']:>9,} {n['total']:>9,} {n['active']:>8,} "
            f"{n['active_vs_twin']:>+6.1%} {n['ffn_width']:>4} {n['flops'] / 1e6:>7.2f} "
            f"{n['flops_vs_twin']:>+6.1%} {run.steps:>5} {run.tokens / 1e6:>5.1f} "
            f"{'' if measured else '~'}{est:>4.1f}  {','.join(run.parts):<28} {state}"
            + (f"  ({notes})" if notes else "")
        )
        if state != "done":
            counted = next(p for p in run.parts if not parts or p in parts)
            minutes.setdefault(counted, []).append((est, state.startswith("needs")))
    lines.append("")
    for part, todo in [(p, minutes[p]) for p in PARTS if p in minutes] + [
        ("all", [x for p in minutes.values() for x in p])
    ]:
        waiting = sum(pending for _, pending in todo)
        lines.append(
            f"{part:<8} {len(todo):>3} runs to do ({waiting} waiting for a merge), "
            f"~{sum(est for est, _ in todo):.0f} min"
        )
    lines.append(
        "dAct, dFLOP: active parameters and FLOPs per token against the dense twin; FFN: the "
        "active FFN width. A run shared by parts counts in the first listed; ~: estimated from "
        f"model FLOPs, no calibrated step time of that shape. Results: {paths.results}"
    )
    return lines


def _mismatch(n: dict) -> str:
    """Where an arm's compute differs from its dense twin's: the FFN width must match;
    the router (d x E per layer) adds active parameters and FLOPs."""
    notes = []
    if n["ffn_width"] != n["twin_ffn_width"]:
        notes.append(f"active FFN width {n['ffn_width']} vs dense {n['twin_ffn_width']}")
    if abs(n["active_vs_twin"]) > 0.01:
        notes.append(f"active params {n['active_vs_twin']:+.1%} vs dense")
    return "; ".join(notes)


def _pending_note(run: Run) -> str:
    unknown = unknown_keys(run.overrides)
    return f"counted without {', '.join(unknown)}" if unknown else ""


# ----------------------------------------------------------------------- main


def selected(runs: dict[str, Run], parts: list[str], only: list[str]) -> list[Run]:
    """The runs of the chosen parts (all when none), matching any --only pattern."""
    chosen = [r for r in runs.values() if not parts or set(r.parts) & set(parts)]
    if only:
        chosen = [r for r in chosen if any(fnmatch.fnmatch(r.name, p) for p in only)]
    return chosen


def plan(runs: list[Run], results, step_times, max_minutes: float | None):
    """The runs to train now, in order, with their estimates: not done, trainable, and
    (with max_minutes) fitting in what is left of the time; plus what is skipped and why."""
    todo, skipped, budget = [], [], max_minutes
    for run in runs:
        state = status(run, results)
        if state == "done":
            continue
        missing = missing_feature(run)
        if missing:
            skipped.append((run, missing))
            continue
        est, _ = estimate_minutes(run, step_times)
        if budget is not None and est > budget:
            skipped.append((run, f"~{est:.0f} min does not fit in the {budget:.0f} left"))
            continue
        todo.append((run, est, state))
        if budget is not None:
            budget -= est
    return todo, skipped


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("parts", nargs="*", metavar="PART", help=f"any of {', '.join(PARTS)}")
    ap.add_argument("--list", action="store_true", help="runs, params, FLOPs, estimates; no run")
    ap.add_argument("--dry-run", action="store_true", help="say what would train, train nothing")
    ap.add_argument("--max-minutes", type=float, help="start only runs estimated to fit")
    ap.add_argument(
        "--calibrate", action="store_true", help="step times of shapes not measured at this commit"
    )
    ap.add_argument("--repeats", type=int, default=5, help="--calibrate: rounds per pair")
    ap.add_argument("--again", action="store_true", help="--calibrate shapes measured already")
    ap.add_argument("--only", nargs="+", default=[], metavar="GLOB", help="run names, e.g. d32-*")
    ap.add_argument("--out", help="results and runs under DIR (default: experiments/)")
    ap.add_argument("--budget-scale", type=float, default=1.0, help="tokens x F (smoke runs)")
    ap.add_argument(
        "--gpu",
        type=float,
        metavar="SECONDS",
        help="train the headline pair on this machine's GPU, SECONDS of steps each",
    )
    args = ap.parse_args(argv)
    for part in args.parts:
        if part not in PARTS:
            ap.error(f"part {part!r}: not one of {', '.join(PARTS)}")
    paths = Paths.under(args.out)
    results = load_results(paths)
    runs = registry(best_moe_arms(results), args.budget_scale)
    chosen = selected(runs, args.parts, args.only)
    step_times = load_step_times(paths)

    if args.list:
        print("\n".join(listing(chosen, args.parts, results, step_times, paths)))
        return 0
    import study_run  # jax and the training loop: only when something runs

    if args.gpu:  # the best MoE as the CPU study found it (its results are committed)
        return study_run.gpu_headline(load_results(Paths.under(None)), paths, args.gpu)
    if args.calibrate:
        study_run.calibrate(chosen, paths, args.repeats, args.again, args.dry_run)
        return 0
    todo, skipped = plan(chosen, results, step_times, args.max_minutes)
    for run, why in skipped:
        print(f"skip {run.name}: {why}")
    total = 0.0
    for run, est, state in todo:
        total += est
        print(
            f"{'would train' if args.dry_run else 'train'} {run.name} ({state}): "
            f"{run.steps} steps, ~{est:.1f} min (cumulative ~{total:.0f} min)"
        )
    if not todo:
        print("nothing to train: every chosen run is done or waits for a merge")
    if args.dry_run:
        return 0
    t0 = time.perf_counter()
    for run, est, _ in todo:
        spent = (time.perf_counter() - t0) / 60
        if args.max_minutes is not None and spent + est > args.max_minutes:
            print(f"skip {run.name}: ~{est:.0f} min does not fit in what is left after {spent:.0f}")
            continue
        try:
            finished = study_run.train_and_record(run, runs, paths)
        except study_run.StudyError as e:
            print(f"skip {run.name}: {e}")
            continue
        if not finished:
            print(f"{run.name}: stopped part-way; rerun the same command to resume it")
            return 1
        print(f"{run.name}: done; {(time.perf_counter() - t0) / 60:.1f} min so far")
    return 0


if __name__ == "__main__":
    sys.exit(main())

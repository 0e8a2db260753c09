"""Benchmark suite: what routing costs, as ratios measured in one run (`make bench`).

This machine is shared and noisy (+-10-15% run to run), so every comparison runs its
variants in one process, alternating (one call of each per round, after a warm-up call),
and every timed figure is a spread {"median", "min", "max"} over >= 3 rounds; a ratio is
taken round by round. The ratios are the evidence, not any absolute time. Prints a table
and appends the run as one JSON line to results/bench.jsonl (commit, UTC time, CPU, jax,
repeats, configs, every figure; bench_record.py); targets are read from that history,
never asserted.

    python experiments/bench.py [--repeats N] [--skip-peers] [--quick] [--results PATH]
    python experiments/bench.py --history [--results PATH]    # every run against the targets

Figures (name: what it is; target):

Three sizes, suffix _d64, _d128, _d256 (d_model): 4 layers, heads of 32 (d_model / 32
heads, as many KV heads), vocab 256, float32, 16 x 256 = 4,096 tokens per step. The MoE is
`small` with 8 experts of width 2 x d_model, top-2, dropless, blocks of 512 rows; its dense
twin is `small-dense` with one MLP 4 x d_model wide (equal active width). Overrides in
size_overrides and in each record's "configs".
  step_ratio_d*            MoE / dense train step time; <= 1.20
  step_ms_d*               {moe, dense}: each train step (ms); report
  layer_ratio_d*           one FFN layer's fwd+bwd on 4,096 tokens, MoE / dense; <= 1.30
  layer_ms_d*              {moe, dense}: each layer (ms); report
  layer_floor_d*           the MoE layer with its experts on static slices of balanced
                           routing (the same router, dispatch and combine; no per-block
                           copies or control flow), over the dense layer, in the same
                           rounds: what a perfect expert kernel would leave; report
  step_efficiency_dense_d* the dense step's model FLOP/s over the model FLOP/s of a step
                           made of nothing but its matmuls, each shape at the rate XLA
                           achieves on it alone (bench_shapes.py; timed in turn with the
                           steps): the matmuls' time over the step's. Both count the same
                           model FLOPs, so a step that is all matmul scores 1.0; >= 0.85
  step_efficiency_moe_d*   the MoE step's, against its own shapes; >= 0.85
  step_efficiency_moe_dense_shapes_d*  the MoE step's, against the dense twin's shapes
                           (smaller expert blocks cannot flatter it); >= 0.85
  model_gflops_d*, matmul_gflops_d*  {moe, dense}: model GFLOP/s of each step, and of a
                           step made of its matmuls alone; report
Real routing, the d_model 64 pair on text: validation batches of the stdlib corpus, the
MoE's router trained ROUTER_STEPS steps with train.run in runs/bench-router/ (trained once,
reused by later runs); the dense twin from fresh parameters (its time does not depend on
them):
  real_routing_step_ratio  MoE / dense train step on the same batches; report, beside
                           step_ratio_d64 (balanced random routing)
  real_routing_step_ms     {moe, dense} (ms); report
  real_routing_max_load    per MoE layer: the largest expert's load x E (1.0 = balanced),
                           over the batches the MoE's steps ran (warm-up included); report
  real_routing_router_steps  steps the router was trained
small vs small-dense, their own batch (16 x 128):
  moe_dense_step_ratio     small / small-dense train step; <= 1.20
  moe_dense_step_ms        {moe, dense} (ms)
  moe_dense_layer_ratio    one FFN layer fwd+bwd, MoE / dense of equal active width; <= 1.30
  moe_dense_layer_ms       {moe, dense} (ms)
  moe_dense_layer_floor    as layer_floor_d*, for small; report
  moe_layer_parts_ms       {router, layout, dispatch, experts, combine}: the MoE layer's
                           stages, each timed alone (ms); report
  expert_scaling_ratio     small's step with 32 / with 4 experts (same active parameters);
                           <= 1.15, or <= expert_scaling_floor of the same run
  expert_scaling_ms        {e32, e4}: each train step (ms); report
  expert_scaling_ratio_without_optimizer  the same less each one's AdamW update; report
  optimizer_ms_e32_e4      {e32, e4}: the AdamW update alone (ms); report
  expert_scaling_gap_ms    {optimizer, expert_layers, matmul_blocks (part of expert_layers),
                           rest}: the 32-expert step's extra time by part (ms); report
  expert_scaling_floor     what the 32-expert step would cost here paying only its smaller
                           matmul blocks and its extra weights' least memory traffic, over
                           the 4-expert step (_expert_scaling); report
  expert_scaling_blocks_rows  [32 experts, 4 experts]: rows per expert block
  expert_scaling_ratio_4x_tokens  expert_scaling_ratio at 4x the tokens per step; report
  expert_scaling_4x_tokens_ms  {e32, e4}: those steps (ms); report
  memory_gb_per_s          bytes read + written per second by x + 1 on 256 MB; report
  hw_model_flops_ratio     compiled / model FLOPs of small's step (a count: one value); <= 1.35
  mfu_dense, mfu_moe       the d_model 512 pair's model FLOP/s over a float32 2048^3 matmul
                           timed in turn with them (CPU; else the device's data sheet);
                           >= 0.50, >= 0.40
  matmul_peak_gflops, peak_source  that peak, and where it comes from
  decode_tokens_per_s_b1, decode_tokens_per_s_b16  KV-cache sampling of 64 tokens, small,
                           batch 1 and 16; report
  hf_mixtral_speedup       transformers' Mixtral train step time / ours, same model and batch
                           (peer_mixtral.PEER), its faster expert kernel; >= 1.0; None when
                           skipped or the `hf` extra is missing
  ours_tokens_per_s, hf_tokens_per_s, hf_tokens_per_s_eager, hf_tokens_per_s_grouped_mm,
  hf_experts_implementation, model_gflops_ours_hf {ours, hf}, matmul_gflops_xla_torch
                           {block, 2048: {xla, torch}}: the peer's details; report
  host_heap_kept           whether glibc keeps freed memory (host_heap), as in training
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from functools import partial
from itertools import count
from pathlib import Path

import bench_record
import bench_shapes
import jax
import jax.numpy as jnp
import numpy as np
import optax
import peer_mixtral
from bench_record import SIZES, spread
from flax import nnx

from sparsemodel import (
    config,
    data,
    dispatch,
    evaluate,
    flops,
    hardware,
    host_heap,
    initialize,
    kernels,
    moe,
    optim,
    sharding,
    steps,
    train,
)
from sparsemodel.checkpoint import CheckpointError
from sparsemodel.config import Config, ConfigError
from sparsemodel.data import DataError
from sparsemodel.grouped_matmul import (
    StackedExperts,
    expert_rows,
    loop_swiglu,
    smallest_block,
    swiglu_backward,
    swiglu_forward,
)
from sparsemodel.layers import swiglu
from sparsemodel.moe import MoE
from sparsemodel.profile import profile

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "bench.jsonl"
ROUTER_WORKDIR = HERE / "runs" / "bench-router"  # git-ignored, like every runs/
ROUTER_STEPS = 200
QUICK_ROUTER_STEPS = 20  # --quick: its own workdir, so the real one is never a 20-step router
E32_E4 = ("e32", "e4")  # the expert-scaling runners: small with 32 and with 4 experts


# ----------------------------------------------------------------------------- configs


def size_overrides(d_model: int) -> dict[str, dict]:
    """{moe, dense}: the preset and overrides of the MoE and its dense twin at one size."""
    common = {
        "model.d_model": d_model,
        "model.n_layers": 4,
        "model.n_heads": d_model // 32,
        "model.n_kv_heads": d_model // 32,
        "model.vocab_size": 256,
        "train.batch_size": 16,
        "train.seq_len": 256,
        "train.dtype": "float32",
    }
    experts = {
        "moe.num_experts": 8,
        "moe.top_k": 2,
        "moe.d_expert": 2 * d_model,
        "moe.dispatch": "dropless",
        "moe.block_size": 512,
    }
    return {
        "moe": {"preset": "small", "overrides": common | experts},
        "dense": {"preset": "small-dense", "overrides": common | {"model.d_ff": 4 * d_model}},
    }


def size_configs(d_model: int) -> dict[str, Config]:
    """{moe, dense}: the configs of size_overrides."""
    specs = size_overrides(d_model).items()
    return {name: config.load(s["preset"], s["overrides"]) for name, s in specs}


def _tokens(cfg: Config) -> int:
    return cfg.train.batch_size * cfg.train.seq_len


# ----------------------------------------------------------------------------- runners


def _train_step_runner(cfg, params=None, batches=None, loads=None):
    """A zero-argument callable timing one compiled train step: from fresh parameters or
    `params`, on a fixed batch of random tokens or on `batches` (host [B, S+1]), one per
    call in turn; `loads`, a list, receives each call's expert loads [layers, E]."""
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        graphdef, p = initialize.init_params(cfg, mesh, 0)
        p = p if params is None else params
        tx = optim.make_optimizer(cfg.train)
        o = initialize.init_opt_state(tx, p, mesh)
        if batches is None:
            rng = np.random.default_rng(0)
            shape = (cfg.train.batch_size, cfg.train.seq_len + 1)
            batches = [rng.integers(0, cfg.model.vocab_size, shape, np.int32)]
        on_device = [sharding.put_batch(b, mesh) for b in batches]
        step = jax.jit(steps.make_train_step(graphdef, cfg, tx), donate_argnums=(0, 1))
        compiled = step.lower(p, o, on_device[0], jnp.int32(1)).compile()
    turn = count()

    def one_step(po):
        batch = on_device[next(turn) % len(on_device)]
        p, o, metrics = compiled(*po, batch, jnp.int32(1))
        if loads is not None:
            loads.append(metrics["load"])
        return p, o

    return _donated_runner(one_step, (p, o))


def _donated_runner(step, state):
    """A zero-argument callable timing state = step(state), whose buffers step donates, to
    completion (after one warm-up call): fresh output buffers would add page faults."""
    box = [state]

    def run():
        t0 = time.perf_counter()
        box[0] = step(box[0])
        jax.block_until_ready(box[0])
        return time.perf_counter() - t0

    run()  # warm-up
    return run


def _layer_runner(cfg, tokens: int, floor: bool = False):
    """fwd+bwd of one FFN layer on [T, D] (_layer_loss, or _layer_floor_loss if floor)."""
    x = jax.random.normal(jax.random.key(1), (tokens, cfg.model.d_model), jnp.float32)
    loss, w = (_layer_floor_loss if floor else _layer_loss)(cfg, tokens)
    return _runner(jax.jit(jax.grad(loss, argnums=(0, 1))), w, x)


def _layer_loss(cfg, tokens: int):
    """(loss(w, x), w): one FFN layer, MoE or dense SwiGLU of width k * d_expert, on [T, D]."""
    if cfg.is_moe:
        w = MoE(cfg, rngs=nnx.Rngs(0)).weights()
        kern = kernels.choose(cfg)

        def loss(w, x):
            mask = jnp.ones((tokens,), bool)
            out = moe.moe_forward(cfg, kern, moe.Collectives(), w, x, mask, seq_len=tokens)
            return jnp.sum(out.y * out.y) + out.stats.lb_loss

        return loss, w
    d, f = cfg.model.d_model, cfg.moe.top_k * cfg.moe.d_expert
    k = jax.random.split(jax.random.key(2), 3)
    w = {
        "gate": 0.02 * jax.random.normal(k[0], (d, f)),
        "up": 0.02 * jax.random.normal(k[1], (d, f)),
        "down": 0.02 * jax.random.normal(k[2], (f, d)),
    }

    def dense_loss(w, x):
        y = swiglu(x, w["gate"], w["up"], w["down"])
        return jnp.sum(y * y)

    return dense_loss, w


def _layer_floor_loss(cfg, tokens: int):
    """(loss(w, x), w): the MoE layer with its experts on static slices of T * k / E rows
    each, as if routing were exactly balanced: the same router, layout, dispatch and
    combine, but no per-block slicing, row writes or control flow. What the layer would
    cost with a perfect expert kernel. Its values are the MoE layer's when every expert
    gets T * k / E rows, a multiple of the loop's smallest block; else only its time is
    meaningful."""
    e = cfg.moe
    unit = smallest_block(e.block_size)
    per_expert = tokens * e.top_k // e.num_experts
    w = MoE(cfg, rngs=nnx.Rngs(0)).weights()

    def loss(w, x):
        mask = jnp.ones((tokens,), bool)
        logits, probs = moe.route(cfg, w["router"], x)
        r = moe.top_k_routing(probs, mask, e.top_k, e.renormalize)
        rows = expert_rows(r.experts, e.num_experts, unit)
        lay = dispatch.layout_from_rows(rows.rows, rows.block_expert.shape[0] * unit)
        xr = dispatch.gather_rows(x, lay)  # [n_rows, D], n_rows >= T * k
        ys = []  # E x [T * k / E, D]
        for i in range(e.num_experts):
            xb = xr[i * per_expert : (i + 1) * per_expert]
            ys.append(swiglu_forward(xb, w["gate_up"][i], w["down"][i])[0])
        pad = jnp.zeros((xr.shape[0] - tokens * e.top_k, xr.shape[1]), xr.dtype)
        y = dispatch.combine(jnp.concatenate([*ys, pad]), r.weights, lay)  # [T, D]
        load = jnp.zeros((e.num_experts + 1,), jnp.float32).at[r.experts].add(1.0)
        served = moe.Served(y, load[: e.num_experts], jnp.float32(0), jnp.sum(mask))
        return jnp.sum(y * y) + moe.router_stats(logits, probs, mask, served).lb_loss

    return loss, w


def _runner(fn, *args):
    """A zero-argument callable timing fn(*args) to completion (after one warm-up call)."""
    jax.block_until_ready(fn(*args))

    def run():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0

    return run


def _layer_part_runners(cfg, tokens: int) -> dict:
    """The MoE layer's fwd+bwd cut into its stages (dropless blocks), each timed alone:
    where the time goes beyond the expert matmuls."""
    e = cfg.moe
    x = jax.random.normal(jax.random.key(1), (tokens, cfg.model.d_model), jnp.float32)
    mask = jnp.ones((tokens,), bool)
    w = MoE(cfg, rngs=nnx.Rngs(0)).weights()

    def router(w_router, x):
        logits, probs = moe.route(cfg, w_router, x)
        r = moe.top_k_routing(probs, mask, e.top_k, e.renormalize)
        load = jnp.zeros((e.num_experts + 1,), jnp.float32).at[r.experts].add(1.0)
        served = moe.Served(x, load[: e.num_experts], jnp.float32(0), jnp.sum(mask))
        stats = moe.router_stats(logits, probs, mask, served)
        return jnp.sum(r.weights) + stats.lb_loss + stats.z_loss

    _, probs = moe.route(cfg, w["router"], x)
    routing = moe.top_k_routing(probs, mask, e.top_k, e.renormalize)

    def layout(experts):
        rows = expert_rows(experts, e.num_experts, smallest_block(e.block_size))
        n_rows = rows.block_expert.shape[0] * smallest_block(e.block_size)
        return rows, dispatch.layout_from_rows(rows.rows, n_rows)

    rows, lay = jax.jit(layout)(routing.experts)
    xr = dispatch.gather_rows(x, lay)
    sq = lambda f: lambda *a: jnp.sum(f(*a) ** 2)  # noqa: E731
    experts = sq(lambda x, *w: loop_swiglu(x, rows, e.block_size, StackedExperts.single(*w))[0])
    return {
        "router": _runner(jax.jit(jax.grad(router, (0, 1))), w["router"], x),
        "layout": _runner(jax.jit(layout), routing.experts),
        "dispatch": _runner(jax.jit(jax.grad(sq(dispatch.gather_rows))), x, lay),
        "experts": _runner(jax.jit(jax.grad(experts, (0, 1, 2))), xr, w["gate_up"], w["down"]),
        "combine": _runner(
            jax.jit(jax.grad(sq(dispatch.combine), (0, 1))), xr, routing.weights, lay
        ),
    }


def _optimizer_runner(cfg):
    """One AdamW update (with clipping) of cfg's parameters: its cost grows with total, not
    active, parameters."""
    mesh = sharding.make_mesh(cfg.mesh)
    _, p = initialize.init_params(cfg, mesh, 0)
    tx = optim.make_optimizer(cfg.train)
    o = initialize.init_opt_state(tx, p, mesh)
    g = jax.tree.map(lambda a: jnp.full_like(a, 1e-3), p)

    def update(state, g):
        p, o = state
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o

    compiled = jax.jit(update, donate_argnums=0).lower((p, o), g).compile()
    return _donated_runner(lambda po: compiled(po, g), (p, o))  # donated, as in the step


def _expert_matmul_runner(cfg, n_rows: int, block: int):
    """The expert SwiGLU's six matmuls (2 forward, 4 backward) over n_rows rows in blocks
    of `block` rows, every block with the same, cache-resident weights: what XLA:CPU's
    matmuls cost at that block size, apart from any weight traffic."""
    d, f = cfg.model.d_model, cfg.moe.d_expert
    k = jax.random.split(jax.random.key(3), 5)
    x, dy = (jax.random.normal(k[i], (n_rows, d)) for i in (0, 1))
    w = [0.02 * jax.random.normal(k[i], s) for i, s in ((2, (d, 2, f)), (3, (f, d)))]

    def blocks(x, dy, *w):
        def body(i, carry):
            dx, grads = carry
            rows = lambda a: jax.lax.dynamic_slice_in_dim(a, i * block, block)  # noqa: E731
            _, h = swiglu_forward(rows(x), *w)
            dxb, *dw = swiglu_backward(rows(x), h, rows(dy), *w)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dxb, i * block, 0)
            return dx, tuple(a + b for a, b in zip(grads, dw, strict=True))

        zeros = (jnp.zeros_like(x), tuple(jnp.zeros_like(a) for a in w))
        return jax.lax.fori_loop(0, n_rows // block, body, zeros)

    return _runner(jax.jit(blocks), x, dy, *w)


def _matmul_runner(shape: tuple[int, int, int], instances: int):
    """A zero-argument callable timing `instances` float32 [m, k] x [k, n] matmuls, one
    batched matmul."""
    m, k, n = shape
    a = jax.random.normal(jax.random.key(4), (instances, m, k), jnp.float32)
    b = jax.random.normal(jax.random.key(5), (instances, k, n), jnp.float32)
    return _runner(jax.jit(jnp.matmul), a, b)


def _copy_bytes_per_s(repeats: int) -> list[float]:
    """Memory bandwidth, per round: bytes read plus written per second by x + 1 on 256 MB."""
    x = jnp.ones((64 << 20,), jnp.float32)
    rounds = alternate({"copy": _runner(jax.jit(lambda x: x + 1), x)}, repeats)
    return [2 * x.nbytes / r["copy"] for r in rounds]


# ------------------------------------------------------------------------- measuring


def alternate(runners: dict, repeats: int) -> list[dict]:
    """Seconds per call of each runner, calling them in turn: one dict per round."""
    return [{name: run() for name, run in runners.items()} for _ in range(repeats)]


def per_round(fn, *groups) -> dict[str, float]:
    """The spread of fn over the rounds of one or more alternate() results, round by round."""
    return spread(fn(*rounds) for rounds in zip(*groups, strict=True))


def ms(rounds: list[dict], name) -> dict[str, float]:
    """The spread of a runner's milliseconds per call."""
    return spread(r[name] * 1e3 for r in rounds)


def per_second(rounds: list[dict], name, work: float) -> dict[str, float]:
    """The spread of `work` (tokens, FLOPs, ...) per second of a runner's call."""
    return spread(work / r[name] for r in rounds)


def _pair(rounds, ratio_name: str, ms_name: str, target: str, names=("moe", "dense"), digits=0):
    """Two runners timed in turn: (figures: the first's time over the second's, round by
    round, and both times in ms; the table's row)."""
    first, second = names
    times = {name: ms(rounds, name) for name in names}
    figures = {ratio_name: per_round(lambda r: r[first] / r[second], rounds), ms_name: times}
    shown = " / ".join(f"{times[name]['median']:.{digits}f}" for name in names) + " ms"
    return figures, (ratio_name, shown, target)


def _layer_figures(cfg, repeats: int, ratio_name: str, ms_name: str, floor_name: str):
    """One FFN layer's fwd+bwd on cfg's tokens per step, MoE against dense of equal width,
    with the MoE layer's floor (_layer_floor_loss) in the same rounds."""
    tokens = _tokens(cfg)
    runners = {
        "moe": _layer_runner(cfg, tokens),
        "dense": _layer_runner(cfg.replace({"moe.num_experts": 0}), tokens),
        "floor": _layer_runner(cfg, tokens, floor=True),
    }
    rounds = alternate(runners, repeats)
    figures, row = _pair(rounds, ratio_name, ms_name, "<= 1.30", digits=1)
    figures[floor_name] = per_round(lambda r: r["floor"] / r["dense"], rounds)
    floor = figures[floor_name]["median"]
    return figures, [row, (floor_name, f"static balanced experts {floor:.2f}", "report")]


# ------------------------------------------------------------------------- sections


def _size_figures(d_model: int, repeats: int):
    """The MoE / dense pair at one size: step and layer ratios, step efficiencies."""
    cfgs = size_configs(d_model)
    tag = f"_d{d_model}"
    matmuls = {name: bench_shapes.step_matmuls(c) for name, c in cfgs.items()}
    shapes = bench_shapes.distinct_shapes(matmuls["moe"] + matmuls["dense"])
    instances = {s: bench_shapes.instances_per_call(s, n) for s, n in shapes.items()}
    runners = {name: _train_step_runner(c) for name, c in cfgs.items()}
    runners |= {s: _matmul_runner(s, n) for s, n in instances.items()}
    rounds = alternate(runners, repeats)  # the steps and every matmul shape, in turn
    model_flops = {name: flops.model_flops_per_token(c) * _tokens(c) for name, c in cfgs.items()}

    def matmul_seconds(r, shapes_of: str) -> float:
        """A config's matmuls' time at the shapes' rates of round r."""
        rate = {s: 2 * math.prod(s) * n / r[s] for s, n in instances.items()}
        return bench_shapes.matmul_seconds(matmuls[shapes_of], rate)

    def efficiency(name: str, against: str) -> dict[str, float]:
        """The spread of the matmul time of against's shapes over name's step time."""
        return per_round(lambda r: matmul_seconds(r, against) / r[name], rounds)

    figures, step_row = _pair(rounds, f"step_ratio{tag}", f"step_ms{tag}", "<= 1.20")
    layer_figures, layer_rows = _layer_figures(
        cfgs["moe"], repeats, f"layer_ratio{tag}", f"layer_ms{tag}", f"layer_floor{tag}"
    )
    figures |= layer_figures
    figures[f"model_gflops{tag}"] = {
        name: per_second(rounds, name, model_flops[name] / 1e9) for name in cfgs
    }
    figures[f"matmul_gflops{tag}"] = {
        name: per_round(
            lambda r, name=name: model_flops[name] / matmul_seconds(r, name) / 1e9, rounds
        )
        for name in cfgs
    }
    model, mm = figures[f"model_gflops{tag}"], figures[f"matmul_gflops{tag}"]
    rows = [step_row, *layer_rows]
    for suffix, name, against in (
        ("dense", "dense", "dense"),
        ("moe", "moe", "moe"),
        ("moe_dense_shapes", "moe", "dense"),
    ):
        figure = f"step_efficiency_{suffix}{tag}"
        figures[figure] = efficiency(name, against)
        shown = f"{model[name]['median']:.0f} of {mm[against]['median']:.0f} GFLOP/s"
        rows.append((figure, shown, ">= 0.85"))
    return figures, rows


def _trained_model(cfg: Config, workdir: Path, log) -> evaluate.Restored:
    """cfg trained for train.steps steps in workdir: trained there once (or a stopped run
    finished), read back by every later run."""
    restored = _newest_checkpoint(workdir)
    if restored is None or restored.step < cfg.train.steps:
        log(f"  training the router: {cfg.train.steps} steps in {workdir} ...")
        train.run(cfg, workdir, log=log)
        restored = evaluate.restore(workdir)
    config.check_model_record(config.model_record(restored.cfg), cfg, str(workdir))
    return restored


def _newest_checkpoint(workdir: Path) -> evaluate.Restored | None:
    """The workdir's newest checkpoint, or None before its first."""
    if not (workdir / "config.yaml").is_file():
        return None
    try:
        return evaluate.restore(workdir)
    except CheckpointError:
        return None


def _real_routing(repeats: int, router_steps: int, workdir: Path, log):
    """The d_model 64 pair on corpus text, the MoE's router trained: step ratio, loads."""
    specs = size_overrides(64)
    moe_cfg = config.load(
        specs["moe"]["preset"], specs["moe"]["overrides"] | {"train.steps": router_steps}
    )
    dense_cfg = config.load(specs["dense"]["preset"], specs["dense"]["overrides"])
    trained = _trained_model(moe_cfg, workdir, log)
    t = moe_cfg.train
    corpus = data.load_corpus(moe_cfg.data.source, moe_cfg.data.val_fraction)
    # One batch per call, the same for both: the warm-up's, then one per round.
    batches = list(data.eval_batches(corpus.val, t.seq_len, t.batch_size, repeats + 1))
    loads: list = []
    runners = {
        "moe": _train_step_runner(moe_cfg, trained.params, batches, loads),
        "dense": _train_step_runner(dense_cfg, batches=batches),
    }
    figures, row = _pair(
        alternate(runners, repeats), "real_routing_step_ratio", "real_routing_step_ms", "report"
    )
    e = moe_cfg.moe.num_experts
    max_load = [np.asarray(load).max(axis=-1) * e for load in loads]  # per call: [layers]
    figures["real_routing_max_load"] = [spread(layer) for layer in zip(*max_load, strict=True)]
    figures["real_routing_router_steps"] = trained.step
    shown = ", ".join(f"{s['median']:.2f}" for s in figures["real_routing_max_load"])
    load_row = ("real_routing_max_load", f"per layer {shown} (1.0 = balanced)", "report")
    return figures, [row, load_row]


def _small_pair(small: Config, dense: Config, repeats: int):
    """small vs small-dense at their own batch: step, one FFN layer, the layer's parts."""
    step_rounds = alternate(
        {"moe": _train_step_runner(small), "dense": _train_step_runner(dense)}, repeats
    )
    figures, step_row = _pair(step_rounds, "moe_dense_step_ratio", "moe_dense_step_ms", "<= 1.20")
    layer_figures, layer_rows = _layer_figures(
        small, repeats, "moe_dense_layer_ratio", "moe_dense_layer_ms", "moe_dense_layer_floor"
    )
    figures |= layer_figures
    part_rounds = alternate(_layer_part_runners(small, _tokens(small)), repeats)
    parts = {name: ms(part_rounds, name) for name in part_rounds[0]}
    figures["moe_layer_parts_ms"] = parts
    shown = " ".join(f"{k} {v['median']:.1f}" for k, v in parts.items()) + " ms"
    return figures, [step_row, *layer_rows, ("moe_layer_parts", shown, "report")]


def _expert_scaling(small: Config, repeats: int):
    """expert_scaling_ratio, and where the 32-expert step's extra time goes: AdamW, the
    expert layers (of which: smaller matmul blocks), and the rest (the scan, the norms).

    The floor is what the 32-expert step would cost on this machine if it paid only the
    4-expert step, the matmul slowdown of its smaller blocks (XLA:CPU's kernels) and the
    least memory traffic its extra weights need: 40 bytes per float32 parameter per step
    (read in the forward and the backward 8, gradient written 4, AdamW reads weight,
    gradient and two moments and writes three 28), at the bandwidth measured here. Every
    part is taken round by round: round i of each measurement together."""
    e32, e4 = (small.replace({"moe.num_experts": n}) for n in (32, 4))
    tokens = _tokens(small)
    step = alternate({"e32": _train_step_runner(e32), "e4": _train_step_runner(e4)}, repeats)
    opt = alternate({"e32": _optimizer_runner(e32), "e4": _optimizer_runner(e4)}, repeats)
    layer = alternate({"e32": _layer_runner(e32, tokens), "e4": _layer_runner(e4, tokens)}, repeats)
    n_rows, n_moe = tokens * small.moe.top_k, small.layer_plan().kinds().count("moe")
    block = {c: min(small.moe.block_size, n_rows // c.moe.num_experts) for c in (e32, e4)}
    mm = alternate(
        {
            name: _expert_matmul_runner(small, n_rows, block[c])
            for name, c in (("e32", e32), ("e4", e4))
        },
        repeats,
    )
    extra_params = flops.param_counts(e32).total - flops.param_counts(e4).total
    bandwidth = _copy_bytes_per_s(repeats)
    # What scales with total parameters (AdamW, weight and gradient traffic) is paid once
    # per step; 4x the tokens per step shows how much of the ratio it is.
    big = {"train.batch_size": 4 * small.train.batch_size}
    step_4x = alternate(
        {"e32": _train_step_runner(e32.replace(big)), "e4": _train_step_runner(e4.replace(big))},
        repeats,
    )

    def gap(s, o, lay, m) -> dict[str, float]:
        """The 32-expert step's extra seconds by part, in one round."""
        parts = {
            "optimizer": o["e32"] - o["e4"],
            "expert_layers": n_moe * (lay["e32"] - lay["e4"]),
            "matmul_blocks": n_moe * (m["e32"] - m["e4"]),  # part of expert_layers
        }
        parts["rest"] = s["e32"] - s["e4"] - parts["optimizer"] - parts["expert_layers"]
        return parts

    gaps = [gap(*r) for r in zip(step, opt, layer, mm, strict=True)]
    figures, ratio_row = _pair(
        step, "expert_scaling_ratio", "expert_scaling_ms", "<= 1.15, or the floor", E32_E4
    )
    figures_4x, row_4x = _pair(
        step_4x, "expert_scaling_ratio_4x_tokens", "expert_scaling_4x_tokens_ms", "report", E32_E4
    )
    figures |= figures_4x | {
        "expert_scaling_ratio_without_optimizer": per_round(
            lambda s, o: (s["e32"] - o["e32"]) / (s["e4"] - o["e4"]), step, opt
        ),
        "optimizer_ms_e32_e4": {name: ms(opt, name) for name in E32_E4},
        "expert_scaling_gap_ms": {part: spread(g[part] * 1e3 for g in gaps) for part in gaps[0]},
        "expert_scaling_floor": per_round(
            lambda s, g, bw: (s["e4"] + g["matmul_blocks"] + 40 * extra_params / bw) / s["e4"],
            step,
            gaps,
            bandwidth,
        ),
        "expert_scaling_blocks_rows": [block[e32], block[e4]],
        "memory_gb_per_s": spread(bw / 1e9 for bw in bandwidth),
    }
    adamw = {name: s["median"] for name, s in figures["optimizer_ms_e32_e4"].items()}
    gap_ms = {part: s["median"] for part, s in figures["expert_scaling_gap_ms"].items()}
    rows = [
        ratio_row,
        (
            "expert_scaling_ratio_without_optimizer",
            f"AdamW alone {adamw['e32']:.0f} / {adamw['e4']:.0f} ms",
            "report",
        ),
        (
            "expert_scaling_gap_ms",
            f"AdamW {gap_ms['optimizer']:.0f}, expert layers {gap_ms['expert_layers']:.0f} "
            f"(blocks of {block[e32]} not {block[e4]} rows {gap_ms['matmul_blocks']:.0f}), "
            f"rest {gap_ms['rest']:.0f} ms",
            "report",
        ),
        (
            "expert_scaling_floor",
            f"4-expert step + smaller blocks + {40 * extra_params / 1e9:.2f} GB at "
            f"{figures['memory_gb_per_s']['median']:.0f} GB/s",
            "report",
        ),
        row_4x,
    ]
    return figures, rows


def _flop_count(small: Config):
    """Compiled vs model FLOPs of small's train step: a count, one value."""
    r = profile(small, steps=1)
    figures = {"hw_model_flops_ratio": r["compiled"]["hw_model_flops_ratio"]}
    row = ("hw_model_flops_ratio", f"{r['compiled']['flops_per_step']:.3g} FLOP/step", "<= 1.35")
    return figures, [row]


def _mfu(small: Config, dense: Config, repeats: int):
    """Model FLOP/s of the d_model 512 pair against a matmul peak measured in turn with
    them (the same load), or the device's data-sheet peak off CPU."""
    wide = {
        "model.d_model": 512,
        "model.n_heads": 8,
        "model.n_kv_heads": 8,
        "model.d_ff": 2048,
        "moe.d_expert": 1024,
        "train.batch_size": 8,
    }
    cfgs = {"dense": dense.replace(wide), "moe": small.replace(wide)}
    runners = {name: _train_step_runner(c) for name, c in cfgs.items()}
    on_cpu = jax.default_backend() == "cpu"
    n = 2048
    if on_cpu:
        a = jnp.ones((n, n), jnp.float32)
        runners["peak"] = _runner(jax.jit(lambda a: a @ a), a)
    rounds = alternate(runners, repeats)
    if on_cpu:
        peaks = [2 * n**3 / r["peak"] for r in rounds]
        source = "measured: float32 2048^3 matmul, alternating"
    else:
        peak, source = hardware.peak_flops_per_device()
        peaks = [peak] * repeats
    figures = {"matmul_peak_gflops": spread(p / 1e9 for p in peaks), "peak_source": source}

    def mfu(name: str, c: Config) -> dict[str, float]:
        step_flops = flops.model_flops_per_token(c) * _tokens(c)
        return per_round(lambda r, peak: step_flops / r[name] / peak, rounds, peaks)

    figures |= {f"mfu_{name}": mfu(name, c) for name, c in cfgs.items()}
    row = (
        "mfu_dense",
        f"moe {figures['mfu_moe']['median']:.1%}, of "
        f"{figures['matmul_peak_gflops']['median']:.0f} GFLOP/s",
        ">= 0.50; mfu_moe >= 0.40",
    )
    return figures, [row]


def _decode(small: Config, repeats: int, new_tokens: int = 64):
    """KV-cache sampling of new_tokens tokens, batch 1 and 16, in turn."""
    lm = nnx.merge(*initialize.init_params(small, sharding.make_mesh(small.mesh), 0))
    key = jax.random.key(0)
    sample = lambda prompt: evaluate.sample(lm, prompt, new_tokens, 0.8, 0, key)  # noqa: E731
    sizes = (1, 16)
    rounds = alternate({b: _runner(sample, jnp.ones((b, 16), jnp.int32)) for b in sizes}, repeats)
    figures = {f"decode_tokens_per_s_b{b}": per_second(rounds, b, b * new_tokens) for b in sizes}
    b16 = figures["decode_tokens_per_s_b16"]["median"]
    return figures, [("decode_tokens_per_s_b1", f"b16 {b16:.0f}", "report")]


def _peer(small: Config, repeats: int, skipped: str | None):
    """Our train tokens/s against transformers' Mixtral on the same model and batch."""
    if skipped:
        return {"hf_mixtral_speedup": None}, [("hf_mixtral_speedup", skipped, ">= 1.0")]
    figures = _peer_figures(small.replace(peer_mixtral.PEER), repeats)
    if figures["hf_mixtral_speedup"] is None:
        why = "not measured: torch or transformers failed to import"
        return figures, [("hf_mixtral_speedup", why, ">= 1.0")]
    ours, hf = (figures[f"{side}_tokens_per_s"]["median"] for side in ("ours", "hf"))
    mm, model = figures["matmul_gflops_xla_torch"], figures["model_gflops_ours_hf"]
    rows = [
        (
            "hf_mixtral_speedup",
            f"{ours:.0f} / {hf:.0f} tok/s (HF {figures['hf_experts_implementation']})",
            ">= 1.0",
        ),
        (
            "model_gflops_ours_hf",
            f"ours {model['ours']['median']:.0f}, HF {model['hf']['median']:.0f}; matmuls "
            "XLA / torch: "
            + ", ".join(
                f"{k} {v['xla']['median']:.0f} / {v['torch']['median']:.0f}" for k, v in mm.items()
            ),
            "report",
        ),
    ]
    return figures, rows


def _peer_figures(ours_cfg, repeats: int) -> dict:
    """Our train tokens/s against transformers' Mixtral on the same model and batch, the
    peer with its fastest CPU expert kernel of the ones that fit in memory."""
    tokens = _tokens(ours_cfg)
    d = ours_cfg.model.d_model
    runners = {"ours": _train_step_runner(ours_cfg)}
    for impl in ("eager", "grouped_mm"):
        runner = peer_mixtral.train_step_runner(impl)
        if runner is None:
            return {"hf_mixtral_speedup": None}
        runners[impl] = runner
    # The two stacks' matmul speeds on the expert block's shape and on a large square one,
    # measured in turn with the steps: each side's model FLOP/s against its own matmuls.
    shapes = {"block": (ours_cfg.moe.block_size, d, ours_cfg.moe.d_expert), "2048": (2048,) * 3}
    calls, matmul = 20, jax.jit(jnp.matmul)  # 20 per timing: one alone is mostly wake-up
    for name, (m, k, n) in shapes.items():
        a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
        runners[f"xla_{name}"] = _runner(lambda a, b: [matmul(a, b) for _ in range(calls)], a, b)
        runners[f"torch_{name}"] = peer_mixtral.matmul_runner(m, k, n, calls)
    rounds = alternate(runners, repeats)
    best = min(("eager", "grouped_mm"), key=lambda impl: statistics.median(r[impl] for r in rounds))
    step_flops = flops.model_flops_per_token(ours_cfg) * tokens
    return {
        "matmul_gflops_xla_torch": {
            name: {
                side: per_second(rounds, f"{side}_{name}", 2 * math.prod(shape) * calls / 1e9)
                for side in ("xla", "torch")
            }
            for name, shape in shapes.items()
        },
        "model_gflops_ours_hf": {
            side: per_second(rounds, impl, step_flops / 1e9)
            for side, impl in (("ours", "ours"), ("hf", best))
        },
        "ours_tokens_per_s": per_second(rounds, "ours", tokens),
        "hf_tokens_per_s": per_second(rounds, best, tokens),
        "hf_tokens_per_s_eager": per_second(rounds, "eager", tokens),
        "hf_tokens_per_s_grouped_mm": per_second(rounds, "grouped_mm", tokens),
        "hf_experts_implementation": best,
        "hf_mixtral_speedup": per_round(lambda r: r[best] / r["ours"], rounds),
    }


# ------------------------------------------------------------------------- the run


def _sections(args, log) -> list:
    """(what, a call returning (figures, rows)) for every part of the bench, in order."""
    small, dense = config.load("small"), config.load("small-dense")
    repeats = args.repeats
    router_steps, router_dir = (
        (QUICK_ROUTER_STEPS, ROUTER_WORKDIR.with_name("bench-router-quick"))
        if args.quick
        else (ROUTER_STEPS, ROUTER_WORKDIR)
    )
    peer_skipped = None
    if args.skip_peers or args.quick:
        peer_skipped = "skipped (--quick)" if args.quick else "skipped (--skip-peers)"
    elif missing := peer_mixtral.missing_extra():
        log(missing)  # said up front; the other figures are measured all the same
        peer_skipped = "not measured: no `hf` extra"
    return [
        *(
            (
                f"train step and one FFN layer, MoE vs its dense twin, d_model {d}, 4,096 "
                "tokens; the steps' matmul shapes",
                partial(_size_figures, d, repeats),
            )
            for d in SIZES
        ),
        (
            f"real routing: d_model 64 on corpus text, router trained {router_steps} steps",
            partial(_real_routing, repeats, router_steps, router_dir, log),
        ),
        (
            "small vs small-dense: step, FFN layer, layer parts",
            partial(_small_pair, small, dense, repeats),
        ),
        (
            "train step with 32 experts vs 4 (top-2, same active parameters)",
            partial(_expert_scaling, small, repeats),
        ),
        ("compiled vs model FLOPs of the small train step", partial(_flop_count, small)),
        (
            "MFU at d_model 512 against this CPU's measured matmul peak",
            partial(_mfu, small, dense, repeats),
        ),
        ("KV-cache decoding, small, batch 1 and 16", partial(_decode, small, repeats)),
        (
            "training tokens/s against transformers' Mixtral (CPU, same config)",
            partial(_peer, small, repeats, peer_skipped),
        ),
    ]


def _shown(figure) -> str:
    """A spread as 'median [min, max]', a number as itself, anything else as nothing."""
    if isinstance(figure, dict) and "median" in figure:
        return f"{figure['median']:.3f} [{figure['min']:.3f}, {figure['max']:.3f}]"
    return f"{figure:.3f}" if isinstance(figure, float) else ""


def _print_table(figures: dict, rows: list[tuple[str, str, str]]) -> None:
    width = max(len(name) for name, _, _ in rows)
    values = [_shown(figures.get(name)) for name, _, _ in rows]
    value_width = max(len(v) for v in values)
    print(f"{'figure':<{width}}  {'median [min, max]':<{value_width}}  {'measured':<48} target")
    for (name, measured, target), value in zip(rows, values, strict=True):
        print(f"{name:<{width}}  {value:<{value_width}}  {measured:<48} {target}")


def _print_history(path: Path) -> int:
    if not path.is_file():
        print(f"bench: error: --results {path}: no such file", file=sys.stderr)
        return 2
    print(bench_record.history_table(bench_record.read(path)))
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds per figure (>= 3)")
    ap.add_argument("--skip-peers", action="store_true", help="leave out the transformers peer")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 1 round, the router trained 20 steps in its own workdir, no peer",
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="the JSONL history to append to")
    ap.add_argument("--history", action="store_true", help="print the runs in --results and stop")
    args = ap.parse_args(argv)
    if args.history:
        return _print_history(args.results)
    if args.quick:
        args.repeats = 1
    elif args.repeats < 3:
        ap.error(f"--repeats {args.repeats}: each figure is a median of at least 3 rounds")
    heap_kept = host_heap.keep_freed_heap()  # as `sparsemodel train` does, before JAX starts
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    t0, clocks0 = time.perf_counter(), bench_record.cpu_clocks()
    figures: dict = {}
    rows: list[tuple[str, str, str]] = []
    try:
        sections = _sections(args, log)
        for i, (what, run) in enumerate(sections, 1):
            log(f"{i}/{len(sections)} {what} ...")
            section_figures, section_rows = run()
            figures |= section_figures
            rows += section_rows
    except (ConfigError, DataError, CheckpointError) as e:
        print(f"bench: error: {e}", file=sys.stderr)
        return 2
    figures["host_heap_kept"] = heap_kept
    _print_table(figures, rows)
    wall_s = time.perf_counter() - t0
    record = bench_record.run_context(args.repeats, args.quick) | {
        "wall_s": wall_s,
        "others_cpu_share": bench_record.others_cpu_share(clocks0, wall_s),
        "configs": {f"d{d}": size_overrides(d) for d in SIZES},
        "figures": figures,
    }
    bench_record.append(args.results, record)
    log(f"appended this run to {args.results} ({record['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

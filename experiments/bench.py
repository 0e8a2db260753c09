"""Benchmark suite: what routing costs, as ratios measured in one run (`make bench`).

This machine is shared and noisy (+-10-15% run to run), so every comparison runs its
variants in one process, alternating, and reports medians; the ratios are the evidence,
not any absolute time. Prints a table, then one line of JSON with the named figures
(also written to results/bench.json).

    python experiments/bench.py [--repeats N] [--skip-peers]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peer_mixtral
from flax import nnx

from sparsemodel import (
    config,
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
)
from sparsemodel.grouped_matmul import (
    StackedExperts,
    expert_rows,
    loop_swiglu,
    smallest_block,
    swiglu_backward,
    swiglu_forward,
)
from sparsemodel.moe import MoE
from sparsemodel.profile import profile


def _train_step_runner(cfg):
    """A compiled train step on a fixed batch: a zero-argument callable timing one step."""
    mesh = sharding.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        graphdef, p = initialize.init_params(cfg, mesh, 0)
        tx = optim.make_optimizer(cfg.train)
        o = initialize.init_opt_state(tx, p, mesh)
        rng = np.random.default_rng(0)
        batch = sharding.put_batch(
            rng.integers(0, 256, (cfg.train.batch_size, cfg.train.seq_len + 1), np.int32), mesh
        )
        step = jax.jit(steps.make_train_step(graphdef, cfg, tx), donate_argnums=(0, 1))
        compiled = step.lower(p, o, batch, jnp.int32(1)).compile()
    return _donated_runner(lambda po: compiled(*po, batch, jnp.int32(1))[:2], (p, o))


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


def _layer_runner(cfg, tokens: int):
    """fwd+bwd of one FFN layer (MoE or dense SwiGLU of width k * d_expert) on [T, D]."""
    x = jax.random.normal(jax.random.key(1), (tokens, cfg.model.d_model), jnp.float32)
    if cfg.is_moe:
        layer = MoE(cfg, rngs=nnx.Rngs(0))
        w = layer.weights()

        def loss(w, x):
            from sparsemodel.moe import Collectives, moe_forward

            mask = jnp.ones((tokens,), bool)
            kern = kernels.choose(cfg)
            out = moe_forward(cfg, kern, Collectives(), w, x, mask, seq_len=tokens)
            return jnp.sum(out.y * out.y) + out.stats.lb_loss
    else:
        d, f = cfg.model.d_model, cfg.moe.top_k * cfg.moe.d_expert
        k = jax.random.split(jax.random.key(2), 3)
        w = {
            "gate": 0.02 * jax.random.normal(k[0], (d, f)),
            "up": 0.02 * jax.random.normal(k[1], (d, f)),
            "down": 0.02 * jax.random.normal(k[2], (f, d)),
        }

        def loss(w, x):
            from sparsemodel.layers import swiglu

            y = swiglu(x, w["gate"], w["up"], w["down"])
            return jnp.sum(y * y)

    return _runner(jax.jit(jax.grad(loss, argnums=(0, 1))), w, x)


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
        "experts": _runner(
            jax.jit(jax.grad(experts, (0, 1, 2))), xr, w["gate_up"], w["down"]
        ),
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


def _copy_bytes_per_s(repeats: int) -> float:
    """Memory bandwidth: bytes read plus written per second by x + 1 on 256 MB."""
    x = jnp.ones((64 << 20,), jnp.float32)
    t = alternate({"copy": _runner(jax.jit(lambda x: x + 1), x)}, repeats)["copy"]
    return 2 * x.nbytes / t


def _expert_scaling(small, tokens: int, repeats: int):
    """expert_scaling_ratio, and where the 32-expert step's extra time goes: AdamW, the
    expert layers (of which: smaller matmul blocks), and the rest (the scan, the norms).

    The floor is what the 32-expert step would cost on this machine if it paid only the
    4-expert step, the matmul slowdown of its smaller blocks (XLA:CPU's kernels) and the
    least memory traffic its extra weights need: 40 bytes per float32 parameter per step
    (read in the forward and the backward 8, gradient written 4, AdamW reads weight,
    gradient and two moments and writes three 28), at the bandwidth measured here."""
    e32, e4 = (small.replace({"moe.num_experts": n}) for n in (32, 4))
    figures, rows = {}, []
    t = alternate({"e32": _train_step_runner(e32), "e4": _train_step_runner(e4)}, repeats)
    figures["expert_scaling_ratio"] = t["e32"] / t["e4"]
    rows.append(
        ("expert_scaling_ratio", f"{t['e32'] * 1e3:.0f} / {t['e4'] * 1e3:.0f} ms", "<= 1.15")
    )
    opt = alternate({"e32": _optimizer_runner(e32), "e4": _optimizer_runner(e4)}, repeats)
    figures["expert_scaling_ratio_without_optimizer"] = (t["e32"] - opt["e32"]) / (
        t["e4"] - opt["e4"]
    )
    figures["optimizer_ms_e32_e4"] = [opt["e32"] * 1e3, opt["e4"] * 1e3]
    layer = alternate({"e32": _layer_runner(e32, tokens), "e4": _layer_runner(e4, tokens)}, repeats)
    n_rows, n_moe = tokens * small.moe.top_k, small.layer_plan().kinds().count("moe")
    block = {c: min(small.moe.block_size, n_rows // c.moe.num_experts) for c in (e32, e4)}
    mm = alternate({c: _expert_matmul_runner(small, n_rows, block[c]) for c in (e32, e4)}, repeats)
    extra_params = flops.param_counts(e32).total - flops.param_counts(e4).total
    bandwidth = _copy_bytes_per_s(repeats)
    traffic = 40 * extra_params / bandwidth
    parts = {
        "optimizer": opt["e32"] - opt["e4"],
        "expert_layers": n_moe * (layer["e32"] - layer["e4"]),
        "matmul_blocks": n_moe * (mm[e32] - mm[e4]),  # part of expert_layers
    }
    parts["rest"] = t["e32"] - t["e4"] - parts["optimizer"] - parts["expert_layers"]
    figures["expert_scaling_gap_ms"] = {k: v * 1e3 for k, v in parts.items()}
    figures["expert_scaling_floor"] = (t["e4"] + parts["matmul_blocks"] + traffic) / t["e4"]
    figures["expert_scaling_blocks_rows"] = [block[e32], block[e4]]
    rows.append(
        (
            "  without the optimizer",
            f"{figures['expert_scaling_ratio_without_optimizer']:.3f}  "
            f"AdamW alone {opt['e32'] * 1e3:.0f} / {opt['e4'] * 1e3:.0f} ms",
            "report",
        )
    )
    rows.append(
        (
            "  extra time, by part",
            f"AdamW {parts['optimizer'] * 1e3:.0f}, expert layers "
            f"{parts['expert_layers'] * 1e3:.0f} (blocks of {block[e32]} not {block[e4]} rows "
            f"{parts['matmul_blocks'] * 1e3:.0f}), rest {parts['rest'] * 1e3:.0f} ms",
            "report",
        )
    )
    rows.append(
        (
            "  floor on this machine",
            f"{figures['expert_scaling_floor']:.3f}  (4-expert step + smaller blocks "
            f"+ {40 * extra_params / 1e9:.2f} GB at {bandwidth / 1e9:.0f} GB/s)",
            "report",
        )
    )
    # What scales with total parameters (AdamW, weight and gradient traffic) is paid once
    # per step; 4x the tokens per step shows how much of the ratio it is.
    big = {"train.batch_size": 4 * small.train.batch_size}
    t64 = alternate(
        {"e32": _train_step_runner(e32.replace(big)), "e4": _train_step_runner(e4.replace(big))},
        max(3, repeats // 2),
    )
    figures["expert_scaling_ratio_4x_tokens"] = t64["e32"] / t64["e4"]
    rows.append(
        (
            "  at 4x the tokens/step",
            f"{figures['expert_scaling_ratio_4x_tokens']:.3f}  "
            f"{t64['e32'] * 1e3:.0f} / {t64['e4'] * 1e3:.0f} ms",
            "report",
        )
    )
    return figures, rows


def alternate(runners: dict, repeats: int) -> dict[str, float]:
    """Median seconds per call of each runner, calling them in turn `repeats` times."""
    times = {k: [] for k in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            times[name].append(run())
    return {k: statistics.median(v) for k, v in times.items()}


def _decode_tokens_per_s(workdir_cfg, batch: int, new_tokens: int = 64) -> float:
    lm = nnx.merge(*initialize.init_params(workdir_cfg, sharding.make_mesh(workdir_cfg.mesh), 0))
    prompt = jnp.ones((batch, 16), jnp.int32)
    key = jax.random.key(0)
    jax.block_until_ready(evaluate.sample(lm, prompt, new_tokens, 0.8, 0, key))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(evaluate.sample(lm, prompt, new_tokens, 0.8, 0, key))
        times.append(time.perf_counter() - t0)
    return batch * new_tokens / statistics.median(times)


def _peer_figures(ours_cfg, repeats: int) -> dict:
    """Our train tokens/s against transformers' Mixtral on the same model and batch, the
    peer with its fastest CPU expert kernel of the ones that fit in memory."""
    tokens = ours_cfg.train.batch_size * ours_cfg.train.seq_len
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
    t = alternate(runners, repeats)
    best = min(("eager", "grouped_mm"), key=t.get)
    step_flops = flops.model_flops_per_token(ours_cfg) * tokens
    return {
        "matmul_gflops_xla_torch": {
            name: [
                2 * np.prod(shape) * calls / t[f"{side}_{name}"] / 1e9 for side in ("xla", "torch")
            ]
            for name, shape in shapes.items()
        },
        "model_gflops_ours_hf": [step_flops / t["ours"] / 1e9, step_flops / t[best] / 1e9],
        "ours_tokens_per_s": tokens / t["ours"],
        "hf_tokens_per_s": tokens / t[best],
        "hf_tokens_per_s_eager": tokens / t["eager"],
        "hf_tokens_per_s_grouped_mm": tokens / t["grouped_mm"],
        "hf_experts_implementation": best,
        "hf_mixtral_speedup": t[best] / t["ours"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip-peers", action="store_true")
    args = ap.parse_args(argv)
    heap_kept = host_heap.keep_freed_heap()  # as `sparsemodel train` does, before JAX starts
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    peer_missing = None if args.skip_peers else peer_mixtral.missing_extra()
    if peer_missing:  # said up front; the other figures are measured all the same
        log(peer_missing)
    figures: dict[str, float | str | None] = {}
    rows: list[tuple[str, str, str]] = []

    small, dense = config.load("small"), config.load("small-dense")
    log("1/7 train step: small (MoE) vs small-dense ...")
    t = alternate(
        {"moe": _train_step_runner(small), "dense": _train_step_runner(dense)}, args.repeats
    )
    figures["moe_dense_step_ratio"] = t["moe"] / t["dense"]
    rows.append(
        ("moe_dense_step_ratio", f"{t['moe'] * 1e3:.0f} / {t['dense'] * 1e3:.0f} ms", "<= 1.20")
    )

    log("2/7 one FFN layer fwd+bwd: MoE (8 experts, top-2) vs dense of equal active width ...")
    tokens = small.train.batch_size * small.train.seq_len
    t = alternate(
        {
            "moe": _layer_runner(small, tokens),
            "dense": _layer_runner(small.replace({"moe.num_experts": 0}), tokens),
        },
        args.repeats,
    )
    figures["moe_dense_layer_ratio"] = t["moe"] / t["dense"]
    rows.append(
        ("moe_dense_layer_ratio", f"{t['moe'] * 1e3:.1f} / {t['dense'] * 1e3:.1f} ms", "<= 1.30")
    )

    parts = alternate(_layer_part_runners(small, tokens), args.repeats)
    figures["moe_layer_parts_ms"] = {k: v * 1e3 for k, v in parts.items()}
    rows.append(
        (
            "moe_layer_parts",
            " ".join(f"{k} {v * 1e3:.1f}" for k, v in parts.items()) + " ms",
            "report",
        )
    )

    log("3/7 train step with 32 experts vs 4 experts (top-2, same active parameters) ...")
    scaling_figures, scaling_rows = _expert_scaling(small, tokens, args.repeats)
    figures.update(scaling_figures)
    rows.extend(scaling_rows)

    log("4/7 compiled vs model FLOPs of the small train step ...")
    r = profile(small, steps=1)
    figures["hw_model_flops_ratio"] = r["compiled"]["hw_model_flops_ratio"]
    rows.append(
        ("hw_model_flops_ratio", f"{r['compiled']['flops_per_step']:.3g} FLOP/step", "<= 1.35")
    )

    log("5/7 MFU at d_model 512 against this CPU's measured matmul peak ...")
    wide = {
        "model.d_model": 512,
        "model.n_heads": 8,
        "model.n_kv_heads": 8,
        "model.d_ff": 2048,
        "moe.d_expert": 1024,
        "train.batch_size": 8,
    }
    runners = {
        "dense": _train_step_runner(dense.replace(wide)),
        "moe": _train_step_runner(small.replace(wide)),
    }
    if jax.default_backend() == "cpu":  # measure the peak in turn with the steps: same load
        n = 2048
        a = jnp.ones((n, n), jnp.float32)
        runners["peak"] = _runner(jax.jit(lambda a: a @ a), a)
    t = alternate(runners, max(3, args.repeats // 2))
    if "peak" in t:
        peak, source = 2 * n**3 / t["peak"], "measured: float32 2048^3 matmul, alternating"
    else:
        peak, source = hardware.peak_flops_per_device()
    for name, base in (("dense", dense), ("moe", small)):
        c = base.replace(wide)
        step_flops = flops.model_flops_per_token(c) * c.train.batch_size * c.train.seq_len
        figures[f"mfu_{name}"] = step_flops / t[name] / peak
    rows.append(
        (
            "mfu_dense / mfu_moe",
            f"{figures['mfu_dense']:.1%} / {figures['mfu_moe']:.1%} of {peak / 1e9:.0f} GFLOP/s",
            ">= 50% / >= 40%",
        )
    )

    log("6/7 KV-cache decoding, small, batch 1 and 16 ...")
    figures["decode_tokens_per_s_b1"] = _decode_tokens_per_s(small, 1)
    figures["decode_tokens_per_s_b16"] = _decode_tokens_per_s(small, 16)
    rows.append(
        (
            "decode_tokens_per_s",
            f"{figures['decode_tokens_per_s_b1']:.0f} (b1) / "
            f"{figures['decode_tokens_per_s_b16']:.0f} (b16)",
            "report",
        )
    )

    log("7/7 training tokens/s against Hugging Face transformers' Mixtral (CPU, same config) ...")
    if args.skip_peers or peer_missing:
        figures["hf_mixtral_speedup"] = None
        why = "skipped (--skip-peers)" if args.skip_peers else "not measured: no `hf` extra"
        rows.append(("hf_mixtral_speedup", why, ">= 1.25"))
    else:
        figures.update(_peer_figures(small.replace(peer_mixtral.PEER), max(3, args.repeats // 2)))
        speedup = figures["hf_mixtral_speedup"]
        shown = (
            f"{figures['ours_tokens_per_s']:.0f} / {figures['hf_tokens_per_s']:.0f} tok/s "
            f"(HF {figures['hf_experts_implementation']})"
            if speedup is not None
            else "not measured: torch or transformers failed to import"
        )
        rows.append(("hf_mixtral_speedup", shown, ">= 1.25"))
        if speedup is not None:
            mm, model = figures["matmul_gflops_xla_torch"], figures["model_gflops_ours_hf"]
            rows.append(
                (
                    "  model / matmul GFLOP/s",
                    f"ours {model[0]:.0f}, HF {model[1]:.0f}; matmuls XLA / torch: "
                    + ", ".join(f"{k} {v[0]:.0f} / {v[1]:.0f}" for k, v in mm.items()),
                    "report",
                )
            )

    figures["peak_source"] = source
    figures["host_heap_kept"] = heap_kept
    print(f"{'figure':<24} {'measured':<48} target")
    for name, measured, target in rows:
        value = figures.get(name)
        shown = f"{value:.3f}  " if isinstance(value, float) else ""
        print(f"{name:<24} {shown + measured:<48} {target}")
    print(json.dumps(figures))
    out = Path(__file__).parent / "results" / "bench.json"
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), **figures}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`sparsemodel profile`: what a model holds, what each token costs, measured and accounted.

Sections of the report (one dict, printed as a table or as JSON):
  params    total / unique / embedding / active per token, by component (analytic, and
            checked against the real parameter arrays)
  flops     model FLOPs per token and per step (training and forward-only)
  compiled  FLOPs of the real training step as compiled (loops unrolled so every layer
            and expert block counts; see _count_flops) and their ratio to the model FLOPs
  memory    the compiled step's memory per device; parameter and optimizer bytes per device
  measured  step time (median after warm-up), tokens/s, achieved FLOP/s, peak, MFU
  routing   per MoE layer on a real batch: load per expert, dropped fraction, entropy
With --abstract nothing is allocated or compiled: shapes come from jax.eval_shape and the
mesh is an AbstractMesh, so any size profiles on a laptop.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sparsemodel import data as data_lib
from sparsemodel import flops, hardware, hlo_flops, initialize, kernels, memory, optim, sharding
from sparsemodel.config import Config
from sparsemodel.steps import make_train_step


def profile(
    cfg: Config,
    *,
    param_state=None,
    steps: int = 5,
    trace_dir: str | None = None,
    plot: str | None = None,
    abstract: bool = False,
    count_flops: bool = True,
    workdir: str | None = None,
    log=lambda s: None,
) -> dict:
    """Builds the report. param_state: trained parameters (e.g. from `workdir`, whose
    tokenizer then encodes the routing batch) to use for routing statistics; otherwise
    freshly initialised ones. count_flops=False skips the second, unrolled compilation
    (slow for the block grouped matmul at large sizes) and with it the `compiled` section."""
    report: dict = {"params": flops.param_counts(cfg).as_dict(), "flops": _model_flops(cfg)}
    if abstract:
        mesh = sharding.abstract_mesh(cfg.mesh)
        _, target = initialize.abstract_params(cfg, mesh)
        report["mesh"] = dict(mesh.shape)
        report["params"]["counted_from_shapes"] = initialize.count(target)
        report["memory"] = _abstract_memory(target)
        return report

    mesh = sharding.make_mesh(cfg.mesh)
    memory.check_training_fits(cfg, mesh)
    report["mesh"] = dict(mesh.shape)
    with jax.set_mesh(mesh):
        batch = _real_batch(cfg, mesh, workdir)  # first: bad data stops before any compile
        graphdef, state = initialize.init_params(cfg, mesh, cfg.train.seed)
        if param_state is not None:
            state = param_state
        report["params"]["counted_from_arrays"] = initialize.count(state)
        tx = optim.make_optimizer(cfg.train)
        opt_state = initialize.init_opt_state(tx, state, mesh)
        first_step = (state, opt_state, batch, jnp.int32(1))
        if count_flops:
            log("lowering the training step with loops unrolled, to count its FLOPs ...")
            model_flops = report["flops"]["model_flops_per_step"]
            report["compiled"] = _compiled_flops(cfg, graphdef, tx, first_step, model_flops)

        log("compiling the training step ...")
        step_fn = jax.jit(make_train_step(graphdef, cfg, tx), donate_argnums=(0, 1))
        compiled = step_fn.lower(*first_step).compile()
        report["memory"] = _compiled_memory(compiled, state, opt_state)
        report["routing"] = _routing(cfg, graphdef, state, batch)  # before steps donate state
        if plot and report["routing"]:
            plot_load(report["routing"]["load"], plot, cfg)

        log(f"timing {steps} steps after one warm-up step ...")
        step_s, state, opt_state = _time_steps(compiled, state, opt_state, batch, steps)
        report["measured"] = _measured(report["flops"], step_s, mesh.size)
        if trace_dir:
            log(f"tracing 3 steps into {trace_dir} ...")
            _trace_steps(compiled, state, opt_state, batch, trace_dir)
            report["trace_dir"] = str(trace_dir)
    return report


def _model_flops(cfg: Config) -> dict:
    """The `flops` section: model FLOPs (PaLM convention) per token and per step."""
    tokens_per_step = cfg.train.batch_size * cfg.train.seq_len
    per_token = flops.model_flops_per_token(cfg)
    return {
        "model_flops_per_token": per_token,
        "model_flops_per_step": per_token * tokens_per_step,
        "forward_flops_per_token": per_token / 3,
        "tokens_per_step": tokens_per_step,
    }


def _abstract_memory(target) -> dict:
    """The `memory` section of --abstract, from the parameters' shapes and shardings."""
    param_bytes = sharding.bytes_per_device(target)
    return {
        "params_bytes_per_device": param_bytes,
        # AdamW keeps two float32 moments per parameter, sharded like the parameter.
        "optimizer_bytes_per_device": 2 * param_bytes,
        "gradient_bytes_per_device": param_bytes,
        "note": "activations excluded (they depend on remat and the compiler)",
    }


def _compiled_flops(cfg: Config, graphdef, tx, step_args, model_flops_per_step: float) -> dict:
    """The `compiled` section: FLOPs of the training step lowered with its loops unrolled,
    and their ratio to the model FLOPs."""
    with kernels.counting_flops():
        # A jit of its own: jax caches a function's trace, and reusing the timed step's jit
        # here would hand the counting form (unrolled, XLA attention) to the timed run.
        count_fn = jax.jit(make_train_step(graphdef, cfg, tx))
        counted = _count_flops(count_fn.lower(*step_args))
    ratio = counted["flops_per_step"] / model_flops_per_step
    return {**counted, "hw_model_flops_ratio": ratio, "verdict": _verdict(cfg, ratio)}


def _compiled_memory(compiled, state, opt_state) -> dict:
    """The `memory` section: the compiled step's buffers and the state's bytes per device."""
    mem = compiled.memory_analysis()
    return {
        "params_bytes_per_device": sharding.bytes_per_device(state),
        "optimizer_bytes_per_device": sharding.bytes_per_device(opt_state),
        "argument_bytes": getattr(mem, "argument_size_in_bytes", None),
        "output_bytes": getattr(mem, "output_size_in_bytes", None),
        "temp_bytes": getattr(mem, "temp_size_in_bytes", None),
        "generated_code_bytes": getattr(mem, "generated_code_size_in_bytes", None),
    }


def _time_steps(compiled, state, opt_state, batch, steps: int):
    """(median seconds of `steps` steps after one warm-up step, state, opt_state after them)."""
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        state, opt_state, m = compiled(state, opt_state, batch, jnp.int32(i + 1))
        jax.block_until_ready(m)
        if i:  # the first call also pays for transfers and allocation
            times.append(time.perf_counter() - t0)
    return statistics.median(times), state, opt_state


def _measured(model_flops: dict, step_s: float, n_devices: int) -> dict:
    """The `measured` section: throughput and MFU of a step of step_s seconds."""
    peak, peak_source = hardware.peak_flops_per_device()
    achieved = model_flops["model_flops_per_step"] / step_s
    return {
        "step_time_s": step_s,
        "tokens_per_s": model_flops["tokens_per_step"] / step_s,
        "model_flops_per_s": achieved,
        "peak_flops_per_s": peak * n_devices,
        "peak_source": f"{peak_source} x {n_devices} device(s)",
        "mfu": achieved / (peak * n_devices),
    }


def _trace_steps(compiled, state, opt_state, batch, trace_dir: str) -> None:
    """A jax.profiler trace of 3 steps in trace_dir."""
    with jax.profiler.trace(trace_dir):
        for i in range(3):
            state, opt_state, m = compiled(state, opt_state, batch, jnp.int32(i + 1))
            jax.block_until_ready(m)


def _count_flops(lowered) -> dict:
    """FLOPs of the compiled step: XLA's cost analysis on CPU, its matmuls elsewhere.

    XLA:CPU's cost analysis counts everything, elementwise work included. XLA:GPU's leaves
    out the matmuls it hands to cuBLAS, so off CPU the count is the compiled program's
    matmuls, read from its HLO (`hlo_flops`). Both are reported where both exist; custom
    calls that neither can count are listed.
    """
    compiled = lowered.compile()
    matmuls = hlo_flops.count(compiled.as_text())
    out = {
        "matmul_flops_per_step": matmuls.flops,
        "uncounted_custom_calls": matmuls.uncounted,
    }
    cost = compiled.cost_analysis() if jax.default_backend() == "cpu" else None
    cost = cost[0] if isinstance(cost, list) else cost
    if cost and "flops" in cost:
        return out | {"flops_per_step": float(cost["flops"]), "source": "XLA's cost analysis"}
    return out | {
        "flops_per_step": matmuls.flops,
        "source": "the matmuls (dots and cuBLAS calls) in the compiled program",
    }


def _verdict(cfg: Config, ratio: float) -> str:
    e = cfg.moe
    if not cfg.is_moe:
        return "dense model: compiled FLOPs include the masked half of causal attention"
    every_expert = e.num_experts / max(e.top_k, 1)
    if ratio > 0.6 * every_expert and every_expert > 2:
        return (
            f"ratio near E/k = {every_expert:.1f}: some path computes every expert on "
            "every token (a dense fallback, e.g. ragged_dot on CPU)"
        )
    if ratio > 1.35:
        return "more compiled work than the model needs: check capacity_factor and padding"
    return (
        "the compiled step does about the model's work: no path computes every expert "
        "(dropless counts its padding blocks, which are skipped at run time)"
    )


def _real_batch(cfg: Config, mesh, workdir: str | None):
    """One global batch of real validation text (falls back to train if too short), in the
    workdir's tokenizer's ids when there is one (bytes otherwise)."""
    t = cfg.train
    if workdir is not None:
        corpus = data_lib.load_tokenized_corpus(cfg, Path(workdir), log=lambda s: None)
    else:
        corpus = data_lib.load_corpus(cfg.data.source, cfg.data.val_fraction)
    tokens = (
        corpus.val
        if data_lib.num_windows(corpus.val, t.seq_len) >= t.batch_size
        else (corpus.train)
    )
    data_lib.check_length(tokens, t.seq_len, t.batch_size, "profile", cfg.data.source)
    batch = next(
        data_lib.eval_batches(
            tokens, t.seq_len, t.batch_size, 1, jax.process_index(), jax.process_count()
        )
    )
    data_lib.check_token_ids(cfg.data.source, cfg.model.vocab_size, batch)
    return sharding.put_batch(batch, mesh)


def _routing(cfg: Config, graphdef, state, batch) -> dict:
    if not cfg.is_moe:
        return {}
    from flax import nnx

    stats = jax.jit(lambda s, b: nnx.merge(graphdef, s)(b[:, :-1])[1])(state, batch)
    stats = jax.device_get(stats)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    return {
        "load": np.asarray(stats.load).tolist(),  # [moe layers, E], fractions
        "tokens_per_expert": (np.asarray(stats.load) * tokens * cfg.moe.top_k).tolist(),
        "dropped": np.asarray(stats.dropped).tolist(),
        "entropy": np.asarray(stats.entropy).tolist(),
        "max_load": np.asarray(stats.max_load).tolist(),
        "lb_loss": np.asarray(stats.lb_loss).tolist(),
    }


def plot_load(load, path: str, cfg: Config) -> None:
    """Heat map of the fraction of assignments per expert, one row per MoE layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = np.asarray(load)
    fig, ax = plt.subplots(figsize=(max(4, 0.4 * load.shape[1] + 2), 0.5 * load.shape[0] + 2))
    im = ax.imshow(load * load.shape[1], cmap="viridis", aspect="auto")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title(
        f"expert load x E (1 = balanced), {cfg.moe.num_experts} experts, top-{cfg.moe.top_k}"
    )
    fig.colorbar(im, ax=ax, label="load x E")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------- printing


def _si(x: float | None, unit: str = "") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    for div, prefix in ((1e18, "E"), (1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}".strip()


def _mib(x) -> str:
    return "n/a" if x is None else f"{x / 2**20:,.1f} MiB"


def format_report(r: dict) -> str:
    """The report as the table `sparsemodel profile` prints."""
    lines = ["mesh: " + " x ".join(f"{k}={v}" for k, v in r["mesh"].items())]
    lines += _params_lines(r["params"]) + _flops_lines(r["flops"])
    if "compiled" in r:
        lines += _compiled_lines(r["compiled"])
    lines += _memory_lines(r.get("memory", {}))
    if "measured" in r:
        lines += _measured_lines(r["measured"])
    if r.get("routing"):
        lines += _routing_lines(r["routing"])
    if "trace_dir" in r:
        lines += ["", f"trace: {r['trace_dir']} (tensorboard --logdir, or ui.perfetto.dev)"]
    return "\n".join(lines)


def _params_lines(p: dict) -> list[str]:
    lines = [
        "",
        "parameters",
        f"  total              {p['total']:>18,}",
        f"  unique (stored)    {p['unique']:>18,}",
        f"  embedding          {p['embedding']:>18,}",
        f"  active per token   {p['active_per_token']:>18,}",
    ]
    for k in ("counted_from_arrays", "counted_from_shapes"):
        if k in p:
            lines.append(f"  {k.replace('_', ' '):<18} {p[k]:>18,}")
    lines.append("  by component (unique):")
    for k, v in p["breakdown"].items():
        lines.append(f"    {k:<16} {v:>18,}")
    return lines


def _flops_lines(f: dict) -> list[str]:
    return [
        "",
        "FLOPs (model, PaLM convention)",
        f"  per token, train   {_si(f['model_flops_per_token'], 'FLOP')}",
        f"  per token, forward {_si(f['forward_flops_per_token'], 'FLOP')}",
        f"  per step, train    {_si(f['model_flops_per_step'], 'FLOP')} "
        f"({f['tokens_per_step']:,} tokens)",
    ]


def _compiled_lines(c: dict) -> list[str]:
    lines = [
        "",
        f"compiled (the real training step, counted by {c['source']})",
        f"  FLOPs per step     {_si(c['flops_per_step'], 'FLOP')}",
        f"  of them matmuls    {_si(c['matmul_flops_per_step'], 'FLOP')}",
        f"  hw / model FLOPs   {c['hw_model_flops_ratio']:.3f}",
        f"  {c['verdict']}",
    ]
    if c["uncounted_custom_calls"]:
        lines.append(f"  not counted        {c['uncounted_custom_calls']}")
    return lines


def _memory_lines(m: dict) -> list[str]:
    lines = [
        "",
        "memory per device",
        f"  parameters         {_mib(m.get('params_bytes_per_device'))}",
        f"  optimizer state    {_mib(m.get('optimizer_bytes_per_device'))}",
    ]
    for k in ("gradient_bytes_per_device", "argument_bytes", "output_bytes", "temp_bytes"):
        if m.get(k) is not None:
            name = k.replace("_bytes", "").replace("_per_device", "").replace("_", " ")
            lines.append(f"  {name:<18} {_mib(m[k])}")
    if "note" in m:
        lines.append(f"  ({m['note']})")
    return lines


def _measured_lines(s: dict) -> list[str]:
    return [
        "",
        "measured",
        f"  step time          {s['step_time_s'] * 1e3:.1f} ms (median)",
        f"  tokens/s           {s['tokens_per_s']:,.0f}",
        f"  model FLOP/s       {_si(s['model_flops_per_s'], 'FLOP/s')}",
        f"  peak FLOP/s        {_si(s['peak_flops_per_s'], 'FLOP/s')} ({s['peak_source']})",
        f"  MFU                {s['mfu']:.1%}",
    ]


def _routing_lines(q: dict) -> list[str]:
    lines = [
        "",
        "routing on a real batch (per MoE layer)",
        "  layer  max load  dropped  entropy  load per expert (x E)",
    ]
    for i, load in enumerate(q["load"]):
        loads = " ".join(f"{x * len(load):.2f}" for x in load)
        lines.append(
            f"  {i:>5}  {q['max_load'][i]:>8.2f}  {q['dropped'][i]:>7.3f}  "
            f"{q['entropy'][i]:>7.3f}  {loads}"
        )
    return lines

"""Worker for tests that need several (fake CPU) devices or processes.

JAX fixes its device count at start-up, so these run in a subprocess:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/multidevice.py CMD JSON

and print one JSON line (prefixed RESULT) that the test reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemodel import config, evaluate, hardware, initialize, sharding, train

TINY = {"train.steps": 5, "train.eval_every": 1000, "train.checkpoint_every": 1000}


def metric(workdir, name: str = "loss") -> list[float]:
    lines = (Path(workdir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(x)[name] for x in lines]


def train_meshes(workdir: str, meshes: dict[str, dict]) -> dict:
    """Trains tiny on each mesh (and routing settings); returns losses, fractions dropped,
    the router bias after each step (moe.bias_rate > 0, else None) and what each device
    holds of the experts."""
    out = {}
    for name, mesh in meshes.items():
        cfg = config.load("tiny", {**TINY, **mesh})
        train.run(cfg, Path(workdir) / name, log=lambda s: None)
        run_dir = Path(workdir) / name
        out[name] = {"losses": metric(run_dir), "dropped": metric(run_dir, "dropped")}
        out[name]["router_bias"] = metric(run_dir, "router_bias") if cfg.moe.bias_rate else None
        # What each device really holds of the born-sharded expert weights.
        mesh_ = sharding.make_mesh(cfg.mesh)
        _, p = initialize.init_params(cfg, mesh_, 0)
        experts = p["pool"] if cfg.moe.pool == "global" else p["units"]["blocks"][0]["ffn"]
        w_gate_up = experts["w_gate_up"][...]  # [E, D, 2, F], per layer [layers, E, D, 2, F]
        axis = w_gate_up.ndim - 4  # the experts'
        held = {}
        for shard in w_gate_up.addressable_shards:
            ids = range(w_gate_up.shape[axis])[shard.index[axis]]
            held.setdefault(str(shard.device.id), set()).update(ids)
        out[name]["experts_held"] = {d: sorted(e) for d, e in held.items()}
        out[name]["num_experts"] = w_gate_up.shape[axis]
    return out


def run_train(workdir: str, overrides: dict, stop_after: int | None = None) -> dict:
    cfg = config.load("tiny", {**TINY, **overrides})
    train.run(cfg, workdir, stop_after=stop_after, log=lambda s: None)
    return {"losses": metric(workdir)}


def decode(mesh: dict, batch: int = 8, seq: int = 10, prompt: int = 4) -> dict:
    """Tiny with capacity per sequence on a mesh: the full forward's logits against prefill
    then one token at a time with the cache; returns their largest difference and the
    fraction of assignments the full forward dropped."""
    cfg = config.load("tiny", {"moe.dispatch": "capacity", "moe.capacity_factor": 0.25, **mesh})
    mesh_ = sharding.make_mesh(cfg.mesh)
    graphdef, state = initialize.init_params(cfg, mesh_, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, seq)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(seq), (batch, seq))
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t))
    step = jax.jit(lambda s, t, p, c: nnx.merge(graphdef, s).decode(t, p, c))
    with jax.set_mesh(mesh_):
        full, stats = forward(state, tokens)
        cache = nnx.merge(graphdef, state).init_cache(batch, seq)
        logits, cache = step(state, tokens[:, :prompt], positions[:, :prompt], cache)
        pieces = [logits]
        for t in range(prompt, seq):
            logits, cache = step(state, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
            pieces.append(logits)
    cached = np.concatenate([np.asarray(p) for p in pieces], axis=1)
    return {
        "max_diff": float(np.abs(cached - np.asarray(full)).max()),
        "dropped": float(np.asarray(stats.dropped).min()),
    }


def forward_on_mesh(overrides: dict, mesh: dict, batch: int = 4, seq: int = 12) -> dict:
    """Tiny (with overrides) born sharded on a mesh: the largest difference between its
    logits there and those of the same parameters on one device without a mesh, the
    logits' scale, and the PartitionSpec of the first layer's q_norm scale."""
    cfg = config.load("tiny", {**overrides, **mesh})
    mesh_ = sharding.make_mesh(cfg.mesh)
    graphdef, state = initialize.init_params(cfg, mesh_, 0)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (batch, seq)), jnp.int32)
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    with jax.set_mesh(mesh_):
        sharded = np.asarray(forward(state, tokens))
    single = np.asarray(forward(jax.device_get(state), tokens))
    q_norm = state["units"]["blocks"][0]["attn"]["q_norm"]["scale"][...]
    return {
        "max_diff": float(np.abs(sharded - single).max()),
        "scale": float(np.abs(single).max()),
        "q_norm_spec": str(q_norm.sharding.spec),
    }


def cpu_peak(mesh: dict) -> dict:
    """The CPU's peak FLOP/s measured under a mesh context (as `train` measures it for MFU),
    and once more on one device outside any mesh."""
    mesh_ = sharding.make_mesh(config.load("tiny", mesh).mesh)
    with jax.set_mesh(mesh_):
        per_device, source = hardware.peak_flops_per_device()
    alone = hardware.measured_matmul_flops.__wrapped__()
    return {"per_device": per_device, "source": source, "alone": alone}


def run_eval(workdir: str, step: int | None = None) -> dict:
    r = evaluate.restore(workdir, step)
    res = evaluate.evaluate(r, max_tokens=8192)
    leaves = jax.tree.leaves(r.params)
    return {
        "loss": res.loss,
        "tokens": res.tokens,
        "devices": jax.device_count(),
        "param_sum": float(sum(np.asarray(x, np.float64).sum() for x in leaves)),
    }


if __name__ == "__main__":
    command, args = sys.argv[1], json.loads(sys.argv[2])
    commands = {
        "train_meshes": train_meshes,
        "train": run_train,
        "eval": run_eval,
        "decode": decode,
        "forward_on_mesh": forward_on_mesh,
        "cpu_peak": cpu_peak,
    }
    result = commands[command](**args)
    print("RESULT " + json.dumps(result))

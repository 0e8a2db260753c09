"""Will it fit? A lower bound on what a training step holds, checked before compiling.

Values that cannot fit (`train.seq_len=100000`, `model.vocab_size=1000000000`) would
otherwise compile for minutes and die of OOM with a traceback. The estimate counts only
what the step cannot avoid holding, so it refuses nothing that could run:
  state        parameters, gradients and AdamW's two moments, per device (as sharded)
  logits       float32 logits and their gradient for one micro-batch
  attention    one layer's [B, H, S, S] float32 scores (absent where attention is fused)
  residuals    the residual stream each layer saves for the backward pass
Available: the host's available memory on CPU (all local devices share it), the device's
own limit on accelerators.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp

from sparsemodel import sharding
from sparsemodel.config import Config, ConfigError
from sparsemodel.params import abstract_params


def host_available_bytes() -> int | None:
    """MemAvailable (Linux), lowered to the cgroup's limit left when one is set."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
        kib = next(
            int(ln.split()[1]) for ln in meminfo.splitlines() if ln.startswith("MemAvailable")
        )
    except (OSError, StopIteration, ValueError):
        return None
    available = kib * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max":
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def available_bytes() -> tuple[int | None, str]:
    """(bytes the local devices can hold, where the number comes from)."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        return host_available_bytes(), "available on this host"
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    total = None if limit is None else limit * jax.local_device_count()
    return total, f"on the {jax.local_device_count()} local {device.device_kind} device(s)"


def training_parts(cfg: Config, mesh, state_bytes: int) -> dict[str, tuple[int, str]]:
    """{part: (bytes per device, the keys that drive it)} of one training step."""
    m, t = cfg.model, cfg.train
    shards = sharding.batch_divisor(mesh)
    tokens = max(1, t.batch_size // t.grad_accum // shards) * t.seq_len  # per device
    act = jnp.dtype(t.dtype).itemsize
    vocab = m.vocab_size // math.gcd(m.vocab_size, mesh.shape["tensor"])
    fused = jax.default_backend() == "gpu" and t.dtype == "bfloat16"
    heads = max(1, m.n_heads // mesh.shape["tensor"])
    seqs = max(1, t.batch_size // t.grad_accum // shards)
    return {
        "parameters, gradients and optimizer state": (state_bytes, "model.*, moe.*"),
        "logits": (2 * 4 * tokens * vocab, "model.vocab_size x train.batch_size x train.seq_len"),
        "attention scores": (
            0 if fused else 4 * seqs * heads * t.seq_len**2,
            "train.batch_size x train.seq_len^2 x model.n_heads",
        ),
        "residual stream": (
            m.n_layers * tokens * m.d_model * act,
            "model.n_layers x model.d_model x train.batch_size x train.seq_len",
        ),
    }


def check_training_fits(cfg: Config, mesh) -> None:
    """ConfigError (one line, with the estimate) when a training step cannot fit in memory."""
    available, where = available_bytes()
    if available is None:
        return
    _, target = abstract_params(cfg, mesh)
    # Parameters, their gradients and AdamW's two moments, all sharded alike.
    parts = training_parts(cfg, mesh, 4 * sharding.bytes_per_device(target))
    per_device = sum(b for b, _ in parts.values())
    local = jax.local_device_count()
    needed = per_device * local
    if needed <= available:
        return
    part, (size, keys) = max(parts.items(), key=lambda kv: kv[1][0])
    raise ConfigError(
        f"{keys}: a training step needs at least {_gib(needed)} ({part} {_gib(size * local)}), "
        f"more than the {_gib(available)} {where}"
    )


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"

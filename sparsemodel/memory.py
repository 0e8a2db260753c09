"""Will it fit? A lower bound on what a training step holds, checked before compiling.

Values that cannot fit (`train.seq_len=100000`, `model.vocab_size=1000000000`) would
otherwise compile for minutes and die of OOM with a traceback. The estimate counts only
what the step cannot avoid holding, so it refuses nothing that could run:
  state        parameters, gradients and AdamW's two moments, per device (as sharded)
  logits       float32 logits and their gradient for one micro-batch
  attention    one layer's [B, H, S, S] float32 scores (absent where attention is fused)
  residuals    the residual stream each layer saves for the backward pass
Available: the host's available memory on CPU (all local devices share it), the device's
free memory on accelerators (hardware.device_memory_available).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from sparsemodel import hardware, sharding
from sparsemodel.config import Config, ConfigError
from sparsemodel.initialize import abstract_params


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
    available = hardware.device_memory_available()
    if available is None:
        return
    free, what = available
    _, target = abstract_params(cfg, mesh)
    # Parameters, their gradients and AdamW's two moments, all sharded alike.
    moments = 2 * jnp.dtype(cfg.train.moment_dtype).itemsize / 4
    parts = training_parts(cfg, mesh, int((2 + moments) * sharding.bytes_per_device(target)))
    # CPU devices share the host's memory; an accelerator's is its own.
    sharing = jax.local_device_count() if jax.devices()[0].platform == "cpu" else 1
    needed = sharing * sum(b for b, _ in parts.values())
    if needed <= free:
        return
    part, (size, keys) = max(parts.items(), key=lambda kv: kv[1][0])
    raise ConfigError(
        f"{keys}: a training step needs at least {hardware.format_bytes(needed)} ({part} "
        f"{hardware.format_bytes(sharing * size)}), more than the "
        f"{hardware.format_bytes(free)} of {what}"
    )

"""Peak FLOP/s of the device, for MFU: a table for accelerators, a measurement on CPU."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp

# Dense bf16 peak per chip from vendor data sheets (no sparsity), by device_kind substring.
# The first match wins, so more specific names come first.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("TPU v6", 918e12),  # Trillium / v6e
    ("TPU v5 lite", 197e12),  # v5e
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),  # v5p
    ("TPU v4", 275e12),
)


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    device = jax.devices()[0]
    kind = getattr(device, "device_kind", "") or ""
    for name, peak in PEAK_FLOPS:
        if name.lower() in kind.lower():
            return peak, f"table: {kind} dense bf16"
    if device.platform == "cpu":
        return measured_matmul_flops(), "measured: float32 2048^3 matmul on this CPU"
    return float("nan"), f"unknown device kind {kind!r}"


def measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matmul here: the practical peak of this CPU right now."""
    a = jnp.ones((n, n), jnp.float32)
    b = jnp.ones((n, n), jnp.float32)
    mm = jax.jit(lambda a, b: a @ b)
    mm(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)

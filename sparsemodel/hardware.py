"""What the machine offers: peak FLOP/s of the device (a table for accelerators, a
measurement on CPU, for MFU) and the memory available to what a command is about to hold."""

from __future__ import annotations

import functools
import re
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

# Dense bf16 peak per chip from vendor data sheets (no sparsity), by device_kind words.
PEAK_FLOPS = {
    "B200": 2250e12,
    "H200 NVL": 835e12,
    "H200": 989e12,  # SXM
    "GH200": 989e12,  # its GPU is an H100-class Hopper
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM, e.g. "NVIDIA H100 80GB HBM3"
    "A100": 312e12,  # SXM and PCIe, e.g. "NVIDIA A100-SXM4-80GB"
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "TPU v6 lite": 918e12,  # Trillium / v6e
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p
    "TPU v4": 275e12,
}


def _words(text: str) -> tuple[str, ...]:
    """'NVIDIA A100-SXM4-80GB' -> ('nvidia', 'a100', 'sxm4', '80gb')."""
    return tuple(re.findall(r"[a-z0-9]+", text.lower()))


def _names_most_specific_first() -> list[str]:
    """Table names by word count, then length, descending: 'TPU v5 lite' is tried before
    'TPU v5', 'H100 PCIe' before 'H100', whatever order the table lists them in."""
    return sorted(PEAK_FLOPS, key=lambda name: (len(_words(name)), len(name)), reverse=True)


def table_peak_flops(kind: str) -> tuple[float, str] | None:
    """(dense bf16 peak, table name) of the first name whose words appear in a row in
    `kind` (so 'L4' does not match 'NVIDIA L40S'), or None."""
    kind_words = _words(kind)
    for name in _names_most_specific_first():
        words = _words(name)
        if any(kind_words[i : i + len(words)] == words for i in range(len(kind_words))):
            return PEAK_FLOPS[name], name
    return None


def peak_flops(kind: str, platform: str) -> tuple[float, str]:
    """(peak FLOP/s of one device of this kind, where the number comes from)."""
    found = table_peak_flops(kind)
    if found is not None:
        return found[0], f"table: {kind} dense bf16"
    if platform == "cpu":
        # Fake CPU devices (xla_force_host_platform_device_count) share the host's cores.
        shared_by = jax.local_device_count()
        source = "measured: float32 2048^3 matmul on this CPU"
        if shared_by > 1:
            source += f", shared by its {shared_by} devices"
        return measured_matmul_flops() / shared_by, source
    return float("nan"), f"unknown device kind {kind!r}"


def peak_flops_per_device() -> tuple[float, str]:
    """(peak FLOP/s of one device, where the number comes from)."""
    device = jax.devices()[0]
    return peak_flops(getattr(device, "device_kind", "") or "", device.platform)


@functools.cache
def measured_matmul_flops(n: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large float32 matmul on one device: the practical peak of this CPU
    (measured once per process)."""
    # On a one-device mesh: under the caller's mesh the matmul would run on all its devices
    # at once (on fake CPU devices, 8 copies on the same cores).
    with jax.set_mesh(jax.sharding.Mesh(jax.local_devices()[:1], ("one",))):
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


# ------------------------------------------------------------------------------ memory


def host_memory_available() -> int | None:
    """Bytes of RAM the kernel can hand out without swapping (MemAvailable), lowered to
    what a cgroup's memory limit leaves; None where there is no /proc/meminfo."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    found = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    if not found:
        return None
    available = int(found.group(1)) * 1024
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available


def device_memory_available() -> tuple[int, str] | None:
    """(bytes free on the first device, what they are): the allocator's limit less what it
    holds on an accelerator, MemAvailable on CPU; None when neither is known."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
        return free, "free device memory"
    host = host_memory_available()
    return None if host is None else (host, "memory available")


def format_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    units = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")
    i = 0
    while abs(n) >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.1f} {units[i]}"

"""Test-session settings: a persistent XLA compilation cache shared with subprocesses, and
XLA:CPU flags that compile faster.

Many tests compile the same tiny programs (in this process and in the multi-device
subprocesses they start); the cache turns every compilation after the first into a load.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_DIR = Path(__file__).parent.parent / ".pytest_cache" / "jax-compilation-cache"
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE_DIR))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Commands started by tests compile far more than they run, and XLA's compiler threads
# share one glibc arena under host_heap (slower compiles): tests that are not about the
# heap run without it; tests/test_host_heap.py runs `train` with it.
os.environ.setdefault("SPARSEMODEL_KEEP_FREED_HEAP", "0")
# The tests compile far more than they run (tiny models), and XLA:CPU's LLVM backend
# compiles faster at -O0. The HLO passes still run, so every FLOP count and HLO check sees
# the same program. Subprocesses inherit it (test_sharding.env_with keeps it).
FAST_COMPILE = "--xla_backend_optimization_level=0"
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE}".strip()

import jax  # noqa: E402  (after the environment it reads)

jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)


def pytest_collection_modifyitems(config, items):
    """Tests marked `cpu_flop_count` check XLA's FLOP count, which only XLA:CPU gives for
    our programs (XLA:GPU's leaves out its cuBLAS/cuDNN calls): they skip elsewhere."""
    import pytest

    if jax.default_backend() == "cpu":
        return
    skip = pytest.mark.skip(reason=f"XLA's FLOP count is incomplete on {jax.default_backend()}")
    for item in items:
        if "cpu_flop_count" in item.keywords:
            item.add_marker(skip)

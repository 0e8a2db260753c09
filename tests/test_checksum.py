"""Checksums: numpy's (export, import-hf) equal JAX's (training) bit for bit."""

from __future__ import annotations

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sparsemodel import checksum


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16, np.int32])
def test_numpy_checksum_in_slices_equals_jax(monkeypatch, tmp_path, dtype):
    """Read a slice at a time (here 1,000 words, so the last slice is partial) from a
    memory-mapped array, as import-hf does, the checksum is the whole array's in JAX."""
    monkeypatch.setattr(checksum, "SLICE", 1000)
    values = np.random.default_rng(0).normal(0, 100, (3, 1523)).astype(dtype)
    mapped = np.lib.format.open_memmap(tmp_path / "a.npy", "w+", dtype, values.shape)
    mapped[...] = values
    want = np.asarray(checksum.array_checksum(jnp.asarray(values)))
    np.testing.assert_array_equal(checksum.numpy_checksum(mapped), want)
    changed = values.copy()
    changed[2, 1500] += 1  # in the last, partial slice
    assert not np.array_equal(checksum.numpy_checksum(changed), want)


def test_numpy_checksum_memory_is_a_few_slices_not_the_array(monkeypatch, tmp_path):
    """import-hf checksums memory-mapped parameters larger than memory."""
    import tracemalloc

    monkeypatch.setattr(checksum, "SLICE", 1000)
    mapped = np.lib.format.open_memmap(tmp_path / "a.npy", "w+", np.float32, (200, 1000))
    mapped[...] = 1.5  # 800 KB on disk
    tracemalloc.start()
    checksum.numpy_checksum(mapped)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 64_000, peak  # a slice is 1,000 words: 4 KB, 8 KB as uint64

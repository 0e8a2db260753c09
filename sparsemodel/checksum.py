"""Checksums of arrays, the same on any mesh and in numpy: a checkpoint's integrity record.

Each array's bits, read as unsigned integers w[i] in row-major order, give two sums mod 2^32:
    a = sum_i (2i + 1) * w[i]            b = sum_i m(i) * (w[i] xor (w[i] >> 16))
with odd multipliers, so any change of a single word changes `a` (an odd number is
invertible mod 2^32), and two independent sums make a coincidence of both ~2^-64.
Integer sums are exact whatever the order, so a sharded array gives the same checksum on
every mesh, and numpy (export reads one array at a time) gives the same one as JAX.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_GOLDEN = 0x9E3779B1  # odd: Knuth's multiplicative hash constant


def _unsigned(dtype) -> np.dtype:
    return np.dtype(f"uint{np.dtype(dtype).itemsize * 8}")


def array_checksum(x: jax.Array) -> jax.Array:
    """uint32 [2] checksum of one array (traceable; see the module docstring)."""
    w = jax.lax.bitcast_convert_type(x, _unsigned(x.dtype)).reshape(-1).astype(jnp.uint32)
    i = jnp.arange(w.shape[0], dtype=jnp.uint32)
    a = jnp.sum((2 * i + 1) * w, dtype=jnp.uint32)
    b = jnp.sum((i * jnp.uint32(_GOLDEN) | 1) * (w ^ (w >> 16)), dtype=jnp.uint32)
    return jnp.stack([a, b])


# Words per slice of numpy_checksum: its temporaries are a few times a slice, not the
# array, so import-hf checksums memory-mapped parameters larger than memory.
SLICE = 1 << 22


def numpy_checksum(x: np.ndarray) -> np.ndarray:
    """array_checksum of a host array, computed in numpy a slice at a time (uint32
    arithmetic wraps, so the slices' sums add up mod 2^32 to the whole array's)."""
    words = np.ascontiguousarray(x).view(_unsigned(x.dtype)).reshape(-1)
    a = b = 0
    for start in range(0, words.shape[0], SLICE):
        w = words[start : start + SLICE].astype(np.uint32)
        i = np.arange(start, start + w.shape[0], dtype=np.uint64).astype(np.uint32)
        a += int(np.sum((2 * i + 1) * w, dtype=np.uint32))
        b += int(np.sum((i * np.uint32(_GOLDEN) | 1) * (w ^ (w >> 16)), dtype=np.uint32))
    return np.array([a % 2**32, b % 2**32], np.uint32)


@jax.jit
def _tree_checksums(tree):
    return jax.tree.map(array_checksum, tree)


def checksums(tree, name=jax.tree_util.keystr) -> dict[str, str]:
    """{name(path): hex checksum} of every array of a tree."""
    sums = jax.device_get(_tree_checksums(tree))
    return {
        name(path): hex_of(value) for path, value in jax.tree_util.tree_flatten_with_path(sums)[0]
    }


def hex_of(checksum) -> str:
    a, b = (int(v) for v in np.asarray(checksum))
    return f"{a:08x}{b:08x}"

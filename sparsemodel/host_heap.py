"""glibc's heap in a training process: keep freed pages for the next step, and hand them
back on request. The only module that calls into libc.

XLA:CPU mallocs each step's temporaries as one block from its worker threads (hundreds of
MB for `small`). A worker thread's glibc arena serves a block that large from a fresh mmap
and unmaps it when the step frees it, so every step faults every page of it in again,
each one zeroed by the kernel: system time in every step that grows with its temporaries.
One arena that never maps large blocks apart and never trims itself on free keeps those
pages for the next step: no faults after the first step (tests/test_host_heap.py).
PyTorch's and JAX's GPU allocators cache device memory for the same reason.

The price: resident memory stays at its peak (`return_freed_heap`, after each checkpoint
save, gives the free part back), and XLA's compiler threads share the one arena (slower
compiles). `sparsemodel train` and `profile` use it; SPARSEMODEL_KEEP_FREED_HEAP=0 turns
it off.
"""

from __future__ import annotations

import ctypes
import functools
import os

# mallopt parameters, from glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER_TRIM = 2**31 - 1  # mallopt takes an int: trim only when 2 GiB at the top are free


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def keep_freed_heap() -> bool:
    """Makes glibc keep freed memory for reuse (see the module docstring); False where
    there is no glibc or SPARSEMODEL_KEEP_FREED_HEAP=0. Call it before JAX starts its
    backend: a thread that has already made its own arena keeps it."""
    libc = _libc()
    if libc is None or os.environ.get("SPARSEMODEL_KEEP_FREED_HEAP", "1") == "0":
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _NEVER_TRIM))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def return_freed_heap() -> bool:
    """Asks glibc to hand freed heap pages back to the system (malloc_trim); False where
    there is no glibc. Each save allocates and frees hundreds of buffers on Orbax's and
    TensorStore's threads, and glibc keeps the fragmented remains, so without a trim
    resident memory creeps up with every save (experiments/long_run.py). The checkpoint
    thread runs it, off the loop."""
    libc = _libc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True

"""Unrolled loops for FLOP counting.

XLA's `cost_analysis()` counts a while-loop body once, whatever its trip count, so the
scanned layer stack and the blocked expert matmul would be undercounted by their trip
counts. Inside `unrolled_loops()` our scans unroll fully, and the compiled program's FLOPs
are the real ones. Training never uses it: unrolling would make compile time grow with
depth.
"""

from __future__ import annotations

import contextlib
import contextvars

_UNROLL = contextvars.ContextVar("sparsemodel_unroll", default=False)


@contextlib.contextmanager
def unrolled_loops():
    token = _UNROLL.set(True)
    try:
        yield
    finally:
        _UNROLL.reset(token)


def unrolling() -> bool:
    """True inside `unrolled_loops()`: code with dynamic trip counts takes a countable form."""
    return _UNROLL.get()


def scan_unroll() -> bool | int:
    """The `unroll` argument for jax.lax.scan at the current trace."""
    return True if _UNROLL.get() else 1

"""The heap settings `sparsemodel train` starts with: a step's temporaries reuse the pages
of the previous step's instead of faulting fresh ones in (host_heap.py)."""

import json
import subprocess
import sys

import jax
import pytest

from sparsemodel import host_heap

# A jitted step whose 64 MiB product is a temporary, run from XLA's worker threads; prints
# the minor page faults of its last three calls.
_FAULTS = """
import json, resource, sys
from sparsemodel import host_heap
kept = host_heap.keep_freed_heap() if sys.argv[1] == "keep" else None
import jax, jax.numpy as jnp
x = jnp.ones((4096, 16))
step = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) @ x)
for _ in range(3):
    jax.block_until_ready(step(x))
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    jax.block_until_ready(step(x))
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"kept": kept, "faults": faults}))
"""


def _faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_heap_reuses_the_pages_of_the_previous_step():
    if jax.default_backend() != "cpu" or host_heap._libc() is None:
        pytest.skip("the step's temporaries are glibc heap only with XLA:CPU")
    default, kept = _faults("default"), _faults("keep")
    pages = 64 * 2**20 // 4096
    # glibc's default maps each step's product afresh: every page faults in every step
    assert default["faults"] >= 3 * pages, default
    assert kept["kept"] is True
    assert kept["faults"] < pages // 10, kept

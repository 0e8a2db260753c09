"""The heap settings `sparsemodel train` starts with: a step's temporaries reuse the pages
of the previous step's instead of faulting fresh ones in (host_heap.py)."""

import json
import os
import subprocess
import sys

import jax
import pytest
from cli_commands import train_tiny

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


def _heap_env() -> dict:
    """This process's environment without conftest's opt-out: the commands' default."""
    return {k: v for k, v in os.environ.items() if k != "SPARSEMODEL_KEEP_FREED_HEAP"}


def _faults(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _FAULTS, mode],
        capture_output=True,
        text=True,
        check=True,
        env=_heap_env(),
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


def test_train_runs_with_the_heap_kept_and_it_can_be_turned_off(tmp_path):
    # `train` keeps the heap (the other tests opt out); SPARSEMODEL_KEEP_FREED_HEAP=0 is
    # the way out for whoever would rather have resident memory fall between steps.
    out = subprocess.run(
        train_tiny(tmp_path, "--set", "train.steps=3"),
        capture_output=True,
        text=True,
        env=_heap_env(),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "metrics.jsonl").exists()
    check = "from sparsemodel import host_heap; print(host_heap.keep_freed_heap())"
    for value, want in (("0", "False"), ("1", "True")):
        env = {**_heap_env(), "SPARSEMODEL_KEEP_FREED_HEAP": value}
        got = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=env)
        assert got.stdout.strip() == want or host_heap._libc() is None, got

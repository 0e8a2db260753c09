"""Which implementation each kernel uses: the one place that decides.

The model code asks `choose(cfg)` and reads the same whatever the answer. The answer
depends on the backend, the config and one mode, FLOP counting (`counting_flops()`,
used by `profile`): XLA's cost analysis counts a loop's body once whatever its trip
count, and cannot see inside fused attention kernels, so while counting every scan unrolls,
the grouped matmul takes its static-bound form and attention its einsum form. Training
never counts: unrolling would make compile time grow with depth.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Literal

import jax
import jax.numpy as jnp

from sparsemodel.config import Config

_COUNTING = contextvars.ContextVar("sparsemodel_counting_flops", default=False)

GroupedMatmul = Literal["blocks", "block_scan", "batched", "ragged_dot", "tokamax"]


@dataclass(frozen=True)
class Kernels:
    """The implementations one trace of the model uses."""

    grouped_matmul: GroupedMatmul  # dropless experts (moe.grouped_matmul; see moe.py)
    attention: Literal["xla", "cudnn"]  # causal attention of a full sequence
    unroll: bool | int  # the `unroll` of every jax.lax.scan
    experts_in_place: bool  # the layer scan hands MoE layers the stacked expert weights
    # the 'blocks' backward recomputes each block's gate/up product (grouped_matmul.py)
    recompute_gate_up: bool = False


@contextlib.contextmanager
def counting_flops():
    """Traces inside take the forms whose compiled FLOPs XLA counts completely."""
    token = _COUNTING.set(True)
    try:
        yield
    finally:
        _COUNTING.reset(token)


def choose(cfg: Config) -> Kernels:
    """The kernels for a trace of cfg's model on this backend and mesh, now."""
    counting = _COUNTING.get()
    backend = jax.default_backend()
    grouped = _grouped_matmul(cfg, backend)
    if counting and grouped == "blocks":
        grouped = "block_scan"  # the per-expert loops have dynamic trip counts
    mesh = jax.sharding.get_abstract_mesh()
    fused_attention = backend == "gpu" and jnp.dtype(cfg.train.dtype).itemsize == 2
    return Kernels(
        grouped_matmul=grouped,
        attention="cudnn" if fused_attention and not counting else "xla",
        unroll=True if counting else 1,
        # Reading the stacked weights in place needs the loop kernel on one device (under
        # shard_map each device holds a slice), and dropless token choice to run it.
        experts_in_place=(
            grouped == "blocks"
            and cfg.moe.dispatch == "dropless"
            and cfg.moe.router == "topk"
            and (mesh.empty or mesh.size == 1)
        ),
        # The CPU loop is bound by memory traffic: recomputing a block's gate/up product
        # costs less than writing, zeroing and reading back an [R, 2F] buffer of them
        # (measured at every bench size, experiments/README.md).
        recompute_gate_up=grouped == "blocks",
    )


def _grouped_matmul(cfg: Config, backend: str) -> GroupedMatmul:
    """'blocks' on CPU, 'batched' on GPU, 'ragged_dot' on TPU, unless the config names one.

    XLA's ragged_dot computes every expert for every row on CPU and ran several times
    slower than the batched form on GPU (experiments/README.md). 'auto' never picks
    'tokamax': no recorded run shows it faster than these yet, and so 'auto' needs no
    fallback when the optional package is missing (it is 'batched' on GPU either way).
    Counting FLOPs leaves 'ragged_dot' and 'tokamax' as they run: on CPU both are XLA's
    ragged_dot, whose count shows its every-expert work; on GPU tokamax's Pallas kernels
    are custom calls that the count lists as uncounted."""
    kind = cfg.moe.grouped_matmul
    if kind == "auto":
        return {"cpu": "blocks", "gpu": "batched"}.get(backend, "ragged_dot")
    return kind

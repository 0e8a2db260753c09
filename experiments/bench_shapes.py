"""The matmuls of a training step, from its config alone: what the bench's step efficiency
weighs a step against (`bench.py`).

Step efficiency is the step's model FLOP/s divided by what XLA's matmuls alone achieve
on the step's own matmul shapes: each distinct shape timed alone, the rates weighted by
the FLOPs each shape does in a step. Forward and backward: a forward [M, K] x [K, N] has
two backward matmuls, dY [M, N] x [N, K] (the left operand's gradient) and
dY^T [N, M] x [M, K] (the right one's, transposed: JAX's transpose rule computes it so).

Approximations, where they are made:
  attention  the score and value matmuls of each (sequence, head), [S, Dh] x [Dh, S] and
             [S, S] x [S, Dh], full S x S, as XLA runs them (the model FLOPs count the
             causal half);
  experts    balanced routing: each expert gets tokens * k / E rows (the remainder one
             row each to the first experts), run as the CPU kernel runs them: whole
             blocks of moe.block_size rows, then the rest as one block (the rest's padding
             to the kernel's small block is left out).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple

from sparsemodel.config import Config

# Each timing call of a shape does at least this many FLOPs (several instances of a small
# shape in one batched matmul), so that the call's fixed cost does not count as slowness.
MIN_FLOPS_PER_CALL = 5e8


class Matmul(NamedTuple):
    """[m, k] x [k, n], run `count` times per step."""

    part: str  # e.g. "attention.q", "experts.down.d_lhs" (a backward matmul)
    m: int
    k: int
    n: int
    count: int

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n * self.count


def forward_matmuls(cfg: Config) -> list[Matmul]:
    """The forward pass's matmuls of a train step of cfg (train.batch_size x seq_len)."""
    out: list[Matmul] = []
    for kind in cfg.layer_plan().kinds():
        out += _attention(cfg)
        out += _dense_mlp(cfg) if kind == "dense" else _moe(cfg)
    tokens = cfg.train.batch_size * cfg.train.seq_len
    out.append(Matmul("unembedding", tokens, cfg.model.d_model, cfg.model.vocab_size, 1))
    return _merged(out)


def backward_matmuls(forward: list[Matmul]) -> list[Matmul]:
    """The two gradient matmuls of each forward [M, K] x [K, N], as JAX differentiates it."""
    out = []
    for f in forward:
        out.append(Matmul(f"{f.part}.d_lhs", f.m, f.n, f.k, f.count))  # dY [M,N] x B^T [N,K]
        out.append(Matmul(f"{f.part}.d_rhs", f.n, f.m, f.k, f.count))  # dY^T [N,M] x A [M,K]
    return out


def step_matmuls(cfg: Config) -> list[Matmul]:
    """Forward and backward matmuls of one train step of cfg."""
    forward = forward_matmuls(cfg)
    return forward + backward_matmuls(forward)


def _attention(cfg: Config) -> list[Matmul]:
    m, t = cfg.model, cfg.train
    tokens, s = t.batch_size * t.seq_len, t.seq_len
    dh = m.d_model // m.n_heads
    per_head = t.batch_size * m.n_heads  # GQA: every query head has its own scores
    return [
        Matmul("attention.q", tokens, m.d_model, m.n_heads * dh, 1),
        Matmul("attention.k", tokens, m.d_model, m.n_kv_heads * dh, 1),
        Matmul("attention.v", tokens, m.d_model, m.n_kv_heads * dh, 1),
        Matmul("attention.o", tokens, m.n_heads * dh, m.d_model, 1),
        Matmul("attention.scores", s, dh, s, per_head),
        Matmul("attention.values", s, s, dh, per_head),
    ]


def _swiglu(name: str, rows: int, d: int, f: int, count: int) -> list[Matmul]:
    return [
        Matmul(f"{name}.gate", rows, d, f, count),
        Matmul(f"{name}.up", rows, d, f, count),
        Matmul(f"{name}.down", rows, f, d, count),
    ]


def _dense_mlp(cfg: Config) -> list[Matmul]:
    tokens = cfg.train.batch_size * cfg.train.seq_len
    return _swiglu("mlp", tokens, cfg.model.d_model, cfg.model.d_ff, 1)


def _moe(cfg: Config) -> list[Matmul]:
    e, d = cfg.moe, cfg.model.d_model
    if e.dispatch != "dropless" or e.router != "topk":
        raise ValueError(
            f"bench_shapes: moe.dispatch={e.dispatch}, moe.router={e.router}: only dropless "
            "token-choice routing is modelled"
        )
    tokens = cfg.train.batch_size * cfg.train.seq_len
    out = [Matmul("router", tokens, d, e.num_experts, 1)]
    for rows, n_experts in _rows_per_expert(tokens * e.top_k, e.num_experts):
        for block_rows, blocks in _blocks(rows, e.block_size):
            out += _swiglu("experts", block_rows, d, e.d_expert, n_experts * blocks)
    if e.num_shared:  # always-on, one fused MLP over every token
        out += _swiglu("shared_experts", tokens, d, e.num_shared * e.d_expert, 1)
    return out


def _rows_per_expert(assignments: int, n_experts: int) -> list[tuple[int, int]]:
    """(rows, experts with that many rows) under balanced routing."""
    rows, extra = divmod(assignments, n_experts)
    return [(r, n) for r, n in ((rows + 1, extra), (rows, n_experts - extra)) if r and n]


def _blocks(rows: int, block: int) -> list[tuple[int, int]]:
    """(block rows, blocks) of one expert's rows: whole blocks, then the rest as one."""
    whole, rest = divmod(rows, block)
    return [(r, n) for r, n in ((block, whole), (rest, 1)) if r and n]


def _merged(matmuls: list[Matmul]) -> list[Matmul]:
    """Equal matmuls of different layers as one entry with their counts added."""
    counts: Counter = Counter()
    for f in matmuls:
        counts[f._replace(count=0)] += f.count
    return [f._replace(count=c) for f, c in counts.items()]


def distinct_shapes(matmuls: list[Matmul]) -> dict[tuple[int, int, int], int]:
    """(m, k, n) -> how many times the step runs that shape, over every part."""
    counts: Counter = Counter()
    for f in matmuls:
        counts[(f.m, f.k, f.n)] += f.count
    return dict(counts)


def instances_per_call(shape: tuple[int, int, int], count: int) -> int:
    """Instances of a shape one timing call batches: enough for MIN_FLOPS_PER_CALL, at
    most as many as the step runs."""
    return max(1, min(count, math.ceil(MIN_FLOPS_PER_CALL / (2 * math.prod(shape)))))


def matmul_seconds(matmuls: list[Matmul], rate: dict[tuple[int, int, int], float]) -> float:
    """The time the step's matmuls take if each runs at its shape's `rate` (FLOP/s)."""
    return sum(f.flops / rate[(f.m, f.k, f.n)] for f in matmuls)

"""Dispatch and combine by index: assignments to an expert-major buffer of rows and back.

Every token-choice path (capacity, dropless blocks, ragged_dot) places each assignment
(token t, choice j) on one row of a buffer grouped by expert, runs the experts on the
buffer, and combines the rows back into tokens. A `Layout` holds that placement both ways:

    rows[t, j]   the buffer row of assignment (t, j), or R (no row: dropped, a padding
                 token, or an expert on another device)
    source[r]    the assignment on row r as t * k + j, or T * k (an empty row)

Why both directions: the gradient of a gather is a scatter-add, which XLA:CPU runs as a
serial loop over rows. Each row holds at most one assignment, so the gradient of gathering
by `source` is a gather by `rows` and vice versa: dispatch and combine are gathers in both
passes, and no [T, E, C] one-hot tensor is ever built.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Layout(NamedTuple):
    rows: jax.Array  # [T, k] int32 buffer row of each assignment; R = none
    source: jax.Array  # [R] int32 assignment (t * k + j) on each row; T * k = empty


def layout_from_rows(rows_tk, n_rows: int) -> Layout:
    """Inverts assignment -> row (rows >= n_rows mean none) with one integer scatter."""
    n_assign = rows_tk.size
    assignment = jnp.arange(n_assign, dtype=jnp.int32)
    source = jnp.full((n_rows + 1,), n_assign, jnp.int32)
    source = source.at[jnp.minimum(rows_tk.reshape(-1), n_rows)].set(assignment)[:n_rows]
    return Layout(jnp.minimum(rows_tk, n_rows).astype(jnp.int32), source)


def layout_from_order(order_a, k: int) -> Layout:
    """The layout of a permutation: row r holds assignment order[r] (every row used)."""
    n_assign = order_a.shape[0]
    rows = jnp.zeros((n_assign,), jnp.int32).at[order_a].set(jnp.arange(n_assign, dtype=jnp.int32))
    return Layout(rows.reshape(-1, k), order_a.astype(jnp.int32))


def rank_within_expert(flat_e, n_experts: int):
    """Position of each assignment among those of its expert, in token-major order.

    flat_e [A] (n_experts = none). Returns rank [A] and counts [E+1]. Token-major order
    inside each expert is the capacity priority order.
    """
    n = flat_e.shape[0]
    if n_experts <= 32 and n * (n_experts + 1) <= 2**24:
        # A running count per expert instead of a sort: on XLA:CPU the sort and its scatter
        # cost ~0.35 us an assignment, this ~5 ns an assignment and expert. The bound keeps
        # the [A, E+1] counts under 64 MiB.
        counts_ae = jnp.cumsum(flat_e[:, None] == jnp.arange(n_experts + 1), 0, jnp.int32)
        rank = jnp.take_along_axis(counts_ae, flat_e[:, None], axis=1)[:, 0] - 1
        return rank, counts_ae[-1]
    order = jnp.argsort(flat_e, stable=True)  # stable: token-major inside each expert
    counts = jnp.bincount(flat_e, length=n_experts + 1)
    starts = jnp.cumsum(counts) - counts
    rank_sorted = jnp.arange(n) - starts[flat_e[order]]
    rank = jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    return rank, counts


class CapacityRows(NamedTuple):
    """Capacity layout: expert e's rows are [e * N * S, (e + 1) * N * S), sequence n's S rows
    among them (S = min(capacity, sequence length): a token picks an expert at most once)."""

    rows: jax.Array  # [T, k] int32 buffer row of each assignment; n_rows = dropped or none
    keep: jax.Array  # [T, k] bool: the assignment fits its sequence's capacity
    counts: jax.Array  # [N, E] int32 assignments each sequence's experts kept, `used` included
    n_rows: int  # E * N * S


def capacity_rows(
    experts_tk, n_experts: int, capacity: int, seq_len: int | None = None, used_ne=None
) -> CapacityRows:
    """Keeps each sequence's first `capacity` assignments to each expert: -> CapacityRows.

    experts_tk [T, k] (n_experts = none) holds N = T / seq_len sequences one after another
    (seq_len None: one sequence of T). Priority is position-major within a sequence (all of
    token t's choices beat token t+1's), so an assignment's fate depends only on earlier
    tokens of its own sequence. used_ne [N, E]: assignments kept by earlier calls (decoding),
    which count against the capacity.
    """
    t, k = experts_tk.shape
    seq_len = t if seq_len is None else seq_len
    n_seqs, slots = t // seq_len, min(capacity, seq_len)
    n_groups = n_seqs * n_experts  # one group per (sequence, expert)
    flat_e = experts_tk.reshape(-1)  # [A]
    seq_a = jnp.arange(t * k, dtype=jnp.int32) // (seq_len * k)  # [A] sequence of each
    group = jnp.where(flat_e < n_experts, seq_a * n_experts + flat_e, n_groups)  # [A]
    rank, counts = rank_within_expert(group, n_groups)  # token-major inside each group
    used = jnp.zeros((n_groups,), jnp.int32) if used_ne is None else used_ne.reshape(-1)
    used_a = jnp.take(used, group, mode="fill", fill_value=capacity)  # [A]; none: full
    keep = rank + used_a < capacity
    n_rows = n_experts * n_seqs * slots
    rows = jnp.where(keep, (flat_e * n_seqs + seq_a) * slots + rank, n_rows)
    new_counts = jnp.minimum(used + counts[:n_groups], capacity).astype(jnp.int32)
    return CapacityRows(
        rows.reshape(t, k).astype(jnp.int32),
        keep.reshape(t, k),
        new_counts.reshape(n_seqs, n_experts),
        n_rows,
    )


def _take(x, idx):
    """x[idx] along axis 0, zeros where idx is out of range (the 'none' markers)."""
    return jnp.take(x, idx, axis=0, mode="fill", fill_value=0)


@jax.custom_vjp
def gather_rows(x_td, layout: Layout):
    """Buffer [R, D] whose row r holds the features of the token assigned to it (or 0)."""
    return _take(x_td, layout.source // layout.rows.shape[1])


def _gather_rows_fwd(x_td, layout):
    return gather_rows(x_td, layout), layout


def _gather_rows_bwd(layout, d_rd):
    t, k = layout.rows.shape
    d_tkd = _take(d_rd, layout.rows.reshape(-1)).reshape(t, k, -1)  # [T, k, D]
    return d_tkd.sum(1), None


gather_rows.defvjp(_gather_rows_fwd, _gather_rows_bwd)


@jax.custom_vjp
def combine(y_rd, weights_tk, layout: Layout):
    """y[t] = sum_j weights[t, j] * y_rd[rows[t, j]] (rows with no row add 0): [T, D]."""
    t, k = layout.rows.shape
    y_tkd = _take(y_rd, layout.rows.reshape(-1)).reshape(t, k, -1)  # [T, k, D]
    return jnp.einsum("tkd,tk->td", y_tkd, weights_tk.astype(y_rd.dtype))


def _combine_fwd(y_rd, weights_tk, layout):
    return combine(y_rd, weights_tk, layout), (y_rd, weights_tk, layout)


def _combine_bwd(res, d_td):
    y_rd, weights_tk, layout = res
    t, k = layout.rows.shape
    # d y_rd[r] = weight of the assignment on r * d_out of its token: gathers by source.
    w_r = _take(weights_tk.reshape(-1), layout.source).astype(y_rd.dtype)  # [R]
    d_rd = w_r[:, None] * _take(d_td, layout.source // k)  # [R, D]
    # d weights[t, j] = <y_rd[rows[t, j]], d_out[t]>: recompute the gather, no residual.
    y_tkd = _take(y_rd, layout.rows.reshape(-1)).reshape(t, k, -1)
    d_w = jnp.einsum("tkd,td->tk", y_tkd, d_td).astype(weights_tk.dtype)
    return d_rd, d_w, None


combine.defvjp(_combine_fwd, _combine_bwd)

"""Grouped SwiGLU over blocks of rows, each block belonging to one expert (the CPU path of
dropless dispatch; on GPU/TPU `jax.lax.ragged_dot` does this job).

Two forms of the same maths:
  expert_swiglu  what training runs: a loop over experts, and inside it a loop over that
                 expert's blocks (a dynamic trip count). Each expert's weights are sliced
                 once, and padding blocks past the used ones are never visited.
  block_swiglu   a scan over the static bound of N blocks, padding blocks skipped by a
                 `cond`. XLA's cost analysis cannot count a loop with a dynamic trip count,
                 so `unrolled_loops()` (profile's compiled-FLOP count) traces this form.

Why hand-written backward passes: differentiating a loop that indexes `w[e]` makes XLA add
a full-size [E, D, F] cotangent into the gradient on every iteration (O(E*D*F) memory
traffic per block). Here the weight gradients are accumulated per expert (or updated in
place per block), so the backward pass costs what the blocks' matmuls cost.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsemodel.dispatch import Blocks
from sparsemodel.unroll import scan_unroll, unrolling


def grouped_swiglu(x_nbd, blocks: Blocks, w_gate, w_up, w_down):
    """x_nbd [N, B, D] rows grouped in blocks by `blocks`; weights [E, D, F], [E, D, F],
    [E, F, D]. Returns [N, B, D]; blocks past the used ones are zeros."""
    if unrolling():
        return block_swiglu(x_nbd, blocks.block_expert, blocks.n_used, w_gate, w_up, w_down)
    return expert_swiglu(x_nbd, blocks.first_block, blocks.n_blocks, w_gate, w_up, w_down)


def _swiglu_fwd(xb, wg, wu, wd):
    g = xb @ wg  # [B, F]
    u = xb @ wu  # [B, F]
    return (jax.nn.silu(g) * u) @ wd, g, u  # [B, D]


def _swiglu_bwd(xb, g, u, dy, wg, wu, wd):
    """Gradients of one block: dx [B, D] and the weight gradients [D, F], [D, F], [F, D]."""
    sg = jax.nn.sigmoid(g.astype(jnp.float32)).astype(g.dtype)
    silu_g = g * sg
    dh = dy @ wd.T  # [B, F]
    du = dh * silu_g
    dg = dh * u * (sg * (1 + g * (1 - sg)))  # silu'(g) = s(g) (1 + g (1 - s(g)))
    dx = dg @ wg.T + du @ wu.T  # [B, D]
    return dx, xb.T @ dg, xb.T @ du, (silu_g * u).T @ dy


def _expert_weights(e, w_gate, w_up, w_down, dtype):
    return w_gate[e].astype(dtype), w_up[e].astype(dtype), w_down[e].astype(dtype)


# ------------------------------------------------------------- per-expert loops (runs)


@jax.custom_vjp
def expert_swiglu(x_nbd, first_block, n_blocks, w_gate, w_up, w_down):
    """Expert e's blocks are first_block[e] .. first_block[e] + n_blocks[e] - 1."""
    return _expert_forward(x_nbd, first_block, n_blocks, w_gate, w_up, w_down)[0]


def _expert_forward(x_nbd, first_block, n_blocks, w_gate, w_up, w_down):
    n, b, _ = x_nbd.shape
    f, dtype = w_gate.shape[-1], x_nbd.dtype

    def expert(e, carry):
        w = _expert_weights(e, w_gate, w_up, w_down, dtype)

        def block(j, carry):
            y, g, u = carry
            i = first_block[e] + j
            yb, gb, ub = _swiglu_fwd(x_nbd[i], *w)
            return y.at[i].set(yb), g.at[i].set(gb), u.at[i].set(ub)

        return jax.lax.fori_loop(0, n_blocks[e], block, carry)

    empty = (jnp.zeros_like(x_nbd), jnp.zeros((n, b, f), dtype), jnp.zeros((n, b, f), dtype))
    return jax.lax.fori_loop(0, w_gate.shape[0], expert, empty)  # y, g, u [N, B, *]


def _expert_fwd(x_nbd, first_block, n_blocks, w_gate, w_up, w_down):
    y, g, u = _expert_forward(x_nbd, first_block, n_blocks, w_gate, w_up, w_down)
    return y, (x_nbd, first_block, n_blocks, w_gate, w_up, w_down, g, u)


def _expert_bwd(res, dy_nbd):
    x_nbd, first_block, n_blocks, w_gate, w_up, w_down, g_nbf, u_nbf = res
    dtype = x_nbd.dtype

    def expert(e, carry):
        dx, dwg, dwu, dwd = carry
        w = _expert_weights(e, w_gate, w_up, w_down, dtype)

        def block(j, acc):
            dx, ag, au, ad = acc
            i = first_block[e] + j
            dxb, dg, du, dd = _swiglu_bwd(x_nbd[i], g_nbf[i], u_nbf[i], dy_nbd[i], *w)
            return dx.at[i].set(dxb), ag + dg, au + du, ad + dd

        zero = lambda w: jnp.zeros(w.shape[1:], jnp.float32)  # f32 accumulators per expert
        acc = (dx, zero(w_gate), zero(w_up), zero(w_down))
        dx, ag, au, ad = jax.lax.fori_loop(0, n_blocks[e], block, acc)
        return (
            dx,
            dwg.at[e].set(ag.astype(dwg.dtype)),
            dwu.at[e].set(au.astype(dwu.dtype)),
            dwd.at[e].set(ad.astype(dwd.dtype)),
        )

    init = (jnp.zeros_like(x_nbd), *(jnp.zeros_like(w) for w in (w_gate, w_up, w_down)))
    dx, dwg, dwu, dwd = jax.lax.fori_loop(0, w_gate.shape[0], expert, init)
    return dx, None, None, dwg, dwu, dwd


expert_swiglu.defvjp(_expert_fwd, _expert_bwd)


# ------------------------------------------------- static-bound block scan (counted)


@jax.custom_vjp
def block_swiglu(x_nbd, block_expert, n_used, w_gate, w_up, w_down):
    """block_expert [N] expert of each block; blocks >= n_used are padding and give zeros."""
    return _block_forward(x_nbd, block_expert, n_used, w_gate, w_up, w_down)[0]


def _block_forward(x_nbd, block_expert, n_used, w_gate, w_up, w_down):
    dtype, f = x_nbd.dtype, w_gate.shape[-1]

    def one(_, inputs):
        i, xb, e = inputs

        def compute(xb):
            return _swiglu_fwd(xb, *_expert_weights(e, w_gate, w_up, w_down, dtype))

        def skip(xb):
            zeros_f = jnp.zeros(xb.shape[:1] + (f,), dtype)
            return jnp.zeros_like(xb), zeros_f, zeros_f

        return None, jax.lax.cond(i < n_used, compute, skip, xb)

    idx = jnp.arange(x_nbd.shape[0])
    _, (y, g, u) = jax.lax.scan(one, None, (idx, x_nbd, block_expert), unroll=scan_unroll())
    return y, g, u


def _block_fwd(x_nbd, block_expert, n_used, w_gate, w_up, w_down):
    y, g, u = _block_forward(x_nbd, block_expert, n_used, w_gate, w_up, w_down)
    return y, (x_nbd, block_expert, n_used, w_gate, w_up, w_down, g, u)


def _block_bwd(res, dy_nbd):
    x_nbd, block_expert, n_used, w_gate, w_up, w_down, g_nbf, u_nbf = res
    dtype = x_nbd.dtype

    def one(grads, inputs):
        i, xb, e, g, u, dy = inputs

        def compute(grads):
            dwg, dwu, dwd = grads
            w = _expert_weights(e, w_gate, w_up, w_down, dtype)
            dx, dg, du, dd = _swiglu_bwd(xb, g, u, dy, *w)
            dwg = dwg.at[e].add(dg.astype(dwg.dtype))  # in place: one expert's slice
            dwu = dwu.at[e].add(du.astype(dwu.dtype))
            dwd = dwd.at[e].add(dd.astype(dwd.dtype))
            return (dwg, dwu, dwd), dx

        def skip(grads):
            return grads, jnp.zeros_like(xb)

        return jax.lax.cond(i < n_used, compute, skip, grads)

    zeros = (jnp.zeros_like(w_gate), jnp.zeros_like(w_up), jnp.zeros_like(w_down))
    idx = jnp.arange(x_nbd.shape[0])
    xs = (idx, x_nbd, block_expert, g_nbf, u_nbf, dy_nbd)
    (dwg, dwu, dwd), dx = jax.lax.scan(one, zeros, xs, unroll=scan_unroll())
    return dx, None, None, dwg, dwu, dwd


block_swiglu.defvjp(_block_fwd, _block_bwd)

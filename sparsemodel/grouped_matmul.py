"""Grouped SwiGLU over blocks of rows, each block belonging to one expert (the CPU path of
dropless dispatch).

Why a hand-written backward: differentiating a scan that indexes `w[e]` makes XLA add a
full-size [E, D, F] cotangent into the gradient on every block (O(E*D*F) memory traffic
per block). Here the backward pass carries the three weight gradients through its own scan
and updates only expert e's slice in place, so its cost is that of the block's matmuls.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sparsemodel.unroll import scan_unroll


def _block_forward(xb, wg, wu, wd):
    g = xb @ wg  # [B, F]
    u = xb @ wu  # [B, F]
    return (jax.nn.silu(g) * u) @ wd, g, u  # [B, D]


@jax.custom_vjp
def block_swiglu(x_nbd, block_expert, n_used, w_gate, w_up, w_down):
    """x_nbd [N, B, D] rows grouped in blocks; block_expert [N]; blocks >= n_used are padding
    and produce zeros. Weights [E, D, F], [E, D, F], [E, F, D]. Returns [N, B, D]."""
    return _forward(x_nbd, block_expert, n_used, w_gate, w_up, w_down)[0]


def _forward(x_nbd, block_expert, n_used, w_gate, w_up, w_down):
    dtype = x_nbd.dtype
    f = w_gate.shape[-1]

    def one(_, inputs):
        i, xb, e = inputs

        def compute(xb):
            return _block_forward(
                xb, w_gate[e].astype(dtype), w_up[e].astype(dtype), w_down[e].astype(dtype)
            )

        def skip(xb):
            zeros_f = jnp.zeros(xb.shape[:1] + (f,), dtype)
            return jnp.zeros_like(xb), zeros_f, zeros_f

        return None, jax.lax.cond(i < n_used, compute, skip, xb)

    idx = jnp.arange(x_nbd.shape[0])
    _, (y, g, u) = jax.lax.scan(one, None, (idx, x_nbd, block_expert), unroll=scan_unroll())
    return y, g, u


def _fwd(x_nbd, block_expert, n_used, w_gate, w_up, w_down):
    y, g, u = _forward(x_nbd, block_expert, n_used, w_gate, w_up, w_down)
    return y, (x_nbd, block_expert, n_used, w_gate, w_up, w_down, g, u)


def _bwd(res, dy_nbd):
    x_nbd, block_expert, n_used, w_gate, w_up, w_down, g_nbf, u_nbf = res
    dtype = x_nbd.dtype

    def one(grads, inputs):
        dwg, dwu, dwd = grads
        i, xb, e, g, u, dy = inputs

        def compute(args):
            dwg, dwu, dwd = args
            sg = jax.nn.sigmoid(g.astype(jnp.float32)).astype(dtype)
            silu_g = g * sg
            h = silu_g * u  # [B, F]
            dh = dy @ w_down[e].astype(dtype).T  # [B, F]
            du = dh * silu_g
            dg = dh * u * (sg * (1 + g * (1 - sg)))  # silu'(g) = s(g) (1 + g (1 - s(g)))
            dx = dg @ w_gate[e].astype(dtype).T + du @ w_up[e].astype(dtype).T  # [B, D]
            dwg = dwg.at[e].add((xb.T @ dg).astype(dwg.dtype))  # in place: one expert's slice
            dwu = dwu.at[e].add((xb.T @ du).astype(dwu.dtype))
            dwd = dwd.at[e].add((h.T @ dy).astype(dwd.dtype))
            return (dwg, dwu, dwd), dx

        def skip(args):
            return args, jnp.zeros_like(xb)

        return jax.lax.cond(i < n_used, compute, skip, (dwg, dwu, dwd))

    zeros = (jnp.zeros_like(w_gate), jnp.zeros_like(w_up), jnp.zeros_like(w_down))
    idx = jnp.arange(x_nbd.shape[0])
    xs = (idx, x_nbd, block_expert, g_nbf, u_nbf, dy_nbd)
    (dwg, dwu, dwd), dx = jax.lax.scan(one, zeros, xs, unroll=scan_unroll())
    return dx, None, None, dwg, dwu, dwd


block_swiglu.defvjp(_fwd, _bwd)

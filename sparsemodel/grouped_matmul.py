"""Grouped SwiGLU: each expert's contiguous rows through that expert's weights (dropless
dispatch; `moe.grouped_matmul`). On CPU ('blocks') the layout (dispatch.block_rows) pads
each expert's rows to a multiple of the small block S = dispatch.small_block(block)
(block/4, then down to 32 rows but not below block/16), in two forms of the same maths:

  expert_swiglu  what training runs: a loop over experts; each expert's rows go in whole
                 blocks of `block` rows, then the rest in one block of its size.
                 Few, large blocks matter on CPU: every block also reads its expert's
                 weights and adds a [D, F] gradient, which costs memory traffic whatever
                 the block's size, and XLA:CPU's matmuls run slower on fewer rows.
  block_swiglu   a scan over the static bound of R/S blocks of S rows, padding blocks
                 skipped by a `cond`. XLA's cost analysis cannot count loops with dynamic
                 trip counts, so `unrolled_loops()` (profile's FLOP count) traces this form.

Why hand-written backward passes: differentiating a loop that indexes `w[e]` makes XLA add
a full-size [E, D, F] cotangent into the gradient on every iteration (O(E*D*F) memory
traffic per block). Here each block adds its weight gradient in place into its expert's
slice, so the backward pass costs what the blocks' matmuls cost. expert_swiglu reads the
weights of one layer of a stacked [U, E, D, F] stack and writes that layer's gradient
into the cotangent of a carried "sink" (ExpertStack): the layer scan then never copies a
layer's experts out of the stack or its gradient into it.

On GPU ('batched', at the end of this file) each expert is padded to whole blocks and all
blocks run as one batched matmul: GPU loops are slow (a host round trip per trip).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from sparsemodel.dispatch import Blocks, small_block
from sparsemodel.unroll import scan_unroll, unrolling


class ExpertStack:
    """Every scanned layer's expert weights, read in place, and the buffer their gradient
    is written into: the layer scan's way of not copying them (model.Transformer._scan).

    A layer scan that takes the stacked [U, E, D, F] weights as its per-layer inputs copies
    each layer's [E, D, F] slice out of the stack in both passes, and its backward writes
    each layer's gradient into a zero-filled buffer and then copies it into the stacked
    gradient: whole-weight traffic that grows with the number of experts, not with the
    tokens (~130 ms of a 1.1 s step of `small` with 32 experts). Here the kernel reads
    weights[layer, e] where they lie, and the scan carries `sink`, an array that the
    forward passes through unchanged and whose cotangent the backward fills in place,
    one [D, F] block per expert and layer: the cotangent arriving at the scan's initial
    carry is the whole stack's weight gradient. No gradient flows through `weights`
    (stop_gradient); all of it goes through `sink`.

    A mutable holder: the kernel's call site stores the new sink in it, and the scan body
    that made it reads it back, in the same trace.
    """

    def __init__(self, weights, layer, sink):
        self.weights = tuple(jax.lax.stop_gradient(w) for w in weights)  # gate, up, down
        self.layer = layer  # int32 []
        self.sink = tuple(sink)

    @classmethod
    def single(cls, w_gate, w_up, w_down) -> ExpertStack:
        """One layer's weights [E, D, F] as a stack of one."""
        weights = tuple(w[None] for w in (w_gate, w_up, w_down))
        return cls(weights, jnp.int32(0), weights)


def grouped_swiglu(x_rd, blocks: Blocks, block: int, experts: ExpertStack):
    """x_rd [R, D] rows laid out by `blocks`, through layer `experts.layer` of the stack.
    Returns [R, D]; padding rows are zeros. Updates experts.sink."""
    if unrolling():
        small = small_block(block)
        x_nsd = x_rd.reshape(-1, small, x_rd.shape[-1])  # [R/S, S, D]
        w = [s[experts.layer] for s in experts.sink]  # one layer, with its gradient
        y = block_swiglu(x_nsd, blocks.block_expert, blocks.n_used, *w)
        return y.reshape(x_rd.shape)
    y, experts.sink = expert_swiglu(
        x_rd, blocks.start, blocks.padded, *experts.weights, experts.layer, *experts.sink, block
    )
    return y


def swiglu_forward(xb, wg, wu, wd):
    """One block through one expert: y [B, D], and g, u [B, F] kept for the backward."""
    g = xb @ wg  # [B, F]
    u = xb @ wu  # [B, F]
    return (jax.nn.silu(g) * u) @ wd, g, u  # [B, D]


def swiglu_backward(xb, g, u, dy, wg, wu, wd):
    """Gradients of one block: dx [B, D] and the weight gradients [D, F], [D, F], [F, D]."""
    sg = jax.nn.sigmoid(g.astype(jnp.float32)).astype(g.dtype)
    silu_g = g * sg
    dh = dy @ wd.T  # [B, F]
    du = dh * silu_g
    dg = dh * u * (sg * (1 + g * (1 - sg)))  # silu'(g) = s(g) (1 + g (1 - s(g)))
    dx = dg @ wg.T + du @ wu.T  # [B, D]
    return dx, xb.T @ dg, xb.T @ du, (silu_g * u).T @ dy


def _expert_weights(index, w_gate, w_up, w_down, dtype):
    """One expert's [D, F], [D, F], [F, D] weights: index is (e,) or (layer, e)."""
    return tuple(w[index].astype(dtype) for w in (w_gate, w_up, w_down))


# ------------------------------------------------------------- per-expert loops (runs)


def _each_block(start, n_rows, block: int, body, carry, n_buffer: int):
    """carry = body(carry, first_row, size) over blocks tiling rows [start, start + n_rows)
    (n_rows a multiple of S): whole blocks, then the rest in one block of its size.
    Blocks longer than the buffer's n_buffer rows (decoding a few tokens) are never taken.

    The rest takes one of block/S - 1 `cond`s, one per multiple of S: one matmul per
    expert where a chain of halvings would make up to log2(block/S) + 1 smaller ones
    (with 32 experts, most experts' rows fit in one block: 160 rows ran as 128 + 32).
    Measured A/B in one process: small's step 8% faster, with 32 experts 2-7%, with 4
    3-5%, for ~17% more compile time."""
    small = small_block(block)
    while block > max(n_buffer, small):
        block //= 2
    n_full = n_rows // block
    carry = jax.lax.fori_loop(0, n_full, lambda j, c: body(c, start + j * block, block), carry)
    first, left = start + n_full * block, n_rows - n_full * block
    for size in range(small, block, small):
        take = partial(body, first=first, size=size)
        carry = jax.lax.cond(left == size, take, lambda c: c, carry)
    return carry


@partial(jax.custom_vjp, nondiff_argnums=(10,))
def expert_swiglu(x_rd, start, padded, w_gate, w_up, w_down, layer, s_gate, s_up, s_down, block):
    """Expert e's rows are start[e] .. start[e] + padded[e] - 1; its weights are
    w_*[layer, e] of the stacked [U, E, ...] weights. Returns y [R, D] and the sinks
    s_* unchanged; the backward adds the weight gradient of layer `layer` into the
    sinks' cotangents (see ExpertStack), which hold zeros there: each layer runs once."""
    w = (w_gate, w_up, w_down)
    return _expert_forward(x_rd, start, padded, w, layer, block)[0], (s_gate, s_up, s_down)


def _expert_forward(x_rd, start, padded, w_stack, layer, block):
    f, dtype = w_stack[0].shape[-1], x_rd.dtype

    def expert(e, carry):
        w = _expert_weights((layer, e), *w_stack, dtype)

        def body(carry, first, size):
            y, g, u = carry
            yb, gb, ub = swiglu_forward(jax.lax.dynamic_slice_in_dim(x_rd, first, size), *w)
            put = jax.lax.dynamic_update_slice_in_dim
            return put(y, yb, first, 0), put(g, gb, first, 0), put(u, ub, first, 0)

        return _each_block(start[e], padded[e], block, body, carry, x_rd.shape[0])

    n = x_rd.shape[0]
    empty = (jnp.zeros_like(x_rd), jnp.zeros((n, f), dtype), jnp.zeros((n, f), dtype))
    return jax.lax.fori_loop(0, w_stack[0].shape[1], expert, empty)  # y, g, u [R, *]


def _expert_fwd(x_rd, start, padded, w_gate, w_up, w_down, layer, s_gate, s_up, s_down, block):
    w = (w_gate, w_up, w_down)
    y, g, u = _expert_forward(x_rd, start, padded, w, layer, block)
    return (y, (s_gate, s_up, s_down)), (x_rd, start, padded, w, layer, g, u)


def _expert_bwd(block, res, cotangents):
    x_rd, start, padded, w_stack, layer, g_rf, u_rf = res
    dy_rd, sinks = cotangents
    dtype = x_rd.dtype

    def expert(e, carry):
        w = _expert_weights((layer, e), *w_stack, dtype)

        def body(carry, first, size):
            dx, sinks = carry
            rows = lambda a: jax.lax.dynamic_slice_in_dim(a, first, size)  # noqa: E731
            dxb, *grads = swiglu_backward(rows(x_rd), rows(g_rf), rows(u_rf), rows(dy_rd), *w)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dxb, first, 0)
            return dx, tuple(_add_at(s, (layer, e), g) for s, g in zip(sinks, grads, strict=True))

        return _each_block(start[e], padded[e], block, body, carry, x_rd.shape[0])

    dx, sinks = jax.lax.fori_loop(0, w_stack[0].shape[1], expert, (jnp.zeros_like(x_rd), sinks))
    return dx, None, None, None, None, None, None, *sinks


expert_swiglu.defvjp(_expert_fwd, _expert_bwd)


def _add_at(stack, index: tuple, g):
    """stack[index] += g, in place when stack is a loop carry (a dynamic-update-slice; an
    .at[].add would be a scatter, a serial loop on XLA:CPU)."""
    start, shape = index + (0,) * g.ndim, (1,) * len(index) + g.shape
    now = jax.lax.dynamic_slice(stack, start, shape)
    return jax.lax.dynamic_update_slice(stack, now + g.astype(stack.dtype).reshape(shape), start)


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
            return swiglu_forward(xb, *_expert_weights((e,), w_gate, w_up, w_down, dtype))

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
            w = _expert_weights((e,), w_gate, w_up, w_down, dtype)
            dx, dg, du, dd = swiglu_backward(xb, g, u, dy, *w)
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


# ------------------------------------------- one batched matmul over all blocks (GPU)


@jax.custom_vjp
def batched_swiglu(x_nbd, block_expert, w_gate, w_up, w_down):
    """Every block of rows [N, B, D] through its expert's weights in one batched matmul.

    The GPU form: no loop (a GPU while loop syncs with the host on every trip) and big
    cuBLAS batches, for the price of copying each block's expert weights ([N, D, F] per
    matrix) and computing the padding blocks. Padding blocks hold zero rows, so they add
    nothing to any gradient.
    """
    return _batched_fwd(x_nbd, block_expert, w_gate, w_up, w_down)[0]


def _per_block(w, block_expert, dtype):
    return jnp.take(w.astype(dtype), block_expert, axis=0)  # [N, D, F]: block n's expert


def _batched_fwd(x_nbd, block_expert, w_gate, w_up, w_down):
    w = [_per_block(m, block_expert, x_nbd.dtype) for m in (w_gate, w_up, w_down)]
    y, g, u = jax.vmap(swiglu_forward)(x_nbd, *w)
    return y, (x_nbd, block_expert, w_gate, w_up, w_down, g, u)


def _batched_bwd(res, dy_nbd):
    x_nbd, block_expert, w_gate, w_up, w_down, g, u = res
    w = [_per_block(m, block_expert, x_nbd.dtype) for m in (w_gate, w_up, w_down)]
    dx, *dw_blocks = jax.vmap(swiglu_backward)(x_nbd, g, u, dy_nbd, *w)  # dW per block [N, ...]
    # Sum each block's weight gradient into its expert's: a [E, N] one-hot matmul, which
    # is deterministic on GPU (a segment sum would be a scatter-add of atomics).
    one_hot = jax.nn.one_hot(block_expert, w_gate.shape[0], axis=0, dtype=x_nbd.dtype)  # [E, N]
    dw = [
        jnp.einsum("en,n...->e...", one_hot, d, preferred_element_type=jnp.float32).astype(m.dtype)
        for d, m in zip(dw_blocks, (w_gate, w_up, w_down), strict=True)
    ]
    return dx, None, *dw


batched_swiglu.defvjp(_batched_fwd, _batched_bwd)

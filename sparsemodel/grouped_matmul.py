"""Grouped SwiGLU: each expert's contiguous rows through that expert's weights (dropless
dispatch). The row layout (`ExpertRows`, from `expert_rows`) pads each expert's rows to a
multiple of a block of rows; three forms of the same maths run it (kernels.choose picks):

  loop_swiglu    'blocks', what CPU training runs: a loop over experts; each expert's rows
                 go in whole blocks of `block_size` rows, then the rest in one block of its
                 size. Few, large blocks matter on CPU: every block also reads its expert's
                 weights and adds a [D, F] gradient, which costs memory traffic whatever
                 the block's size, and XLA:CPU's matmuls run slower on fewer rows.
  scan_swiglu    'block_scan', the same on a static bound of blocks of the smallest size,
                 padding blocks skipped by a `cond`: the form profile's FLOP count traces
                 (XLA's cost analysis cannot count loops with dynamic trip counts).
  batched_swiglu 'batched', GPU: every block of `block_size` rows in one batched matmul
                 (GPU loops are slow: a host round trip per trip).

Why hand-written backward passes: differentiating a loop that indexes `w[e]` makes XLA add
a full-size [E, D, F] cotangent into the gradient on every iteration (O(E*D*F) memory
traffic per block). Here each block adds its weight gradient in place into its expert's
slice, so the backward pass costs what the blocks' matmuls cost.

loop_swiglu reads one layer of the stacked [U, E, D, F] weights of every scanned layer
(`StackedExperts`) and returns the stack with that layer's gradient "sink": the layer scan
then never copies a layer's experts out of the stack, nor its gradient into it.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from sparsemodel.dispatch import rank_within_expert

# ------------------------------------------------------------------------ the layout


def smallest_block(block: int) -> int:
    """The smallest block of the CPU loop: each expert's rows are padded to a multiple of
    it, whole blocks do the bulk and the rest runs in one block of its size (one `cond`
    per multiple of it below the block).

    It is block / 2^j, so that the block's halvings (taken when decoding a few tokens)
    are multiples of it too: block/4 where that divides, then halved down to 32 rows, so
    that large blocks (fewer, faster matmuls) cost no more padding than small ones, but not
    below block/16, so that the rest has at most 15 sizes to compile."""
    small = block
    for _ in range(2):
        small = small // 2 if small % 2 == 0 else small
    while small > 32 and small % 2 == 0 and small > block // 16:
        small //= 2
    return small


class ExpertRows(NamedTuple):
    """Dropless layout: each expert's rows contiguous, padded to a multiple of `unit` rows
    (U), in a buffer of R = ceil(A/U)*U + E*U rows."""

    rows: jax.Array  # [T, k] row of each assignment in the buffer; R = none
    start: jax.Array  # [E] first row of each expert (a multiple of U)
    padded: jax.Array  # [E] rows of each expert, padding included (a multiple of U)
    block_expert: jax.Array  # [R/U] expert of each U-row block
    n_used: jax.Array  # [] U-blocks in use; the rest are padding


def expert_rows(experts_tk, n_experts: int, unit: int) -> ExpertRows:
    """Places each expert's assignments contiguously, in token-major order."""
    flat_e = experts_tk.reshape(-1)
    n_assign = flat_e.shape[0]
    n_blocks = -(-n_assign // unit) + n_experts  # static bound on sum_e ceil(count_e / U)
    rank, counts = rank_within_expert(flat_e, n_experts)
    blocks_e = -(-counts[:n_experts] // unit)  # [E] U-blocks per expert
    end = jnp.cumsum(blocks_e)  # [E]
    start = (end - blocks_e) * unit
    safe_e = jnp.minimum(flat_e, n_experts - 1)
    rows = jnp.where(flat_e < n_experts, start[safe_e] + rank, n_blocks * unit)
    block_expert = jnp.searchsorted(end, jnp.arange(n_blocks), side="right")
    return ExpertRows(
        rows.reshape(experts_tk.shape).astype(jnp.int32),
        start.astype(jnp.int32),
        (blocks_e * unit).astype(jnp.int32),
        jnp.minimum(block_expert, n_experts - 1).astype(jnp.int32),
        end[-1],
    )


class StackedExperts(NamedTuple):
    """Every scanned layer's expert weights, read in place, and the sink their gradient
    arrives in: the layer scan's way of not copying them (model.Transformer._scan).

    A layer scan that takes the stacked [U, E, D, F] weights as its per-layer inputs copies
    each layer's [E, D, F] slice out of the stack in both passes, and its backward writes
    each layer's gradient into a zero-filled buffer and then copies it into the stacked
    gradient: whole-weight traffic that grows with the number of experts, not with the
    tokens. Here the kernel reads weights[layer, e] where they lie, and the scan carries
    `sink`, arrays that the forward passes through unchanged and whose cotangent the
    backward fills in place, one [D, F] block per expert and layer: the cotangent arriving
    at the scan's initial carry is the whole stack's weight gradient. No gradient flows
    through `weights` (stop_gradient); all of it goes through `sink`.
    """

    weights: tuple  # gate_up [U, E, D, 2, F], down [U, E, F, D]
    layer: jax.Array  # int32 []: the layer being run
    sink: tuple  # the same arrays as the gradient's way back

    @classmethod
    def of(cls, weights, layer, sink=None) -> StackedExperts:
        sink = tuple(weights) if sink is None else tuple(sink)
        return cls(tuple(jax.lax.stop_gradient(w) for w in weights), layer, sink)

    @classmethod
    def single(cls, w_gate_up, w_down) -> StackedExperts:
        """One layer's weights [E, D, 2, F], [E, F, D] as a stack of one."""
        return cls.of((w_gate_up[None], w_down[None]), jnp.int32(0))


def loop_swiglu(
    x_rd, rows: ExpertRows, block: int, experts: StackedExperts, recompute: bool = False
):
    """x_rd [R, D] laid out by `rows`, through layer `experts.layer` of the stack.
    Returns y [R, D] (padding rows are zeros) and the stack with its new sink.

    recompute: the backward recomputes each block's [B, 2F] gate/up product instead of
    keeping all of them from the forward (one more matmul per block, for not writing,
    zeroing and reading back an [R, 2F] buffer: the better trade where d_model is small
    and the step is bound by memory traffic, kernels.choose)."""
    y, sink = expert_swiglu(
        x_rd,
        rows.start,
        rows.padded,
        *experts.weights,
        experts.layer,
        *experts.sink,
        block,
        recompute,
    )
    return y, experts._replace(sink=sink)


def gate_up(xb, w_gate_up):
    """[B, D] x [D, 2, F] as one [D, 2F] matmul: h [B, 2F], gate columns then up."""
    d, _, f = w_gate_up.shape
    return xb @ w_gate_up.reshape(d, 2 * f)


def swiglu_forward(xb, w_gate_up, w_down):
    """One block through one expert: y [B, D], and h [B, 2F] (gate then up) for the
    backward."""
    f = w_gate_up.shape[-1]
    h = gate_up(xb, w_gate_up)
    return (jax.nn.silu(h[:, :f]) * h[:, f:]) @ w_down, h  # [B, D]


def swiglu_backward(xb, h, dy, w_gate_up, w_down):
    """Gradients of one block: dx [B, D] and the weight gradients [D, 2, F], [F, D]."""
    d, _, f = w_gate_up.shape
    g, u = h[:, :f], h[:, f:]
    sg = jax.nn.sigmoid(g.astype(jnp.float32)).astype(g.dtype)
    silu_g = g * sg
    dh = dy @ w_down.T  # [B, F]
    dg = dh * u * (sg * (1 + g * (1 - sg)))  # silu'(g) = s(g) (1 + g (1 - s(g)))
    dgu = jnp.concatenate([dg, dh * silu_g], axis=-1)  # [B, 2F]
    dx = dgu @ w_gate_up.reshape(d, 2 * f).T  # [B, D]
    return dx, (xb.T @ dgu).reshape(d, 2, f), (silu_g * u).T @ dy


def _expert_weights(index, w_gate_up, w_down, dtype):
    """One expert's [D, 2, F] and [F, D] weights: index is (e,) or (layer, e)."""
    return w_gate_up[index].astype(dtype), w_down[index].astype(dtype)


# ------------------------------------------------------------- per-expert loops (runs)


def _each_block(start, n_rows, block: int, body, carry, n_buffer: int):
    """carry = body(carry, first_row, size) over blocks tiling rows [start, start + n_rows)
    (n_rows a multiple of S): whole blocks, then the rest in one block of its size.
    Blocks longer than the buffer's n_buffer rows (decoding a few tokens) are never taken.

    The rest takes one of block/S - 1 `cond`s, one per multiple of S: one matmul per
    expert where a chain of halvings would make up to log2(block/S) + 1 smaller ones."""
    small = smallest_block(block)
    while block > max(n_buffer, small):
        block //= 2
    n_full = n_rows // block
    carry = jax.lax.fori_loop(0, n_full, lambda j, c: body(c, start + j * block, block), carry)
    first, left = start + n_full * block, n_rows - n_full * block
    for size in range(small, block, small):
        take = partial(body, first=first, size=size)
        carry = jax.lax.cond(left == size, take, lambda c: c, carry)
    return carry


@partial(jax.custom_vjp, nondiff_argnums=(8, 9))
def expert_swiglu(
    x_rd, start, padded, w_gate_up, w_down, layer, s_gate_up, s_down, block, recompute
):
    """Expert e's rows are start[e] .. start[e] + padded[e] - 1; its weights are
    w_*[layer, e] of the stacked [U, E, ...] weights. Returns y [R, D] and the sinks
    s_* unchanged; the backward adds the weight gradient of layer `layer` into the
    sinks' cotangents (see StackedExperts)."""
    w = (w_gate_up, w_down)
    y, _ = _expert_forward(x_rd, start, padded, w, layer, block, keep_h=False)
    return y, (s_gate_up, s_down)


def _expert_forward(x_rd, start, padded, w_stack, layer, block, keep_h: bool):
    """-> y [R, D], and h [R, 2F] (or None without keep_h)."""
    f, dtype = w_stack[0].shape[-1], x_rd.dtype

    def expert(e, carry):
        w = _expert_weights((layer, e), *w_stack, dtype)

        def body(carry, first, size):
            yb, hb = swiglu_forward(jax.lax.dynamic_slice_in_dim(x_rd, first, size), *w)
            put = jax.lax.dynamic_update_slice_in_dim
            if not keep_h:
                return put(carry, yb, first, 0)
            y, h = carry
            return put(y, yb, first, 0), put(h, hb, first, 0)

        return _each_block(start[e], padded[e], block, body, carry, x_rd.shape[0])

    y = jnp.zeros_like(x_rd)
    empty = (y, jnp.zeros((x_rd.shape[0], 2 * f), dtype)) if keep_h else y
    out = jax.lax.fori_loop(0, w_stack[0].shape[1], expert, empty)
    return out if keep_h else (out, None)


def _expert_fwd(x_rd, start, padded, w_gate_up, w_down, layer, s_gate_up, s_down, block, recompute):
    w = (w_gate_up, w_down)
    y, h = _expert_forward(x_rd, start, padded, w, layer, block, keep_h=not recompute)
    return (y, (s_gate_up, s_down)), (x_rd, start, padded, w, layer, h)


def _expert_bwd(block, recompute, res, cotangents):
    x_rd, start, padded, w_stack, layer, h_rf = res
    dy_rd, sinks = cotangents
    dtype = x_rd.dtype

    def expert(e, carry):
        w = _expert_weights((layer, e), *w_stack, dtype)

        def body(carry, first, size):
            dx, sinks = carry
            rows = lambda a: jax.lax.dynamic_slice_in_dim(a, first, size)  # noqa: E731
            xb = rows(x_rd)
            hb = gate_up(xb, w[0]) if recompute else rows(h_rf)
            dxb, *grads = swiglu_backward(xb, hb, rows(dy_rd), *w)
            dx = jax.lax.dynamic_update_slice_in_dim(dx, dxb, first, 0)
            return dx, tuple(_add_at(s, (layer, e), g) for s, g in zip(sinks, grads, strict=True))

        return _each_block(start[e], padded[e], block, body, carry, x_rd.shape[0])

    dx, sinks = jax.lax.fori_loop(0, w_stack[0].shape[1], expert, (jnp.zeros_like(x_rd), sinks))
    return dx, None, None, None, None, None, *sinks


expert_swiglu.defvjp(_expert_fwd, _expert_bwd)


def _add_at(stack, index: tuple, g):
    """stack[index] += g, in place when stack is a loop carry (a dynamic-update-slice; an
    .at[].add would be a scatter, a serial loop on XLA:CPU)."""
    start, shape = index + (0,) * g.ndim, (1,) * len(index) + g.shape
    now = jax.lax.dynamic_slice(stack, start, shape)
    return jax.lax.dynamic_update_slice(stack, now + g.astype(stack.dtype).reshape(shape), start)


# ------------------------------------------------- static-bound block scan (counted)


def scan_swiglu(x_rd, rows: ExpertRows, block: int, w_gate_up, w_down):
    """x_rd [R, D] laid out by `rows` (in blocks of smallest_block(block) rows), through one
    layer's weights [E, ...] as a scan over the static bound of blocks: -> y [R, D]."""
    x_nsd = x_rd.reshape(-1, smallest_block(block), x_rd.shape[-1])  # [R/S, S, D]
    y = block_swiglu(x_nsd, rows.block_expert, rows.n_used, w_gate_up, w_down)
    return y.reshape(x_rd.shape)


@jax.custom_vjp
def block_swiglu(x_nbd, block_expert, n_used, w_gate_up, w_down):
    """block_expert [N] expert of each block; blocks >= n_used are padding and give zeros."""
    return _block_forward(x_nbd, block_expert, n_used, w_gate_up, w_down)[0]


def _block_forward(x_nbd, block_expert, n_used, w_gate_up, w_down):
    dtype, f = x_nbd.dtype, w_gate_up.shape[-1]

    def one(_, inputs):
        i, xb, e = inputs

        def compute(xb):
            return swiglu_forward(xb, *_expert_weights((e,), w_gate_up, w_down, dtype))

        def skip(xb):
            return jnp.zeros_like(xb), jnp.zeros(xb.shape[:1] + (2 * f,), dtype)

        return None, jax.lax.cond(i < n_used, compute, skip, xb)

    idx = jnp.arange(x_nbd.shape[0])
    # Unrolled: this form exists for XLA's FLOP count, which counts a loop body once.
    _, (y, h) = jax.lax.scan(one, None, (idx, x_nbd, block_expert), unroll=True)
    return y, h


def _block_fwd(x_nbd, block_expert, n_used, w_gate_up, w_down):
    y, h = _block_forward(x_nbd, block_expert, n_used, w_gate_up, w_down)
    return y, (x_nbd, block_expert, n_used, w_gate_up, w_down, h)


def _block_bwd(res, dy_nbd):
    x_nbd, block_expert, n_used, w_gate_up, w_down, h_nbf = res
    dtype = x_nbd.dtype

    def one(grads, inputs):
        i, xb, e, h, dy = inputs

        def compute(grads):
            w = _expert_weights((e,), w_gate_up, w_down, dtype)
            dx, *dw = swiglu_backward(xb, h, dy, *w)
            # in place: one expert's slice of each gradient
            return tuple(a.at[e].add(d.astype(a.dtype)) for a, d in zip(grads, dw, strict=True)), dx

        def skip(grads):
            return grads, jnp.zeros_like(xb)

        return jax.lax.cond(i < n_used, compute, skip, grads)

    zeros = (jnp.zeros_like(w_gate_up), jnp.zeros_like(w_down))
    idx = jnp.arange(x_nbd.shape[0])
    xs = (idx, x_nbd, block_expert, h_nbf, dy_nbd)
    (dwgu, dwd), dx = jax.lax.scan(one, zeros, xs, unroll=True)
    return dx, None, None, dwgu, dwd


block_swiglu.defvjp(_block_fwd, _block_bwd)


# ------------------------------------------- one batched matmul over all blocks (GPU)


@jax.custom_vjp
def batched_swiglu(x_nbd, block_expert, w_gate_up, w_down):
    """Every block of rows [N, B, D] through its expert's weights in one batched matmul.

    The GPU form: no loop (a GPU while loop syncs with the host on every trip) and big
    cuBLAS batches, for the price of copying each block's expert weights ([N, D, 2F] and
    [N, F, D]) and computing the padding blocks. Padding blocks hold zero rows, so they
    add nothing to any gradient.
    """
    return _batched_fwd(x_nbd, block_expert, w_gate_up, w_down)[0]


def _per_block(w, block_expert, dtype):
    return jnp.take(w.astype(dtype), block_expert, axis=0)  # [N, ...]: block n's expert


def _batched_fwd(x_nbd, block_expert, w_gate_up, w_down):
    w = [_per_block(m, block_expert, x_nbd.dtype) for m in (w_gate_up, w_down)]
    y, h = jax.vmap(swiglu_forward)(x_nbd, *w)
    return y, (x_nbd, block_expert, w_gate_up, w_down, h)


def _batched_bwd(res, dy_nbd):
    x_nbd, block_expert, w_gate_up, w_down, h = res
    w = [_per_block(m, block_expert, x_nbd.dtype) for m in (w_gate_up, w_down)]
    dx, *dw_blocks = jax.vmap(swiglu_backward)(x_nbd, h, dy_nbd, *w)  # dW per block [N, ...]
    # Sum each block's weight gradient into its expert's: a [E, N] one-hot matmul, which
    # is deterministic on GPU (a segment sum would be a scatter-add of atomics).
    n_experts = w_gate_up.shape[0]
    one_hot = jax.nn.one_hot(block_expert, n_experts, axis=0, dtype=x_nbd.dtype)  # [E, N]
    dw = [
        jnp.einsum("en,n...->e...", one_hot, d, preferred_element_type=jnp.float32).astype(m.dtype)
        for d, m in zip(dw_blocks, (w_gate_up, w_down), strict=True)
    ]
    return dx, None, *dw


batched_swiglu.defvjp(_batched_fwd, _batched_bwd)

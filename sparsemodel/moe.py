"""Mixture-of-Experts layer: float32 router, index-based dispatch, SwiGLU experts.

    route    x[T, D] -> probabilities p[T, E], choices e[T, k], weights w[T, k]   (float32)
    dispatch (token, choice) assignments -> rows of an expert-major buffer      (by index)
    experts  SwiGLU on each expert's rows                                       (stacked weights)
    combine  y[t] = sum_j w[t, j] * expert_out[row of (t, j)]                   (by index)

Dispatch strategies (`moe.dispatch`), same maths:
  capacity  each expert takes at most C = ceil(k*T/E * capacity_factor) assignments, in
            token-major priority (all of token t's choices beat token t+1's); the rest are
            dropped (contribute zero; the residual stream carries the token).
  dropless  every assignment is computed: rows sorted by expert and run through a grouped
            matmul. `jax.lax.ragged_dot` is a real grouped GEMM on GPU/TPU but on XLA:CPU it
            computes every expert on every row (E times the FLOPs), so on CPU we pad each
            expert's rows to a multiple of `moe.block_size` and loop over blocks.
Expert choice (`moe.router = "expert_choice"`): each expert picks its top-C tokens of the
group. It looks at the whole group at once, so it is NOT causal: a token's output can
depend on later tokens. Use it for encoders or experiments, not for generation.

Statistics and auxiliary losses are returned explicitly as `MoEStats`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparsemodel.config import Config
from sparsemodel.grouped_matmul import block_swiglu
from sparsemodel.layers import MLP, param


class MoEStats(NamedTuple):
    """Per-layer router losses and load statistics (all float32)."""

    lb_loss: jax.Array  # [] Switch load balance, 1.0 when perfectly balanced
    z_loss: jax.Array  # [] mean squared log-partition of the router logits
    load: jax.Array  # [E] fraction of assignments routed to each expert (sums to 1)
    dropped: jax.Array  # [] fraction of assignments dropped (capacity) / tokens unserved (EC)
    entropy: jax.Array  # [] mean router entropy in nats
    max_load: jax.Array  # [] max over experts of load * E (1.0 when balanced)


class Routing(NamedTuple):
    experts: jax.Array  # [T, k] int32 chosen expert per assignment; E marks padding tokens
    weights: jax.Array  # [T, k] float32 combine weights


def grouped_matmul_kind(cfg: Config) -> str:
    """'ragged_dot' on accelerators, 'blocks' on CPU (where ragged_dot is a dense fallback)."""
    kind = cfg.moe.grouped_matmul
    if kind == "auto":
        return "blocks" if jax.default_backend() == "cpu" else "ragged_dot"
    return kind


class MoE(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m, e = cfg.model, cfg.moe
        self.cfg = cfg
        std, out_std = m.init_std, m.init_std / (2 * m.n_layers) ** 0.5
        n, d, f = e.num_experts, m.d_model, e.d_expert
        self.w_router = param(rngs, (d, n), ("embed", None), std)
        self.w_gate = param(rngs, (n, d, f), ("exp", "embed", "mlp"), std)
        self.w_up = param(rngs, (n, d, f), ("exp", "embed", "mlp"), std)
        self.w_down = param(rngs, (n, f, d), ("exp", "mlp", "embed"), out_std)
        self.shared = MLP(d, e.num_shared * f, cfg, rngs=rngs) if e.num_shared else None

    def __call__(self, x_td, mask_t=None, key=None) -> tuple[jax.Array, MoEStats]:
        """x_td [T, D] (compute dtype), mask_t [T] bool or None, key: jitter PRNG key or None.

        Returns y [T, D] and this layer's MoEStats.
        """
        e = self.cfg.moe
        t = x_td.shape[0]
        if mask_t is None:
            mask_t = jnp.ones((t,), bool)
        with jax.named_scope("router"):
            logits, probs = self.route_probs(x_td, key)  # [T, E] f32
        if e.router == "expert_choice":
            y, routing, dropped = self._expert_choice(x_td, probs, mask_t)
        else:
            routing = top_k_routing(probs, mask_t, e.top_k, e.renormalize)
            y, dropped = self._token_choice(x_td, routing)
        if self.shared is not None:
            y = y + self.shared(x_td)
        return y, router_stats(logits, probs, routing, mask_t, dropped)

    def route_probs(self, x_td, key=None):
        x32 = x_td.astype(jnp.float32)
        if key is not None and self.cfg.moe.jitter > 0:
            eps = self.cfg.moe.jitter
            x32 = x32 * jax.random.uniform(key, x32.shape, jnp.float32, 1 - eps, 1 + eps)
        logits = x32 @ self.w_router[...]  # [T, E], float32 whatever the compute dtype
        return logits, jax.nn.softmax(logits, axis=-1)

    # ------------------------------------------------------------------ token choice

    def _token_choice(self, x_td, routing: Routing):
        e = self.cfg.moe
        if e.dispatch == "capacity":
            capacity = expert_capacity(x_td.shape[0], e.top_k, e.num_experts, e.capacity_factor)
            rows, keep = capacity_rows(routing.experts, e.num_experts, capacity)
            with jax.named_scope("dispatch"):
                xb = gather_rows(x_td, rows, routing, e.num_experts * capacity)
            with jax.named_scope("experts"):
                yb = self.batched_experts(xb.reshape(e.num_experts, capacity, -1))
            y = combine_rows(yb.reshape(e.num_experts * capacity, -1), rows, routing, keep)
            dropped = 1.0 - _masked_mean(keep, routing.experts < e.num_experts)
            return y, dropped
        if grouped_matmul_kind(self.cfg) == "ragged_dot":
            return self._dropless_ragged(x_td, routing), jnp.zeros((), jnp.float32)
        return self._dropless_blocks(x_td, routing), jnp.zeros((), jnp.float32)

    def _dropless_blocks(self, x_td, routing: Routing):
        e = self.cfg.moe
        n_assign = routing.experts.size
        rows, block_expert, n_blocks = block_rows(routing.experts, e.num_experts, e.block_size)
        total_rows = block_expert.shape[0] * e.block_size
        with jax.named_scope("dispatch"):
            xr = gather_rows(x_td, rows, routing, total_rows)  # [N_blocks*B, D]
        with jax.named_scope("experts"):
            yr = block_swiglu(
                xr.reshape(-1, e.block_size, xr.shape[-1]),
                block_expert,
                n_blocks,
                self.w_gate[...],
                self.w_up[...],
                self.w_down[...],
            ).reshape(total_rows, -1)
        keep = jnp.ones((n_assign,), bool).reshape(routing.experts.shape)
        return combine_rows(yr, rows, routing, keep & (routing.experts < e.num_experts))

    def _dropless_ragged(self, x_td, routing: Routing):
        e = self.cfg.moe
        dtype = x_td.dtype
        n, k = routing.experts.shape
        flat_e = routing.experts.reshape(-1)  # [A]; padding tokens carry E
        order = jnp.argsort(flat_e, stable=True)
        # ragged_dot needs every row in a group: padding rows ride in the last expert,
        # with weight zero in the combine.
        group_sizes = jnp.bincount(jnp.minimum(flat_e, e.num_experts - 1), length=e.num_experts)
        with jax.named_scope("dispatch"):
            xs = x_td[order // k]  # [A, D] rows sorted by expert
        with jax.named_scope("experts"):
            g = jax.lax.ragged_dot(xs, self.w_gate[...].astype(dtype), group_sizes)
            u = jax.lax.ragged_dot(xs, self.w_up[...].astype(dtype), group_sizes)
            ys = jax.lax.ragged_dot(jax.nn.silu(g) * u, self.w_down[...].astype(dtype), group_sizes)
        with jax.named_scope("combine"):
            y_a = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # unsort -> [T, k, D]
            w = jnp.where(routing.experts < e.num_experts, routing.weights, 0.0)
            return jnp.einsum("tkd,tk->td", y_a, w.astype(dtype))

    def batched_experts(self, xb_ecd):
        """SwiGLU of each expert on its own buffer: [E, C, D] -> [E, C, D]."""
        dtype = xb_ecd.dtype
        g = jnp.einsum("ecd,edf->ecf", xb_ecd, self.w_gate[...].astype(dtype))
        u = jnp.einsum("ecd,edf->ecf", xb_ecd, self.w_up[...].astype(dtype))
        return jnp.einsum("ecf,efd->ecd", jax.nn.silu(g) * u, self.w_down[...].astype(dtype))

    # ----------------------------------------------------------------- expert choice

    def _expert_choice(self, x_td, probs, mask_t):
        e = self.cfg.moe
        t = x_td.shape[0]
        capacity = min(t, expert_capacity(t, e.top_k, e.num_experts, e.capacity_factor))
        with jax.named_scope("dispatch"):
            scores = jnp.where(mask_t[:, None], probs, -1.0).T  # [E, T]
            weight_ec, token_ec = jax.lax.top_k(scores, capacity)  # [E, C]
            weight_ec = jnp.where(weight_ec >= 0, weight_ec, 0.0)
            xb = x_td[token_ec]  # [E, C, D]
        with jax.named_scope("experts"):
            yb = self.batched_experts(xb)
        with jax.named_scope("combine"):
            contrib = yb * weight_ec[..., None].astype(yb.dtype)
            y = (
                jnp.zeros_like(x_td)
                .at[token_ec.reshape(-1)]
                .add(contrib.reshape(-1, x_td.shape[1]))
            )
        # Express as per-token assignment counts for the shared statistics.
        expert_ec = jnp.broadcast_to(jnp.arange(e.num_experts)[:, None], token_ec.shape)
        served = jnp.zeros((t, e.num_experts), bool).at[token_ec, expert_ec].set(weight_ec > 0)
        dropped = 1.0 - _masked_mean(served.any(-1), mask_t)
        routing = Routing(
            experts=jnp.where(served, jnp.arange(e.num_experts), e.num_experts),
            weights=jnp.where(served, probs, 0.0),
        )
        return y, routing, dropped


# ------------------------------------------------------------------- routing maths


def top_k_routing(probs, mask_t, k: int, renormalize: bool) -> Routing:
    """Top-k of the full softmax. k=1 keeps the softmax probability (Switch), so the router
    gets gradient from the LM loss; k>1 optionally renormalises the k weights to sum 1."""
    top_p, top_e = jax.lax.top_k(probs, k)  # [T, k]
    if renormalize and k > 1:
        top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
    n_experts = probs.shape[-1]
    top_e = jnp.where(mask_t[:, None], top_e, n_experts)  # padding tokens route nowhere
    return Routing(experts=top_e.astype(jnp.int32), weights=top_p)


def router_stats(logits, probs, routing: Routing, mask_t, dropped) -> MoEStats:
    """Switch load-balance loss, ST-MoE z-loss and load statistics over non-padding tokens."""
    n_experts = probs.shape[-1]
    valid = mask_t.astype(jnp.float32)
    n_tokens = jnp.maximum(valid.sum(), 1.0)
    counts = jnp.zeros((n_experts + 1,), jnp.float32).at[routing.experts.reshape(-1)].add(1.0)
    load = counts[:n_experts] / jnp.maximum(counts[:n_experts].sum(), 1.0)  # f_e
    mean_prob = (probs * valid[:, None]).sum(0) / n_tokens  # P_e
    lse = jax.nn.logsumexp(logits, axis=-1)
    entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-20)), axis=-1)
    return MoEStats(
        lb_loss=n_experts * jnp.sum(load * mean_prob),
        z_loss=jnp.sum(valid * lse**2) / n_tokens,
        load=load,
        dropped=jnp.asarray(dropped, jnp.float32),
        entropy=jnp.sum(valid * entropy) / n_tokens,
        max_load=n_experts * jnp.max(load),
    )


def expert_capacity(n_tokens: int, k: int, n_experts: int, factor: float) -> int:
    return max(1, math.ceil(k * n_tokens / n_experts * factor))


def _masked_mean(x, mask):
    mask = mask.astype(jnp.float32)
    return jnp.sum(x.astype(jnp.float32) * mask) / jnp.maximum(mask.sum(), 1.0)


# -------------------------------------------------------------- index-based dispatch


def _rank_within_expert(flat_e, n_experts: int):
    """Position of each assignment among those of its expert, in token-major order.

    flat_e [A] (E = padding). Returns rank [A] and counts [E+1]. A stable sort keeps
    token-major order inside each expert, which is the capacity priority order.
    """
    n = flat_e.shape[0]
    order = jnp.argsort(flat_e, stable=True)
    counts = jnp.bincount(flat_e, length=n_experts + 1)
    starts = jnp.cumsum(counts) - counts
    sorted_e = flat_e[order]
    rank_sorted = jnp.arange(n) - starts[sorted_e]
    rank = jnp.zeros((n,), jnp.int32).at[order].set(rank_sorted.astype(jnp.int32))
    return rank, counts


def capacity_rows(experts_tk, n_experts: int, capacity: int):
    """Row of each assignment in an [E*C] buffer (E*C = dropped) and the keep mask [T, k]."""
    flat_e = experts_tk.reshape(-1)
    rank, _ = _rank_within_expert(flat_e, n_experts)
    keep = (rank < capacity) & (flat_e < n_experts)
    rows = jnp.where(keep, flat_e * capacity + rank, n_experts * capacity)
    return rows.reshape(experts_tk.shape), keep.reshape(experts_tk.shape)


def block_rows(experts_tk, n_experts: int, block: int):
    """Dropless layout: each expert's rows padded to a multiple of `block`.

    Returns rows [T, k] (index into the padded buffer; padding tokens -> one past the end),
    block_expert [N_blocks] (the expert of each block) and the number of blocks in use.
    N_blocks = ceil(A/block) + E is a static bound on sum_e ceil(count_e / block).
    """
    flat_e = experts_tk.reshape(-1)
    n_assign = flat_e.shape[0]
    n_blocks = -(-n_assign // block) + n_experts
    rank, counts = _rank_within_expert(flat_e, n_experts)
    blocks_per_expert = -(-counts[:n_experts] // block)  # [E]
    block_end = jnp.cumsum(blocks_per_expert)  # [E]
    block_start = block_end - blocks_per_expert
    safe_e = jnp.minimum(flat_e, n_experts - 1)
    rows = jnp.where(flat_e < n_experts, block_start[safe_e] * block + rank, n_blocks * block)
    block_expert = jnp.searchsorted(block_end, jnp.arange(n_blocks), side="right")
    block_expert = jnp.minimum(block_expert, n_experts - 1).astype(jnp.int32)
    return rows.reshape(experts_tk.shape), block_expert, block_end[-1]


def gather_rows(x_td, rows_tk, routing: Routing, n_rows: int):
    """Buffer [n_rows, D] whose row r holds the token assigned to r (zeros if none)."""
    t, k = rows_tk.shape
    token = jnp.broadcast_to(jnp.arange(t)[:, None], (t, k)).reshape(-1)
    # Invert the assignment -> row map with an integer scatter, then gather the features:
    # O(A) indices plus O(rows * D) copy, never a [T, E, C] one-hot.
    src = jnp.full((n_rows + 1,), t, jnp.int32).at[rows_tk.reshape(-1)].set(token)[:n_rows]
    x_pad = jnp.concatenate([x_td, jnp.zeros((1, x_td.shape[1]), x_td.dtype)])  # row T = zeros
    return x_pad[src]


def combine_rows(y_rd, rows_tk, routing: Routing, keep_tk):
    """y[t] = sum_j w[t, j] * y_rd[rows[t, j]] over kept assignments: [T, D]."""
    with jax.named_scope("combine"):
        y_pad = jnp.concatenate([y_rd, jnp.zeros((1, y_rd.shape[1]), y_rd.dtype)])
        rows = jnp.minimum(rows_tk, y_rd.shape[0])
        y_tkd = y_pad[rows]  # [T, k, D]
        w = jnp.where(keep_tk, routing.weights, 0.0).astype(y_rd.dtype)
        return jnp.einsum("tkd,tk->td", y_tkd, w)

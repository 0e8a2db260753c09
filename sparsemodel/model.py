"""Decoder-only transformer with dense and MoE layers, scanned over depth.

Depth is organised so that `jax.lax.scan` runs over identical units:

    prefix   moe.first_dense dense blocks                       (scanned, may be empty)
    groups   repeating units of moe.every blocks: (every-1) dense blocks then one MoE block
             (a dense model: units of one dense block), scanned; with model.share_layers=g
             only g blocks' worth of units are unique and the scan runs over them
             n_layers/g times (ALBERT-style sharing: fewer parameters, same FLOPs).

Compile time therefore does not grow with depth.

With moe.pool=global the MoE layers hold only their routers: the routed experts are one
ExpertPool outside the scanned units, handed to every MoE layer of every pass as values
(`Transformer._scan`), so its gradient is the sum of every layer's.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparsemodel import kernels
from sparsemodel.config import Config
from sparsemodel.grouped_matmul import StackedExperts
from sparsemodel.layers import MLP, Attention, KVCache, RMSNorm, param
from sparsemodel.moe import ExpertPool, MoE, MoEStats, counts_per_sequence

REMAT_POLICIES = {
    "full": None,  # save nothing, recompute everything in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Embed(nnx.Module):
    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m = cfg.model
        self.embedding = param(rngs, (m.vocab_size, m.d_model), ("vocab", "embed"), m.init_std)

    def __call__(self, tokens):
        return jnp.take(self.embedding[...], tokens, axis=0)  # [B, T, D]

    def attend(self, x):
        """Tied unembedding: logits against the embedding table."""
        return x @ self.embedding[...].astype(x.dtype).T  # [..., V]


class BlockCache(NamedTuple):
    """What one block carries from one decoding call to the next."""

    kv: KVCache
    # [B, E] int32 assignments each sequence's experts kept so far: MoE blocks with capacity
    # per sequence (moe.counts_per_sequence) only, else None.
    expert_counts: jax.Array | None


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + ffn(norm(x)) with a dense or MoE ffn."""

    def __init__(self, cfg: Config, kind: str, *, rngs: nnx.Rngs):
        d = cfg.model.d_model
        self.is_moe = kind == "moe"
        self.attn_norm = RMSNorm(d, cfg.model.norm_eps, rngs=rngs)
        self.attn = Attention(cfg, rngs=rngs)
        self.ffn_norm = RMSNorm(d, cfg.model.norm_eps, rngs=rngs)
        self.ffn = MoE(cfg, rngs=rngs) if self.is_moe else MLP(d, cfg.model.d_ff, cfg, rngs=rngs)

    def __call__(
        self, x_btd, positions, mask, key, cache: BlockCache | None, experts=None, pool=None
    ):
        """x [B, T, D] -> (x, MoEStats or None, the new cache, experts): experts, the layer
        scan's StackedExperts or None, comes back with this block's gradient sink; pool: the
        global expert pool's weights (moe.pool=global) or None."""
        h, kv = self.attn(self.attn_norm(x_btd), positions, None if cache is None else cache.kv)
        x_btd = x_btd + h
        b, t, d = x_btd.shape
        h_nd = self.ffn_norm(x_btd).reshape(b * t, d)  # flatten: faster matmuls (seq_len=t below)
        counts = None if cache is None else cache.expert_counts
        if self.is_moe:
            mask_n = None if mask is None else mask.reshape(b * t)
            out = self.ffn(
                h_nd, mask_n, key, seq_len=t, expert_counts=counts, experts=experts, pool=pool
            )
            y_nd, stats, counts, experts = out
        else:
            y_nd, stats = self.ffn(h_nd), None
        cache = None if cache is None else BlockCache(kv, counts)
        return x_btd + y_nd.reshape(b, t, d), stats, cache, experts


class Unit(nnx.Module):
    """The scanned unit: one or more blocks whose kinds are fixed by the config."""

    def __init__(self, cfg: Config, kinds: tuple[str, ...], *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, k, rngs=rngs) for k in kinds])

    def __call__(self, x, positions, mask, key, caches, experts=None, pool=None):
        """-> (x, stats, caches, experts); experts, pool: see Block (Transformer._scan)."""
        stats = None
        new_caches = []
        for i, block in enumerate(self.blocks):
            cache = None if caches is None else caches[i]
            x, s, c, experts = block(x, positions, mask, key, cache, experts, pool)
            stats = s if s is not None else stats  # at most one MoE block per unit
            new_caches.append(c)
        return x, stats, None if caches is None else tuple(new_caches), experts


def _stacked(make, n: int, rngs: nnx.Rngs):
    """n independently initialised copies of a module, stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return make(rngs)

    return create(rngs)


class Transformer(nnx.Module):
    """tokens int32 [B, S] -> logits float32 [B, S, V], MoEStats stacked over MoE layers."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.train.dtype)
        plan = cfg.layer_plan()
        self.repeats = plan.repeats
        self.embed = Embed(cfg, rngs=rngs)
        self.prefix = (
            _stacked(lambda r: Unit(cfg, ("dense",), rngs=r), plan.prefix, rngs)
            if plan.prefix
            else None
        )
        self.units = _stacked(lambda r: Unit(cfg, plan.unit, rngs=r), plan.unique_units, rngs)
        self.final_norm = RMSNorm(cfg.model.d_model, cfg.model.norm_eps, rngs=rngs)
        self.unembed = (
            None
            if cfg.model.tie_embeddings
            else param(
                rngs,
                (cfg.model.d_model, cfg.model.vocab_size),
                ("embed", "vocab"),
                cfg.model.init_std,
            )
        )
        global_pool = cfg.is_moe and cfg.moe.pool == "global"
        self.pool = ExpertPool(cfg, rngs=rngs) if global_pool else None

    @classmethod
    def from_config(cls, cfg: Config, *, rngs: nnx.Rngs) -> Transformer:
        return cls(cfg, rngs=rngs)

    def __call__(self, tokens, *, mask=None, key=None) -> tuple[jax.Array, MoEStats | None]:
        """Full causal forward. mask [B, S] bool marks real (non-padding) tokens; key enables
        router jitter (training)."""
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        logits, stats, _ = self.forward(tokens, positions, mask=mask, key=key)
        return logits, stats

    def decode(self, tokens, positions, cache):
        """Runs tokens [B, T] at positions [B, T] against a KV cache -> (logits, new cache)."""
        logits, _, cache = self.forward(tokens, positions, cache=cache)
        return logits, cache

    def init_cache(self, batch: int, max_len: int) -> dict[str, Any]:
        """An empty BlockCache for every block, with leading [repeats, n_unique] axes."""
        m, plan = self.cfg.model, self.cfg.layer_plan()
        shape = (batch, max_len, m.n_kv_heads, m.d_head)

        def block(kind, *lead):
            kv = KVCache(jnp.zeros(lead + shape, self.dtype), jnp.zeros(lead + shape, self.dtype))
            counts = None
            if kind == "moe" and counts_per_sequence(self.cfg):
                counts = jnp.zeros(lead + (batch, self.cfg.moe.num_experts), jnp.int32)
            return BlockCache(kv, counts)

        return {
            "prefix": (block("dense", 1, plan.prefix),) if plan.prefix else None,
            "units": tuple(block(kind, plan.repeats, plan.unique_units) for kind in plan.unit),
        }

    def forward(self, tokens, positions, *, mask=None, key=None, cache=None):
        x = self.embed(tokens).astype(self.dtype)  # [B, S, D]
        cache = cache or {"prefix": None, "units": None}
        new_cache = {}
        if self.prefix is not None:
            x, _, new_cache["prefix"] = self._scan(
                self.prefix, 1, x, positions, mask, None, cache["prefix"]
            )
        pool = None if self.pool is None else self.pool.weights()
        x, stats, new_cache["units"] = self._scan(
            self.units, self.repeats, x, positions, mask, key, cache["units"], pool
        )
        x = self.final_norm(x)
        if self.unembed is None:
            logits = self.embed.attend(x)
        else:
            logits = x @ self.unembed[...].astype(x.dtype)
        return logits.astype(jnp.float32), stats, new_cache

    def _scan(self, units, repeats, x, positions, mask, key, caches, pool=None):
        """Runs a stacked Unit `repeats` times over its depth with jax.lax.scan.

        caches: per block of the unit, a BlockCache with leading [repeats, n_unique] axes.
        pool: the global expert pool's weights (moe.pool=global) or None. Every MoE layer of
        every pass reads it, so its gradient is the sum of theirs: where the kernels read
        experts in place it rides as a stack of one layer (every unit reads layer 0) whose
        sink the passes carry; elsewhere the scan closes over it (JAX sums the gradients of
        what a scan closes over) and the MoE layers take it as their expert weights.
        Returns x, stats stacked over [repeats * n_unique] units, and the new caches.
        """
        graphdef, state = nnx.split(units)
        n_unique = jax.tree.leaves(state)[0].shape[0]
        keys = None if key is None else jax.random.split(key, (repeats, n_unique))
        kern = kernels.choose(self.cfg)
        if pool is None:
            stack, state = self._expert_stack(units, state, repeats, kern)
            layers = jnp.arange(n_unique)
        else:
            stack, pool = _pool_stack(pool, kern)
            layers = jnp.zeros(n_unique, jnp.int32)

        def unit_step(carry, inputs):
            x, sink = carry
            unit_state, unit_key, unit_caches, layer = inputs
            unit = nnx.merge(graphdef, unit_state)
            experts = None if stack is None else StackedExperts.of(stack, layer, sink)
            x, stats, unit_caches, experts = unit(
                x, positions, mask, unit_key, unit_caches, experts, pool
            )
            return (x, None if experts is None else experts.sink), (stats, unit_caches)

        if self.cfg.train.remat != "none":
            unit_step = jax.checkpoint(unit_step, policy=REMAT_POLICIES[self.cfg.train.remat])

        def one_pass(carry, inputs):  # one pass over the unique units; carry: (x, sink)
            pass_keys, pass_caches = inputs
            xs = (state, pass_keys, pass_caches, layers)
            return jax.lax.scan(unit_step, carry, xs, unroll=kern.unroll)

        if repeats == 1:
            # No loop over passes: its backward would accumulate the parameters' gradient in a
            # zero-filled carry, a full extra pass over every gradient (most of them experts').
            inputs = jax.tree.map(lambda a: a[0], (keys, caches))
            (x, _), (stats, caches) = one_pass((x, stack), inputs)
            stats, caches = jax.tree.map(lambda a: a[None], (stats, caches))
        else:
            # The sink (a pool's only: per-layer stacks are not read in place here) rides
            # through the passes, each adding its layers' gradient.
            (x, _), (stats, caches) = jax.lax.scan(
                one_pass, (x, stack), (keys, caches), length=repeats, unroll=kern.unroll
            )
        stats = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), stats)
        return x, stats, caches

    def _expert_stack(self, units, state, repeats: int, kern: kernels.Kernels):
        """(stack, state): the MoE block's expert weights [U, E, ...] where the kernels read
        them in place (kernels.Kernels.experts_in_place, one pass over the units), else
        None; and the scan's per-unit inputs, whose copies of those weights then carry no
        gradient (their slices go unused; the stack rides in the scan's carry as the
        gradient's sink, grouped_matmul.StackedExperts)."""
        moe_blocks = [i for i, block in enumerate(units.blocks) if block.is_moe]
        if not moe_blocks or repeats != 1 or not kern.experts_in_place:
            return None, state
        names = ("w_gate_up", "w_down")
        ffn = state["blocks"][moe_blocks[0]]["ffn"]
        stack = tuple(ffn[n][...] for n in names)
        no_grad = jax.tree.map(lambda x: x, state)  # a new State: the caller's stays as it is
        ffn = no_grad["blocks"][moe_blocks[0]]["ffn"]
        for n in names:
            ffn[n] = ffn[n].replace(jax.lax.stop_gradient(ffn[n][...]))
        return stack, no_grad


def _pool_stack(pool, kern: kernels.Kernels):
    """(stack, pool) for Transformer._scan: where the kernels read experts in place, the pool
    as a stack of one layer ([1, E, ...], read in place; its sink takes every layer's
    gradient) and the pool's weights without gradient (the layers read only their shapes);
    elsewhere no stack, and the pool as it is."""
    if not kern.experts_in_place:
        return None, pool
    stack = (pool["gate_up"][None], pool["down"][None])
    return stack, jax.lax.stop_gradient(pool)


def aux_losses(stats: MoEStats | None) -> tuple[jax.Array, jax.Array]:
    """Load-balance and z-loss averaged over MoE layers (zeros for a dense model)."""
    if stats is None:
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    return stats.lb_loss.mean(), stats.z_loss.mean()

"""Decoder-only transformer with dense and MoE layers, scanned over depth.

Depth is organised so that `jax.lax.scan` runs over identical units:

    prefix   moe.first_dense dense blocks                       (scanned, may be empty)
    groups   repeating units of moe.every blocks: (every-1) dense blocks then one MoE block
             (a dense model: units of one dense block), scanned; with model.share_layers=g
             only g blocks' worth of units are unique and the scan runs over them
             n_layers/g times (ALBERT-style sharing: fewer parameters, same FLOPs).

Compile time therefore does not grow with depth.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sparsemodel.config import Config
from sparsemodel.grouped_matmul import ExpertStack
from sparsemodel.layers import MLP, Attention, KVCache, RMSNorm, param
from sparsemodel.moe import MoE, MoEStats, counts_per_sequence, reads_stack_in_place
from sparsemodel.unroll import scan_unroll

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

    def __call__(self, x_btd, positions, mask, key, cache: BlockCache | None, stack=None):
        h, kv = self.attn(self.attn_norm(x_btd), positions, None if cache is None else cache.kv)
        x_btd = x_btd + h
        b, t, d = x_btd.shape
        h_nd = self.ffn_norm(x_btd).reshape(b * t, d)  # flatten: faster matmuls (seq_len=t below)
        counts = None if cache is None else cache.expert_counts
        if self.is_moe:
            mask_n = None if mask is None else mask.reshape(b * t)
            y_nd, stats, counts = self.ffn(
                h_nd, mask_n, key, stack, seq_len=t, expert_counts=counts
            )
        else:
            y_nd, stats = self.ffn(h_nd), None
        cache = None if cache is None else BlockCache(kv, counts)
        return x_btd + y_nd.reshape(b, t, d), stats, cache


class Unit(nnx.Module):
    """The scanned unit: one or more blocks whose kinds are fixed by the config."""

    def __init__(self, cfg: Config, kinds: tuple[str, ...], *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(cfg, k, rngs=rngs) for k in kinds])

    def __call__(self, x, positions, mask, key, caches, stack=None):
        """stack: the MoE block's ExpertStack, or None (see Transformer._scan)."""
        stats = None
        new_caches = []
        for i, block in enumerate(self.blocks):
            x, s, c = block(x, positions, mask, key, None if caches is None else caches[i], stack)
            stats = s if s is not None else stats  # at most one MoE block per unit
            new_caches.append(c)
        return x, stats, None if caches is None else tuple(new_caches)


def _stacked(make, n: int, rngs: nnx.Rngs):
    """n independently initialised copies of a module, stacked on a leading 'layers' axis."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def create(rngs):
        return make(rngs)

    return create(rngs)


def unit_layout(cfg: Config) -> tuple[int, tuple[str, ...], int, int]:
    """(prefix dense blocks, kinds of one unit, unique units, repeats of the unit stack)."""
    prefix = cfg.moe.first_dense if cfg.is_moe else 0
    kinds = ("dense",) * (cfg.moe.every - 1) + ("moe",) if cfg.is_moe else ("dense",)
    n_units = (cfg.model.n_layers - prefix) // len(kinds)
    unique = cfg.model.share_layers // len(kinds) if cfg.model.share_layers else n_units
    return prefix, kinds, unique, n_units // unique


class Transformer(nnx.Module):
    """tokens int32 [B, S] -> logits float32 [B, S, V], MoEStats stacked over MoE layers."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = jnp.dtype(cfg.train.dtype)
        n_prefix, kinds, n_unique, self.repeats = unit_layout(cfg)
        self.embed = Embed(cfg, rngs=rngs)
        self.prefix = (
            _stacked(lambda r: Unit(cfg, ("dense",), rngs=r), n_prefix, rngs) if n_prefix else None
        )
        self.units = _stacked(lambda r: Unit(cfg, kinds, rngs=r), n_unique, rngs)
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
        m = self.cfg.model
        n_prefix, kinds, n_unique, repeats = unit_layout(self.cfg)
        shape = (batch, max_len, m.n_kv_heads, m.d_model // m.n_heads)

        def block(kind, *lead):
            kv = KVCache(jnp.zeros(lead + shape, self.dtype), jnp.zeros(lead + shape, self.dtype))
            counts = None
            if kind == "moe" and counts_per_sequence(self.cfg):
                counts = jnp.zeros(lead + (batch, self.cfg.moe.num_experts), jnp.int32)
            return BlockCache(kv, counts)

        return {
            "prefix": (block("dense", 1, n_prefix),) if n_prefix else None,
            "units": tuple(block(kind, repeats, n_unique) for kind in kinds),
        }

    def forward(self, tokens, positions, *, mask=None, key=None, cache=None):
        x = self.embed(tokens).astype(self.dtype)  # [B, S, D]
        cache = cache or {"prefix": None, "units": None}
        new_cache = {}
        if self.prefix is not None:
            x, _, new_cache["prefix"] = self._scan(
                self.prefix, 1, x, positions, mask, None, cache["prefix"]
            )
        x, stats, new_cache["units"] = self._scan(
            self.units, self.repeats, x, positions, mask, key, cache["units"]
        )
        x = self.final_norm(x)
        if self.unembed is None:
            logits = self.embed.attend(x)
        else:
            logits = x @ self.unembed[...].astype(x.dtype)
        return logits.astype(jnp.float32), stats, new_cache

    def _scan(self, units, repeats, x, positions, mask, key, caches):
        """Runs a stacked Unit `repeats` times over its depth with jax.lax.scan.

        caches: per block of the unit, a BlockCache with leading [repeats, n_unique] axes.
        Returns x, stats stacked over [repeats * n_unique] units, and the new caches.
        """
        graphdef, state = nnx.split(units)
        n_unique = jax.tree.leaves(state)[0].shape[0]
        keys = None if key is None else jax.random.split(key, (repeats, n_unique))
        experts = self._expert_stack(units, state, repeats)

        def unit_step(carry, inputs):
            x, sink = carry
            unit_state, unit_key, unit_caches, layer = inputs
            unit = nnx.merge(graphdef, unit_state)
            if experts is None:
                x, stats, unit_caches = unit(x, positions, mask, unit_key, unit_caches)
                return (x, None), (stats, unit_caches)
            stack = ExpertStack(experts, layer, sink)
            x, stats, unit_caches = unit(x, positions, mask, unit_key, unit_caches, stack)
            if stack.sink[0] is sink[0]:  # the experts' whole gradient goes through the sink
                raise AssertionError("the MoE layer did not run its experts from the stack")
            return (x, stack.sink), (stats, unit_caches)

        if self.cfg.train.remat != "none":
            unit_step = jax.checkpoint(unit_step, policy=REMAT_POLICIES[self.cfg.train.remat])

        def one_pass(x, inputs):  # one pass over the unique units
            pass_keys, pass_caches = inputs
            xs = (state, pass_keys, pass_caches, jnp.arange(n_unique))
            (x, _), outputs = jax.lax.scan(unit_step, (x, experts), xs, unroll=scan_unroll())
            return x, outputs

        if repeats == 1:
            # No loop over passes: its backward would accumulate the parameters' gradient in a
            # zero-filled carry, a full extra pass over every gradient (most of them experts').
            x, (stats, caches) = one_pass(x, jax.tree.map(lambda a: a[0], (keys, caches)))
            stats, caches = jax.tree.map(lambda a: a[None], (stats, caches))
        else:
            x, (stats, caches) = jax.lax.scan(
                one_pass, x, (keys, caches), length=repeats, unroll=scan_unroll()
            )
        stats = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), stats)
        return x, stats, caches

    def _expert_stack(self, units, state, repeats: int):
        """The expert weights [U, E, ...], or None: where the MoE kernel can read the
        stacked expert weights in place (moe.reads_stack_in_place, one pass over the
        units), `state`, the scan's per-unit inputs, keeps them without gradient (their
        slices go unused; changed in place) and the weights themselves ride in the carry
        as the gradient's sink."""
        moe_blocks = [i for i, block in enumerate(units.blocks) if block.is_moe]
        if not moe_blocks or repeats != 1 or not reads_stack_in_place(self.cfg):
            return None
        ffn = state["blocks"][moe_blocks[0]]["ffn"]
        experts = tuple(ffn[n][...] for n in ("w_gate", "w_up", "w_down"))
        for n in ("w_gate", "w_up", "w_down"):
            ffn[n] = ffn[n].replace(jax.lax.stop_gradient(ffn[n][...]))
        return experts


def aux_losses(stats: MoEStats | None) -> tuple[jax.Array, jax.Array]:
    """Load-balance and z-loss averaged over MoE layers (zeros for a dense model)."""
    if stats is None:
        return jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    return stats.lb_loss.mean(), stats.z_loss.mean()

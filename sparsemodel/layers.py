"""Transformer building blocks: RMSNorm, rotary embedding, attention with a KV cache, SwiGLU.

Modules hold only `nnx.Param`s, each annotated with logical axis names (see sharding.py);
randomness (router jitter) arrives as explicit keys, so a stack of blocks can run under a
plain `jax.lax.scan`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsemodel import kernels
from sparsemodel.config import Config, ModelConfig


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    axes: tuple[str | None, ...],
    std: float | None = None,
    value: float | None = None,
) -> nnx.Param:
    """A float32 parameter with logical axis names; normal(std) or constant(value)."""
    assert len(shape) == len(axes), (shape, axes)
    if value is not None:
        x = jnp.full(shape, value, jnp.float32)
    else:
        x = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    # eager_sharding=False: shardings come from our own rules table, applied by sharding.py.
    return nnx.Param(x, out_sharding=axes, eager_sharding=False)


class RMSNorm(nnx.Module):
    """x / rms(x) * scale over the trailing axes of `shape` (the last one by default)."""

    def __init__(
        self,
        shape: int | tuple[int, ...],
        eps: float,
        *,
        rngs: nnx.Rngs,
        axes: tuple[str | None, ...] = ("embed",),
    ):
        shape = (shape,) if isinstance(shape, int) else shape
        self.scale = param(rngs, shape, axes, value=1.0)
        self.eps = eps

    def __call__(self, x):
        # Normalise in float32 whatever the compute dtype: bf16 variance loses precision.
        with jax.named_scope("norm"):  # names its ops in profiles
            x32 = x.astype(jnp.float32)
            over = tuple(range(-self.scale.ndim, 0))  # a mean over a sharded axis: XLA reduces
            x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=over, keepdims=True) + self.eps)
            return (x32 * self.scale[...]).astype(x.dtype)


def rope_frequencies(m: ModelConfig) -> np.ndarray:
    """The rotary frequencies of each pair of head dimensions, float32 [d_head / 2].

    model.rope_scaling=llama3 (Llama 3.1, as transformers computes it): wavelengths shorter
    than rope_original_max_len / rope_high_freq_factor keep their frequency, longer than
    rope_original_max_len / rope_low_freq_factor are slowed by rope_factor, and those
    between blend the two.
    """
    half = m.d_head // 2
    freqs = m.rope_theta ** (-np.arange(half, dtype=np.float64) / half)
    if m.rope_scaling == "llama3":
        low, high, factor = m.rope_low_freq_factor, m.rope_high_freq_factor, m.rope_factor
        wavelen = 2 * np.pi / freqs
        smooth = (m.rope_original_max_len / wavelen - low) / (high - low)
        blended = (1 - smooth) * freqs / factor + smooth * freqs
        long_wave = wavelen > m.rope_original_max_len / low
        short_wave = wavelen < m.rope_original_max_len / high
        freqs = np.where(long_wave, freqs / factor, np.where(short_wave, freqs, blended))
    return freqs.astype(np.float32)


def rope(x, positions, freqs):
    """Rotary embedding (rotate-half form). x [B, T, H, Dh], positions [B, T], freqs [Dh/2]."""
    half = x.shape[-1] // 2
    angles = positions[..., None].astype(jnp.float32) * freqs  # [B, T, Dh/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]  # [B, T, 1, Dh/2]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


class KVCache(NamedTuple):
    """Keys and values of one attention layer for positions [0, S_max)."""

    k: jax.Array  # [B, S_max, Hkv, Dh]
    v: jax.Array  # [B, S_max, Hkv, Dh]


class Attention(nnx.Module):
    """Causal multi-head attention with grouped-query heads (n_kv_heads divides n_heads)."""

    def __init__(self, cfg: Config, *, rngs: nnx.Rngs):
        m = cfg.model
        self.cfg = cfg
        self.n_heads, self.n_kv, self.d_head = m.n_heads, m.n_kv_heads, m.d_head
        std, out_std = m.init_std, m.init_std / (2 * m.n_layers) ** 0.5
        self.wq = param(rngs, (m.d_model, self.n_heads, self.d_head), ("embed", "heads", "kv"), std)
        self.wk = param(rngs, (m.d_model, self.n_kv, self.d_head), ("embed", "heads", "kv"), std)
        self.wv = param(rngs, (m.d_model, self.n_kv, self.d_head), ("embed", "heads", "kv"), std)
        self.wo = param(
            rngs, (self.n_heads, self.d_head, m.d_model), ("heads", "kv", "embed"), out_std
        )
        if m.qkv_bias:
            self.q_bias = param(rngs, (self.n_heads, self.d_head), ("heads", "kv"), value=0.0)
            self.k_bias = param(rngs, (self.n_kv, self.d_head), ("heads", "kv"), value=0.0)
            self.v_bias = param(rngs, (self.n_kv, self.d_head), ("heads", "kv"), value=0.0)
        if m.qk_norm == "head":  # one scale of d_head, shared by every head
            self.q_norm = RMSNorm(self.d_head, m.norm_eps, rngs=rngs, axes=("kv",))
            self.k_norm = RMSNorm(self.d_head, m.norm_eps, rngs=rngs, axes=("kv",))
        elif m.qk_norm == "full":  # over (and scaled per element of) all heads together
            q_shape, kv_shape = (self.n_heads, self.d_head), (self.n_kv, self.d_head)
            self.q_norm = RMSNorm(q_shape, m.norm_eps, rngs=rngs, axes=("heads", "kv"))
            self.k_norm = RMSNorm(kv_shape, m.norm_eps, rngs=rngs, axes=("heads", "kv"))

    def __call__(self, x, positions, cache: KVCache | None = None):
        """x [B, T, D], positions [B, T] -> ([B, T, D], updated cache or None).

        Without a cache, token t attends to tokens <= t of the same call. With a cache
        (decoding), this call's keys are written at `positions` and each query attends to
        cached positions <= its own.
        """
        dtype = x.dtype
        with jax.named_scope("attention"):
            q, k, v = self._project(x)  # [B, T, H, Dh], [B, T, Hkv, Dh] twice
            freqs = rope_frequencies(self.cfg.model)
            q, k = rope(q, positions, freqs), rope(k, positions, freqs)
            if cache is None:
                # positions are 0..T-1 in every row
                out = causal_attention(q, k, v, kernels.choose(self.cfg).attention)
            else:
                batch = jnp.arange(x.shape[0])[:, None]
                cache = KVCache(
                    cache.k.at[batch, positions].set(k.astype(cache.k.dtype)),
                    cache.v.at[batch, positions].set(v.astype(cache.v.dtype)),
                )
                k, v = cache.k.astype(dtype), cache.v.astype(dtype)
                key_pos = jnp.broadcast_to(jnp.arange(k.shape[1]), k.shape[:2])  # [B, S_max]
                out = attend(q, k, v, positions, key_pos)
            y = jnp.einsum("bthk,hkd->btd", out, self.wo[...].astype(dtype))  # [B, T, D]
        return y, cache

    def _project(self, x):
        """q, k, v of x [B, T, D]: the projections, their biases and q/k norms (before RoPE)."""
        dtype = x.dtype
        q = jnp.einsum("btd,dhk->bthk", x, self.wq[...].astype(dtype))  # [B, T, H, Dh]
        k = jnp.einsum("btd,dhk->bthk", x, self.wk[...].astype(dtype))  # [B, T, Hkv, Dh]
        v = jnp.einsum("btd,dhk->bthk", x, self.wv[...].astype(dtype))  # [B, T, Hkv, Dh]
        if self.cfg.model.qkv_bias:
            q = q + self.q_bias[...].astype(dtype)
            k = k + self.k_bias[...].astype(dtype)
            v = v + self.v_bias[...].astype(dtype)
        if self.cfg.model.qk_norm != "none":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v


def causal_attention(q, k, v, implementation: str):
    """Causal attention of a call's tokens to each other. q [B,T,H,Dh], k/v [B,T,Hkv,Dh].

    implementation 'cudnn' (GPU, bf16/fp16; kernels.choose) is cuDNN's fused (flash)
    kernel, which never holds the [B, H, T, T] scores in memory; 'xla' is XLA's einsum
    form, the same maths as `attend`.
    """
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True, implementation="cudnn" if implementation == "cudnn" else None
    )


def attend(q, k, v, q_pos, k_pos):
    """Causal softmax attention by position. q [B,T,H,Dh], k/v [B,S,Hkv,Dh] -> [B,T,H,Dh]."""
    b, t, h, dh = q.shape
    n_kv = k.shape[2]
    q = q.reshape(b, t, n_kv, h // n_kv, dh)  # [B, T, Hkv, G, Dh]
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(dh)
    mask = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)  # [B, T, Hkv, G, Dh]
    return out.reshape(b, t, h, dh)


class MLP(nnx.Module):
    """SwiGLU MLP on flattened tokens (a [B*T, D] matmul trains faster than [B, T, D] on CPU)."""

    def __init__(self, d_model: int, d_ff: int, cfg: Config, *, rngs: nnx.Rngs):
        std, out_std = cfg.model.init_std, cfg.model.init_std / (2 * cfg.model.n_layers) ** 0.5
        self.w_gate = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.w_up = param(rngs, (d_model, d_ff), ("embed", "mlp"), std)
        self.w_down = param(rngs, (d_ff, d_model), ("mlp", "embed"), out_std)

    def __call__(self, x_nd):
        with jax.named_scope("mlp"):  # names its ops in profiles
            return swiglu(x_nd, self.w_gate[...], self.w_up[...], self.w_down[...])


def swiglu(x_nd, w_gate, w_up, w_down):
    """silu(x W_gate) * (x W_up) W_down in x's dtype: [N, D] -> [N, D]."""
    dtype = x_nd.dtype
    h = jax.nn.silu(x_nd @ w_gate.astype(dtype)) * (x_nd @ w_up.astype(dtype))  # [N, F]
    return h @ w_down.astype(dtype)

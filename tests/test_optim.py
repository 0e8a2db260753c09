"""The optimizer: our gradient clip against optax's, and checkpoint-compatible state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsemodel import optim


@pytest.mark.parametrize("max_norm", [0.5, 100.0])  # clipped, and left alone
def test_clip_equals_optax_clip_and_keeps_its_state(max_norm):
    grads = {
        "w": jax.random.normal(jax.random.key(0), (8, 16)),
        "b": jnp.arange(5.0),
    }
    ours, ref = optim.clip_by_global_norm(max_norm), optax.clip_by_global_norm(max_norm)
    got, state = ours.update(grads, ours.init(grads))
    want, ref_state = ref.update(grads, ref.init(grads))
    for k in grads:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6)
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    norm = float(optax.tree.norm(got))
    assert norm == pytest.approx(min(max_norm, float(optax.tree.norm(grads))), rel=1e-6)
    if max_norm == 100.0:  # under the limit: untouched, bit for bit
        for k in grads:
            np.testing.assert_array_equal(got[k], grads[k])


def test_weight_decay_skips_norm_scales_and_every_bias():
    """Matrices decay; norm scales (block norms, q/k norms) and biases (q_bias, ...) do not."""
    from flax import nnx

    from sparsemodel import config, model

    overrides = {"model.qkv_bias": True, "model.qk_norm": "head", "moe.num_shared": 1}
    cfg = config.load("tiny", {**overrides, "moe.shared_gate": True})
    lm = nnx.eval_shape(lambda: model.Transformer.from_config(cfg, rngs=nnx.Rngs(0)))
    mask = nnx.to_pure_dict(optim.decay_mask(nnx.state(lm, nnx.Param)))
    attn = mask["units"]["blocks"][0]["attn"]
    assert attn["wq"] is True and attn["wo"] is True
    assert not any(attn[f"{n}_bias"] for n in "qkv")
    assert not attn["q_norm"]["scale"] and not attn["k_norm"]["scale"]
    assert not mask["units"]["blocks"][0]["attn_norm"]["scale"]
    assert mask["units"]["blocks"][0]["ffn"]["w_shared_sigmoid"] is True


def test_bfloat16_moments_are_stored_in_bfloat16_and_track_float32_adamw():
    """train.moment_dtype=bfloat16 keeps AdamW's moments in bfloat16 (half the state) and
    takes nearly the float32 optimizer's steps."""
    import dataclasses

    from sparsemodel import config
    from sparsemodel.optim import make_optimizer

    t32 = config.load("tiny").train
    t16 = dataclasses.replace(t32, moment_dtype="bfloat16")
    params = {"w": jnp.linspace(-1.0, 1.0, 64).reshape(8, 8), "norm": jnp.ones(8)}
    tx32, tx16 = make_optimizer(t32), make_optimizer(t16)
    s32, s16 = tx32.init(params), tx16.init(params)
    moments = [x for x in jax.tree.leaves(s16) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert moments and all(x.dtype == jnp.bfloat16 for x in moments)
    p32, p16 = params, params
    for i in range(20):
        g = jax.tree.map(lambda x, i=i: jnp.sin(x * (i + 1)), p32)
        u32, s32 = tx32.update(g, s32, p32)
        u16, s16 = tx16.update(g, s16, p16)
        p32, p16 = optax.apply_updates(p32, u32), optax.apply_updates(p16, u16)
    moved = jnp.max(jnp.abs(p32["w"] - params["w"]))
    assert moved > 1e-3  # the test trains something
    assert jnp.max(jnp.abs(p16["w"] - p32["w"])) < 0.02 * moved
    assert not jnp.array_equal(p16["w"], p32["w"])  # the moments really are rounded

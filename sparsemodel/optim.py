"""AdamW with linear warmup + cosine decay and global-norm clipping, from the config."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sparsemodel.config import TrainConfig


def schedule(t: TrainConfig) -> optax.Schedule:
    """Linear warmup to train.lr, then cosine decay to lr * min_lr_ratio at train.steps."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=t.lr,
        warmup_steps=t.warmup_steps,
        decay_steps=max(t.steps, t.warmup_steps + 1),
        end_value=t.lr * t.min_lr_ratio,
    )


def decay_mask(params):
    """Weight decay on matrices only: norm scales (and any bias) are left alone."""

    def keep(path, _):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        return not any("norm" in n or n.endswith("bias") for n in names)  # q_bias, ...

    return jax.tree_util.tree_map_with_path(keep, params)


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf, in float32 (the clip and the train step's
    norm metrics)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scale all gradients by min(1, max_norm / global norm): optax's clip, made cheap.

    optax selects between each gradient and its clipped copy; XLA:CPU materialises that
    select as one more full pass over every gradient, a large share of the update when the
    experts hold most parameters. A scalar multiply fuses into AdamW's own pass.
    The state is optax's (empty), so checkpoints are interchangeable.
    """

    def update(updates, state, params=None):
        del params
        norm = global_norm(updates)
        scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, jnp.finfo(jnp.float32).tiny))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def moments_in(dtype, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """tx with its floating-point state (AdamW's two moments) stored in dtype and computed
    in float32: bfloat16 moments halve the optimizer state's memory and the traffic of its
    update, which reads and writes every moment each step."""

    def cast(state, to):
        floating = lambda x: jnp.issubdtype(x.dtype, jnp.floating)  # noqa: E731
        return jax.tree.map(lambda x: x.astype(to) if floating(x) else x, state)

    def update(updates, state, params=None):
        updates, state = tx.update(updates, cast(state, jnp.float32), params)
        return updates, cast(state, dtype)

    return optax.GradientTransformation(lambda params: cast(tx.init(params), dtype), update)


def make_optimizer(t: TrainConfig) -> optax.GradientTransformation:
    parts = []
    if t.grad_clip > 0:
        parts.append(clip_by_global_norm(t.grad_clip))
    adamw = optax.adamw(
        schedule(t), b1=t.beta1, b2=t.beta2, weight_decay=t.weight_decay, mask=decay_mask
    )
    parts.append(adamw if t.moment_dtype == "float32" else moments_in(jnp.bfloat16, adamw))
    return optax.chain(*parts)

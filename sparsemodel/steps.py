"""The step maths: the loss, the compiled train and eval steps, evaluating batches.

train, evaluate and profile all run these; nothing here touches files or the loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparsemodel import sharding
from sparsemodel.config import Config
from sparsemodel.model import aux_losses
from sparsemodel.moe import RouterBias, balanced_bias
from sparsemodel.optim import global_norm, schedule


def cross_entropy(logits, targets, mask=None):
    """Sum and count of token negative log-likelihoods over non-padding targets."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]  # [B, S]
    mask = jnp.ones_like(nll) if mask is None else mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def make_loss_fn(graphdef, cfg: Config):
    """(params, router_bias, batch, key) -> (loss, aux): the gradient is params' alone."""

    def loss_fn(params, router_bias, batch, key):
        lm = nnx.merge(graphdef, params, router_bias)
        inputs, targets = batch[:, :-1], batch[:, 1:]  # [B, S] each
        logits, stats = lm(inputs, key=key)
        nll_sum, n = cross_entropy(logits, targets)
        lm_loss = nll_sum / jnp.maximum(n, 1.0)
        lb, z = aux_losses(stats)
        loss = lm_loss + cfg.moe.lb_coef * lb + cfg.moe.z_coef * z
        return loss, {"lm_loss": lm_loss, "lb_loss": lb, "z_loss": z, "stats": stats}

    return loss_fn


def make_train_step(graphdef, cfg: Config, tx: optax.GradientTransformation):
    """(state, opt_state, batch [B, S+1], step) -> (state, opt_state, metrics).

    state: the model's (initialize.MODEL_STATE): the optimizer updates its parameters, and
    with moe.bias_rate > 0 the router bias moves by the step's global loads (balanced_bias),
    after the gradient accumulation, so once per step."""
    grad_fn = jax.value_and_grad(make_loss_fn(graphdef, cfg), has_aux=True)
    n_micro = cfg.train.grad_accum
    lr_at = schedule(cfg.train)

    def train_step(state, opt_state, batch, step):
        params, router_bias = nnx.split_state(state, nnx.Param, RouterBias)
        key = None
        if cfg.moe.jitter > 0:
            key = jax.random.fold_in(jax.random.key(cfg.train.seed), step)
        if n_micro == 1:
            (loss, aux), grads = grad_fn(params, router_bias, batch, key)
        else:
            micro = batch.reshape(n_micro, -1, batch.shape[-1])  # [A, B/A, S+1]

            def accumulate(grads, mb):
                (loss, aux), g = grad_fn(params, router_bias, mb, key)
                return jax.tree.map(jnp.add, grads, g), (loss, aux)

            zeros = jax.tree.map(jnp.zeros_like, params)
            grads, (loss, aux) = jax.lax.scan(accumulate, zeros, micro)
            grads = jax.tree.map(lambda g: g / n_micro, grads)
            loss, aux = jax.tree.map(lambda x: x.mean(0), (loss, aux))
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        stats = aux.pop("stats")
        metrics = {
            "loss": loss,
            **aux,
            "grad_norm": global_norm(grads),
            "param_norm": global_norm(params),
            "lr": lr_at(step - 1),
        }
        if stats is not None:
            metrics.update(
                dropped=stats.dropped.mean(),
                layer_dropped=stats.dropped,
                max_load=stats.max_load.max(),
                load=stats.load,
            )
        if cfg.moe.bias_rate > 0:
            # One bias per model: that of the scanned unit's MoE block, [U, E].
            router_bias = jax.tree.map(
                lambda b: balanced_bias(b, stats.load, cfg.moe.bias_rate), router_bias
            )
            (metrics["router_bias"],) = jax.tree.leaves(router_bias)
        return nnx.merge_state(params, router_bias), opt_state, metrics

    return train_step


def make_eval_step(graphdef):
    """(params, batch [B, S+1]) -> (sum of token NLLs, number of tokens)."""

    def eval_step(params, batch):
        logits, _ = nnx.merge(graphdef, params)(batch[:, :-1])
        return cross_entropy(logits, batch[:, 1:])

    return eval_step


def evaluate_batches(eval_step, params, batches, mesh) -> tuple[float, int]:
    """Mean NLL (nats/token) and token count over an iterable of host batches."""
    total, n = 0.0, 0
    for batch in batches:
        s, c = eval_step(params, sharding.put_batch(batch, mesh))
        total, n = total + float(s), n + int(c)
    return total / max(n, 1), n

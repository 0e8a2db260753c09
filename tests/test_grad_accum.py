"""Gradient accumulation: train.grad_accum=A on a batch of B sequences takes the step that
one batch of B takes, up to float rounding, wherever the loss is a mean over tokens.

The language-model loss and the router z-loss are per-token means; with A micro-batches
of equal size the mean of their means is the mean over the batch, so their gradients
average exactly. The load-balance loss is not: E * sum_e f_e * P_e multiplies two means,
so it is defined per micro-batch, and with moe.lb_coef > 0 the accumulated step differs.

The update is SGD with learning rate 1 (the parameters move by minus the gradient), so the
comparison sees the accumulated gradient itself. AdamW's first step would not do: it is
lr * g / (|g| + eps), about lr * sign(g), which turns the rounding of near-zero gradient
entries into differences of a whole step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sparsemodel import config, initialize, sharding, steps

BATCH, SEQ_LEN, ACCUM = 8, 16, 4
TOL = {"rtol": 1e-5, "atol": 1e-6}
METRICS = ("loss", "lm_loss", "z_loss", "grad_norm")


def one_step(overrides: dict, grad_accum: int, batch: np.ndarray):
    """(params, metrics) after one train step from the seed's initial parameters."""
    cfg = config.load(
        "tiny",
        {
            "train.batch_size": BATCH,
            "train.seq_len": SEQ_LEN,
            "train.dtype": "float32",
            "train.grad_accum": grad_accum,
            **overrides,
        },
    )
    mesh = sharding.make_mesh(cfg.mesh)
    tx = optax.sgd(1.0)
    with jax.set_mesh(mesh):
        graphdef, state = initialize.init_params(cfg, mesh, cfg.train.seed)
        opt_state = initialize.init_opt_state(tx, state, mesh)
        step = jax.jit(steps.make_train_step(graphdef, cfg, tx))
        state, _, metrics = step(state, opt_state, jnp.asarray(batch), jnp.int32(1))
    return jax.device_get(state), jax.device_get(metrics)


def steps_with_and_without_accumulation(overrides: dict):
    batch = np.random.default_rng(0).integers(0, 256, (BATCH, SEQ_LEN + 1), dtype=np.int32)
    return one_step(overrides, 1, batch), one_step(overrides, ACCUM, batch)


def assert_same_step(whole, accumulated):
    (params_1, metrics_1), (params_a, metrics_a) = whole, accumulated
    leaves_1 = jax.tree_util.tree_leaves_with_path(params_1)
    for (path, x), y in zip(leaves_1, jax.tree.leaves(params_a), strict=True):
        np.testing.assert_allclose(y, x, **TOL, err_msg=jax.tree_util.keystr(path))
    for key in METRICS:
        np.testing.assert_allclose(metrics_a[key], metrics_1[key], **TOL, err_msg=key)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"moe.num_experts": 0}, id="dense"),
        pytest.param(
            {"moe.dispatch": "dropless", "moe.lb_coef": 0.0},
            id="dropless_moe_without_lb_loss",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_accumulated_step_equals_one_batch_step(overrides):
    whole, accumulated = steps_with_and_without_accumulation(overrides)
    if "moe.lb_coef" in overrides:  # the z-loss stays on: a mean over tokens averages exactly
        assert whole[1]["z_loss"] > 0
    assert_same_step(whole, accumulated)


@pytest.mark.slow
def test_load_balance_loss_is_per_micro_batch():
    whole, accumulated = steps_with_and_without_accumulation(
        {"moe.dispatch": "dropless", "moe.lb_coef": 0.01}
    )
    assert not np.isclose(whole[1]["lb_loss"], accumulated[1]["lb_loss"], **TOL)
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_same_step(whole, accumulated)


@pytest.mark.slow
def test_router_bias_moves_once_per_step_by_the_whole_batch():
    # moe.bias_rate: the bias moves after the accumulation, by the step's loads (the mean of
    # equal micro-batches' shares), once: from zero, each entry is -rate, 0 or +rate.
    rate = 0.01
    whole, accumulated = steps_with_and_without_accumulation(
        {"moe.dispatch": "dropless", "moe.lb_coef": 0.0, "moe.bias_rate": rate}
    )
    assert_same_step(whole, accumulated)  # the router bias among the state's leaves
    bias = np.asarray(accumulated[0]["units"]["blocks"][0]["ffn"]["router_bias"][...])
    assert set(np.abs(bias).ravel().tolist()) <= {0.0, np.float32(rate).item()}
    assert np.abs(bias).max() > 0
    np.testing.assert_array_equal(bias, accumulated[1]["router_bias"])

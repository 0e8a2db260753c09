"""The bench's layer floor (experiments/bench.py): the MoE layer with its experts on static
slices. Under exactly balanced routing it must be the MoE layer itself, or the floor it
reports would time some other computation."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from sparsemodel import config

ROOT = Path(__file__).resolve().parent.parent


def _bench():
    """experiments/bench.py as a module (experiments/ is not a package; its siblings import
    each other by name)."""
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        spec = importlib.util.spec_from_file_location("bench", ROOT / "experiments" / "bench.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "experiments"))


TOKENS = 64  # 4 experts, top-2: 32 rows each, a multiple of the loop's smallest block (8)


def _balanced(cfg):
    """Inputs whose token t picks experts t % 4 and (t + 1) % 4: 32 assignments each."""
    d = cfg.model.d_model
    t = np.arange(TOKENS)
    x = 0.5 * np.random.default_rng(0).standard_normal((TOKENS, d))
    x[:, :8] = 0.0
    x[t, t % 4] = 10.0
    x[t, 4 + (t + 1) % 4] = 5.0
    router = np.zeros((d, 4))
    router[np.arange(4), np.arange(4)] = 1.0
    router[4 + np.arange(4), np.arange(4)] = 1.0
    return jnp.asarray(x, jnp.float32), jnp.asarray(router, jnp.float32)


def _value_and_grads(loss, w, x):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(w, x)


def test_the_floor_is_the_moe_layer_when_routing_is_balanced():
    bench = _bench()
    cfg = config.load("tiny", {"moe.block_size": 32, "moe.d_expert": 16})
    assert cfg.moe.num_experts == 4 and cfg.moe.top_k == 2
    layer, w = bench._layer_loss(cfg, TOKENS)
    floor, _ = bench._layer_floor_loss(cfg, TOKENS)
    x, router = _balanced(cfg)
    w = {**w, "router": router}
    (value, grads), (floor_value, floor_grads) = (_value_and_grads(f, w, x) for f in (layer, floor))
    np.testing.assert_allclose(floor_value, value, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(floor_grads), jax.tree.leaves(grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    # unbalanced routing puts rows where the static slices do not look: the values differ
    skewed = {**w, "router": router.at[:, 0].add(3.0)}
    _, (grads, _) = _value_and_grads(layer, skewed, x)
    _, (floor_grads, _) = _value_and_grads(floor, skewed, x)
    assert not np.allclose(floor_grads["gate_up"], grads["gate_up"], rtol=1e-2, atol=1e-6)

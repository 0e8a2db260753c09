"""The bench's list of a train step's matmul shapes (experiments/bench_shapes.py) agrees
with the FLOP accounting of sparsemodel.flops and with JAX's own backward pass."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from sparsemodel import config, flops

ROOT = Path(__file__).resolve().parent.parent


def _module(name: str):
    """experiments/<name>.py as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


shapes = _module("bench_shapes")

CONFIGS = {
    "moe": config.load("small", {"train.batch_size": 4, "train.seq_len": 64}),
    "dense": config.load("small-dense", {"train.batch_size": 4, "train.seq_len": 64}),
    "gqa_shared_every_2": config.load(
        "tiny", {"moe.num_shared": 1, "moe.every": 2, "model.n_layers": 4}
    ),
    "first_dense": config.load("tiny", {"moe.first_dense": 1, "model.n_layers": 3}),
    "tied": config.load("tiny", {"model.tie_embeddings": True}),
    # 35 tokens x 2 = 70 assignments over 3 experts: 24, 23 and 23 rows
    "uneven_rows": config.load(
        "tiny", {"moe.num_experts": 3, "train.batch_size": 5, "train.seq_len": 7}
    ),
}
ATTENTION_SCORES_VALUES = ("attention.scores", "attention.values")


def _tokens(cfg) -> int:
    return cfg.train.batch_size * cfg.train.seq_len


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_weight_matmuls_do_two_flops_per_active_parameter_and_token(name):
    cfg = CONFIGS[name]
    forward = shapes.forward_matmuls(cfg)
    weights = sum(f.flops for f in forward if f.part not in ATTENTION_SCORES_VALUES)
    assert weights == 2 * flops.matmul_params_per_token(cfg) * _tokens(cfg)


@pytest.mark.parametrize("name", CONFIGS)
def test_attention_matmuls_are_the_full_square_of_the_causal_model_flops(name):
    cfg = CONFIGS[name]
    forward = shapes.forward_matmuls(cfg)
    attention = sum(f.flops for f in forward if f.part in ATTENTION_SCORES_VALUES)
    # attention_flops_per_token: training (3 x forward) of the causal half; listed: the
    # forward of the full S x S.
    assert 3 * attention == 2 * flops.attention_flops_per_token(cfg) * _tokens(cfg)


def _dot_shapes(fn, *args) -> list[tuple[int, int, int]]:
    """(rows, contracted, columns) of every dot_general in fn's jaxpr."""
    out = []
    for eqn in jax.make_jaxpr(fn)(*args).jaxpr.eqns:
        if eqn.primitive.name != "dot_general":
            continue
        (lhs_c, rhs_c), (lhs_b, rhs_b) = eqn.params["dimension_numbers"]
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        free = lambda shape, used: math.prod(  # noqa: E731
            s for i, s in enumerate(shape) if i not in used
        )
        contracted = math.prod(lhs[i] for i in lhs_c)
        out.append((free(lhs, lhs_c + lhs_b), contracted, free(rhs, rhs_c + rhs_b)))
    return out


@pytest.mark.parametrize("m, k, n", [(6, 4, 5), (3, 7, 2)])
def test_backward_matmuls_are_the_ones_jax_differentiation_runs(m, k, n):
    a, b = jnp.ones((m, k)), jnp.ones((k, n))
    _, vjp = jax.vjp(jnp.matmul, a, b)
    traced = _dot_shapes(vjp, jnp.ones((m, n)))
    listed = shapes.backward_matmuls([shapes.Matmul("x", m, k, n, 1)])
    assert sorted(traced) == sorted((f.m, f.k, f.n) for f in listed)


def test_step_matmuls_are_the_forward_and_both_gradients_of_each():
    cfg = CONFIGS["moe"]
    step = shapes.step_matmuls(cfg)
    forward = sum(f.flops for f in shapes.forward_matmuls(cfg))
    assert sum(f.flops for f in step) == 3 * forward


def test_expert_rows_run_in_whole_blocks_then_the_rest_as_one():
    # tiny: 4 experts of width 64, top-2, blocks of 32 rows, 2 MoE layers, d_model 64.
    # 160 tokens x 2 / 4 experts = 80 rows each: 2 blocks of 32, then one of 16.
    cfg = config.load("tiny", {"train.batch_size": 5, "train.seq_len": 32})
    gate = {
        (f.m, f.k, f.n): f.count for f in shapes.forward_matmuls(cfg) if f.part == "experts.gate"
    }
    assert gate == {(32, 64, 64): 2 * 4 * 2, (16, 64, 64): 4 * 2}


def test_uneven_assignments_give_the_first_experts_one_row_more():
    gate = {
        (f.m, f.k, f.n): f.count
        for f in shapes.forward_matmuls(CONFIGS["uneven_rows"])
        if f.part == "experts.gate"
    }
    assert gate == {(24, 64, 64): 1 * 2, (23, 64, 64): 2 * 2}  # experts x MoE layers


@pytest.mark.parametrize(
    "overrides", [{"moe.dispatch": "capacity"}, {"moe.router": "expert_choice"}]
)
def test_routing_it_does_not_model_is_refused_in_one_line(overrides):
    with pytest.raises(ValueError, match="only dropless token-choice") as e:
        shapes.forward_matmuls(config.load("tiny", overrides))
    assert "\n" not in str(e.value)


def test_matmul_time_adds_each_shape_at_its_own_rate():
    fast = shapes.Matmul("fast", 8, 8, 24, 1)  # 3,072 FLOPs at 100 FLOP/s: 30.72 s
    slow = shapes.Matmul("slow", 8, 8, 8, 1)  # 1,024 FLOPs at 25 FLOP/s: 40.96 s
    rate = {(8, 8, 24): 100.0, (8, 8, 8): 25.0}
    assert shapes.matmul_seconds([fast, slow], rate) == pytest.approx(71.68)


def test_a_timing_call_batches_enough_instances_but_never_more_than_the_step_runs():
    small = (16, 16, 16)  # 8,192 FLOPs each
    per_call = shapes.instances_per_call(small, 10**9)
    assert per_call * 2 * 16**3 >= shapes.MIN_FLOPS_PER_CALL > (per_call - 1) * 2 * 16**3
    assert shapes.instances_per_call(small, 3) == 3
    assert shapes.instances_per_call((4096, 4096, 4096), 5) == 1


@pytest.fixture
def bench(monkeypatch):
    """experiments/bench.py, whose sibling modules import by name as when it runs."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    return _module("bench")


@pytest.mark.parametrize("d_model", [64, 128, 256])
def test_each_size_pairs_the_moe_with_a_dense_twin_of_equal_active_width(bench, d_model):
    cfgs = bench.size_configs(d_model)
    moe, dense = cfgs["moe"], cfgs["dense"]
    router = moe.model.n_layers * moe.model.d_model * moe.moe.num_experts
    assert flops.matmul_params_per_token(moe) - router == flops.matmul_params_per_token(dense)
    assert moe.is_moe and not dense.is_moe
    assert _tokens(moe) == _tokens(dense) == 4096

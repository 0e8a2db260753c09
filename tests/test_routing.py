"""Token-choice routing options (DeepSeek-V3's) against float64 NumPy references: sigmoid
scores, group-limited choice, the balancing bias (choice only, never the weights), the
routed scaling factor, the sequence-wise balance loss and the bias update; and the routing
health counts. The layer helpers and the dense reference come from test_moe.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_moe import TOL, _dense_jax_reference, _f64, apply, dense_weights, make_layer, tokens
from test_moe import ref_output as ref_combined

from sparsemodel import checkpoint, config, health, initialize, moe, optim, sharding
from sparsemodel.flops import param_counts

BLOCKS_8 = {"num_experts": 8, "grouped_matmul": "blocks", "block_size": 7}


# ------------------------------------------------------------------- naive reference


def ref_scores(layer, x):
    """Router scores [T, E], float64: the softmax, or each expert's sigmoid."""
    logits = _f64(x) @ _f64(layer.w_router[...])
    if layer.cfg.moe.score == "sigmoid":
        return 1.0 / (1.0 + np.exp(-logits))
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def ref_choose(choice, k, groups=1, topk_groups=1):
    """Per token, one at a time: its groups (consecutive experts) ranked by the sum of their
    two best values of `choice`, the best topk_groups kept, then its k best experts in them."""
    n_tokens, n_experts = choice.shape
    size = n_experts // groups
    out = np.zeros((n_tokens, k), int)
    for t in range(n_tokens):
        members = [range(g * size, (g + 1) * size) for g in range(groups)]
        group_score = [sum(sorted((choice[t, e] for e in m), reverse=True)[:2]) for m in members]
        best = sorted(range(groups), key=lambda g: -group_score[g])[:topk_groups]
        allowed = [e for g in best for e in members[g]]
        out[t] = sorted(allowed, key=lambda e: (-choice[t, e], e))[:k]
    return out


def ref_routing(layer, x, bias=None):
    """(choices [T, k], weights [T, k]): chosen by scores + bias, weighted by the scores
    alone, renormalised over k > 1, times moe.route_scale."""
    e = layer.cfg.moe
    scores = ref_scores(layer, x)
    choice = scores if bias is None else scores + bias
    choices = ref_choose(choice, e.top_k, e.groups, e.topk_groups)
    weights = np.take_along_axis(scores, choices, axis=-1)
    if e.top_k > 1 and e.renormalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return choices, weights * e.route_scale


def ref_layer(layer, x, bias=None):
    choices, weights = ref_routing(layer, x, bias)
    return ref_combined(layer, x, dense_weights(choices, weights, layer.cfg.moe.num_experts))


def differ_somewhere(choices_a, choices_b) -> bool:
    """Whether some token chose another set of experts."""
    return bool((np.sort(choices_a, -1) != np.sort(choices_b, -1)).any())


# ---------------------------------------------------------------------- the choice


def test_top_k_routing_weights_by_hand():
    scores = jnp.array([[0.9, 0.2, 0.6, 0.1]], jnp.float32)
    bias = jnp.array([0.0, 0.5, 0.0, 0.0], jnp.float32)  # lifts expert 1 over expert 2
    mask = jnp.ones((1,), bool)
    two = moe.top_k_routing(scores, mask, 2, True, bias=bias, scale=2.5)
    np.testing.assert_array_equal(np.asarray(two.experts), [[0, 1]])
    np.testing.assert_allclose(np.asarray(two.weights), [[2.5 * 0.9 / 1.1, 2.5 * 0.2 / 1.1]])
    # k = 1: the raw score (0.9), not 1.0, so the router keeps a gradient
    one = moe.top_k_routing(scores, mask, 1, True, scale=1.0)
    np.testing.assert_array_equal(np.asarray(one.experts), [[0]])
    np.testing.assert_allclose(np.asarray(one.weights), [[0.9]])


# Scales under 1 keep the outputs O(1), where the absolute tolerance means something.
@pytest.mark.parametrize("k, scale", [(1, 1.0), (2, 1.0), (3, 0.5)])
def test_sigmoid_scores_match_reference(k, scale):
    layer = make_layer(**BLOCKS_8, top_k=k, score="sigmoid", route_scale=scale)
    x = tokens(24)
    y, stats = apply(layer, x)
    np.testing.assert_allclose(np.asarray(y), ref_layer(layer, x), **TOL)
    # The statistics see the affinities normalised per token (DeepSeek-V3's s').
    probs = ref_scores(layer, x)
    probs = probs / probs.sum(-1, keepdims=True)
    entropy = -np.sum(probs * np.log(probs), -1).mean()
    np.testing.assert_allclose(float(stats.entropy), entropy, rtol=1e-5)


@pytest.mark.parametrize("scale", [0.25, 0.5])
def test_route_scale_multiplies_softmax_weights(scale):
    layer = make_layer(**BLOCKS_8, top_k=2, route_scale=scale)
    x = tokens(24)
    y, _ = apply(layer, x)
    np.testing.assert_allclose(np.asarray(y), ref_layer(layer, x), **TOL)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups, topk_groups, k", [(4, 2, 3), (4, 1, 2), (2, 1, 2)])
def test_group_limited_routing_matches_reference(score, groups, topk_groups, k):
    layer = make_layer(**BLOCKS_8, top_k=k, groups=groups, topk_groups=topk_groups, score=score)
    x = tokens(24)
    choices, _ = ref_routing(layer, x)
    assert differ_somewhere(choices, ref_choose(ref_scores(layer, x), k)), "groups must matter"
    y, _ = apply(layer, x)
    np.testing.assert_allclose(np.asarray(y), ref_layer(layer, x), **TOL)


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"score": "softmax"}, id="softmax"),
        pytest.param(
            {"score": "sigmoid", "groups": 4, "topk_groups": 2, "route_scale": 0.5},
            id="sigmoid_groups",
        ),
        pytest.param(
            {"score": "sigmoid", "dispatch": "capacity", "capacity_factor": 4.0},
            id="sigmoid_capacity",
        ),
    ],
)
def test_bias_changes_the_choice_not_the_weights(overrides):
    layer = make_layer(**BLOCKS_8, top_k=2, bias_rate=0.01, **overrides)
    x = tokens(24)
    bias = np.random.default_rng(3).normal(0.0, 0.1, 8)
    layer.router_bias[...] = jnp.asarray(bias, jnp.float32)
    choices, weights = ref_routing(layer, x, bias)
    assert differ_somewhere(choices, ref_routing(layer, x)[0]), "the bias must matter"
    y, _ = apply(layer, x)
    np.testing.assert_allclose(np.asarray(y), ref_layer(layer, x, bias), **TOL)


def test_router_bias_is_state_not_a_parameter():
    layer = make_layer(**BLOCKS_8, bias_rate=0.01)
    assert isinstance(layer.router_bias, moe.RouterBias)
    assert not isinstance(layer.router_bias, nnx.Param)
    assert "router_bias" not in nnx.state(layer, nnx.Param)
    assert not hasattr(make_layer(**BLOCKS_8), "router_bias")  # bias_rate = 0: none


def test_the_optimizer_never_sees_the_router_bias():
    cfg = config.load("tiny", {"moe.bias_rate": 0.01})
    mesh = sharding.make_mesh(cfg.mesh)
    _, state = initialize.init_params(cfg, mesh, 0)
    assert "units/blocks/0/ffn/router_bias" in checkpoint.shapes_of(state)  # saved with it
    opt_state = initialize.init_opt_state(optim.make_optimizer(cfg.train), state, mesh)
    in_optimizer = checkpoint.shapes_of(opt_state)
    assert any(p.endswith("ffn/w_router") for p in in_optimizer)
    assert not any("router_bias" in p for p in in_optimizer)
    assert initialize.count(state) == param_counts(cfg).unique  # a parameter count


@pytest.mark.parametrize("k", [1, 2])
def test_sigmoid_router_gradient_matches_dense_reference(k):
    # At k = 1 a renormalised weight would be 1.0 and the router's gradient zero.
    layer = make_layer(**BLOCKS_8, top_k=k, score="sigmoid", route_scale=1.5)
    x = tokens(16)
    probe = jax.random.normal(jax.random.key(8), x.shape, jnp.float32)
    graphdef, state = nnx.split(layer)
    names = ("w_router", "w_gate_up", "w_down")

    def layer_loss(state):
        return jnp.sum(nnx.merge(graphdef, state)(x)[0] * probe)

    def ref_loss(params):
        y = _dense_jax_reference(params, x, k, scores=jax.nn.sigmoid, scale=1.5)
        return jnp.sum(y * probe)

    got = jax.jit(jax.grad(layer_loss))(state)
    want = jax.jit(jax.grad(ref_loss))({n: getattr(layer, n)[...] for n in names})
    assert np.linalg.norm(np.asarray(want["w_router"])) > 1e-3
    for n in names:
        ref = np.asarray(want[n])
        atol = max(TOL["atol"], 2e-7 * float(np.abs(ref).max()))
        np.testing.assert_allclose(np.asarray(got[n][...]), ref, rtol=TOL["rtol"], atol=atol)


# ------------------------------------------------------------------- balance loss


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_balance_loss_per_sequence_and_per_batch_match_reference(score):
    n_experts, k, seq_len, n_seqs = 4, 2, 8, 3
    x = tokens(seq_len * n_seqs, seed=4)
    mask = np.ones(seq_len * n_seqs, bool)
    mask[[1, 2, 5]] = False  # padding in the first sequence ...
    mask[2 * seq_len :] = False  # ... and a third sequence of padding only: not counted
    common = {"num_experts": n_experts, "top_k": k, "score": score}
    per_batch = make_layer(**common, lb_scope="batch")
    per_seq = make_layer(**common, lb_scope="sequence")  # same seed: the same weights
    _, batch_stats = apply(per_batch, x, mask, seq_len=seq_len)
    _, seq_stats = apply(per_seq, x, mask, seq_len=seq_len)

    scores = ref_scores(per_seq, x)
    probs = scores / scores.sum(-1, keepdims=True)  # s' (softmax: unchanged)
    choices, _ = ref_routing(per_seq, x)

    def balance(tokens_mask):  # E * sum_e f_e * P_e over the masked tokens
        f = np.bincount(choices[tokens_mask].ravel(), minlength=n_experts) / (k * tokens_mask.sum())
        return n_experts * np.sum(f * probs[tokens_mask].mean(0))

    in_seq = [mask & (np.arange(len(mask)) // seq_len == n) for n in range(n_seqs)]
    want_seq = np.mean([balance(m) for m in in_seq if m.any()])
    np.testing.assert_allclose(float(seq_stats.lb_loss), want_seq, rtol=1e-5)
    np.testing.assert_allclose(float(batch_stats.lb_loss), balance(mask), rtol=1e-5)
    assert abs(want_seq - balance(mask)) > 1e-3, "the two scopes must differ here"


def test_sequence_balance_loss_is_one_when_each_sequence_is_balanced():
    # Two sequences, each spreading its tokens evenly over the 4 experts with uniform
    # probabilities inside: 1.0 per sequence, as the batch loss scores a balanced batch.
    n_experts, seq_len = 4, 4
    probs = jnp.full((2 * seq_len, n_experts), 0.25, jnp.float32)
    experts = jnp.asarray(np.arange(2 * seq_len) % n_experts, jnp.int32)[:, None]  # k = 1
    seq_load = moe.sequence_load(experts, seq_len, n_experts)
    np.testing.assert_array_equal(np.asarray(seq_load), np.ones((2, n_experts)))
    total, n_seqs = moe.sequence_balance_sums(probs, jnp.ones(2 * seq_len), seq_load)
    np.testing.assert_allclose(float(total / n_seqs), 1.0, rtol=1e-6)


# -------------------------------------------------------------------- bias update


def test_balanced_bias_moves_against_the_load():
    bias = jnp.array([[0.0, 0.5, -0.5, 0.0]], jnp.float32)  # one unique MoE layer ...
    load = jnp.array(  # ... applied twice (model.share_layers): its loads are pooled
        [[0.25, 0.5, 0.0, 0.25], [0.25, 0.3, 0.1, 0.35]], jnp.float32
    )  # mean [0.25, 0.4, 0.05, 0.3]: balanced, over, under, over
    got = moe.balanced_bias(bias, load, 0.1)
    np.testing.assert_allclose(np.asarray(got), [[0.0, 0.4, -0.4, -0.1]], rtol=1e-6)


# ---------------------------------------------------------------------- health


def test_unbalanced_experts_counted_against_the_balanced_load():
    load = np.array([[0.02, 0.18, 0.4, 0.4], [0.9, 0.1, 0.0, 0.0], [0.25] * 4])
    dead, overloaded = health.unbalanced_experts(load)  # balanced: 0.25 each
    np.testing.assert_array_equal(dead, [1, 2, 0])  # < 0.025
    np.testing.assert_array_equal(overloaded, [0, 1, 0])  # > 0.75


def test_health_warns_after_the_given_intervals_in_a_row():
    watch = health.RoutingHealth(every=2, patience=3)
    sick = np.array([[1.0, 0.0, 0.0, 0.0], [0.25] * 4])  # layer 0: 1 flooded, 3 dead
    well = np.full((2, 4), 0.25)
    seen = []
    for step, load in enumerate([sick, well] + [sick] * 12, start=1):
        counts, warning = watch.add(step, load)
        assert bool(counts) == (step % 2 == 0), step  # counts at the end of each interval
        seen.append((step, counts, warning))
    # interval 1 (steps 1-2) averages sick and well: 2.5 and 0.5 times balanced, no one out
    assert seen[1][1] == {"dead_experts": [0, 0], "overloaded_experts": [0, 0]}
    assert seen[3][1] == {"dead_experts": [3, 0], "overloaded_experts": [1, 0]}
    warned = [step for step, _, warning in seen if warning]
    assert warned == [8, 14]  # unbalanced intervals 2-4 (steps 3-8), then 5-7 (9-14)
    assert "\n" not in seen[7][2] and "layer 0: 3 dead, 1 overloaded (3 intervals)" in seen[7][2]
    assert "layer 1" not in seen[7][2]
    assert "layer 0: 3 dead, 1 overloaded (6 intervals)" in seen[13][2]

"""MoE layer against a naive dense reference: every expert on every token, then a [T, E]
combine matrix built from the routing. All on CPU in float32 with small shapes.

The reference is float64 NumPy and shares nothing with sparsemodel.moe except the weights.
Weights are re-drawn at scale ~1/sqrt(fan_in) so outputs are O(1) and an absolute tolerance
of 1e-5 is meaningful (the init std of 0.02 would make every output ~1e-3).
"""

from __future__ import annotations

import importlib.util
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsemodel import config, dispatch, kernels, moe
from sparsemodel import grouped_matmul as gm

D_MODEL, D_EXPERT = 32, 48  # different sizes, so a transposed weight cannot go unnoticed
TOL = {"rtol": 1e-5, "atol": 1e-5}


def make_cfg(**moe_overrides):
    overrides = {"model.d_model": D_MODEL, "moe.d_expert": D_EXPERT}
    overrides.update({f"moe.{k}": v for k, v in moe_overrides.items()})
    return config.load("tiny", overrides=overrides)


def make_layer(seed=0, **moe_overrides) -> moe.MoE:
    """An MoE layer with weights drawn at std 1/sqrt(fan_in), so outputs are O(1).

    The layer is built abstractly (its __init__ runs under nnx.eval_shape) and the weights
    are drawn with NumPy: eager initialisation compiles every op anew for each new shape,
    seconds per configuration on CPU, for values the tests replace anyway.
    """
    cfg = make_cfg(**moe_overrides)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moe.MoE(cfg, rngs=nnx.Rngs(seed))))
    rng = np.random.default_rng(seed)

    def draw(s):  # every weight here is [..., fan_in, fan_out]; the router bias [E] is 0
        if s.ndim == 1:
            return jnp.zeros(s.shape, jnp.float32)
        return jnp.asarray(rng.normal(0.0, s.shape[-2] ** -0.5, s.shape), jnp.float32)

    return nnx.merge(graphdef, jax.tree.map(draw, state))


def tokens(n, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, D_MODEL), jnp.float32)


# Configurations and token counts recur across tests so that compiled layers are reused.
BLOCKS_4 = {"num_experts": 4, "top_k": 2, "grouped_matmul": "blocks", "block_size": 5}
BLOCKS_8 = {"num_experts": 8, "top_k": 2, "grouped_matmul": "blocks", "block_size": 7}
CAPACITY_4 = {"num_experts": 4, "top_k": 2, "dispatch": "capacity", "capacity_factor": 2.0}

# moe.grouped_matmul=tokamax runs the optional tokamax package (on CPU its XLA ragged_dot).
NEEDS_TOKAMAX = pytest.mark.skipif(
    importlib.util.find_spec("tokamax") is None,
    reason="tokamax is not installed (the tokamax extra, which `make test` installs)",
)
TOKAMAX = pytest.param("tokamax", marks=NEEDS_TOKAMAX)


@nnx.jit(static_argnames="seq_len")
def _apply(layer, x, mask, seq_len=None):
    out = layer(x, mask, seq_len=seq_len)
    return out.y, out.stats


def apply(layer, x, mask=None, seq_len=None):
    """layer(x, mask) -> (y, stats); an all-true mask when None (one compiled function for
    both); x holds sequences of seq_len tokens (None: one sequence)."""
    mask = jnp.ones(x.shape[:1], bool) if mask is None else jnp.asarray(mask)
    return _apply(layer, x, mask, seq_len)


# ------------------------------------------------------------------- naive reference


def _f64(a):
    return np.asarray(a, np.float64)


def _swiglu(x, w_gate, w_up, w_down):
    g, u = x @ w_gate, x @ w_up
    return (g / (1.0 + np.exp(-g)) * u) @ w_down


def ref_router(layer, x):
    """logits [T, E] and the full softmax [T, E], float64."""
    logits = _f64(x) @ _f64(layer.w_router[...])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return logits, p / p.sum(-1, keepdims=True)


def ref_expert_outputs(layer, x):
    """Every expert's SwiGLU on every token: [E, T, D]."""
    wgu, wd = _f64(layer.w_gate_up[...]), _f64(layer.w_down[...])  # [E, D, 2, F], [E, F, D]
    return np.stack(
        [_swiglu(_f64(x), wgu[e, :, 0], wgu[e, :, 1], wd[e]) for e in range(wgu.shape[0])]
    )


def ref_shared(layer, x):
    """The always-on shared expert, 0 if the layer has none, times sigmoid(x w) when the
    layer has a sigmoid gate (`layer.w_shared_sigmoid` [D, 1]).

    Two layouts are accepted: a `layer.shared` MLP, or `layer.w_shared_{gate,up,down}`.
    """
    shared = getattr(layer, "shared", None)
    if shared is not None:
        ws = shared.w_gate, shared.w_up, shared.w_down
    elif hasattr(layer, "w_shared_gate"):
        ws = layer.w_shared_gate, layer.w_shared_up, layer.w_shared_down
    else:
        return 0.0
    y = _swiglu(_f64(x), *(_f64(w[...]) for w in ws))
    if hasattr(layer, "w_shared_sigmoid"):
        y = y / (1.0 + np.exp(-_f64(x) @ _f64(layer.w_shared_sigmoid[...])))
    return y


def ref_topk(probs, k, renormalize):
    """Per token: the k chosen experts (best first) and their combine weights."""
    choices = np.argsort(-probs, axis=-1, kind="stable")[:, :k]  # [T, k]
    weights = np.take_along_axis(probs, choices, axis=-1)
    if k > 1 and renormalize:
        weights = weights / weights.sum(-1, keepdims=True)
    return choices, weights


def dense_weights(choices, weights, n_experts, keep=None):
    """[T, E] combine matrix from (choice, weight) pairs, skipping keep == False."""
    t, k = choices.shape
    w = np.zeros((t, n_experts))
    for i in range(t):
        for j in range(k):
            if keep is None or keep[i, j]:
                w[i, choices[i, j]] += weights[i, j]
    return w


def ref_output(layer, x, w_te):
    return np.einsum("te,etd->td", w_te, ref_expert_outputs(layer, x)) + ref_shared(layer, x)


def ref_capacity_keep(choices, n_experts, seq_len, capacity, used=None):
    """Naive capacity: within each sequence of seq_len tokens, in position order (all of token
    t's choices before token t+1's), an expert keeps assignments while it has kept fewer than
    `capacity`, counting `used` [N, E] kept before. A choice of n_experts is none.

    Returns keep [T, k] and the kept counts [N, E].
    """
    t, k = choices.shape
    counts = np.zeros((t // seq_len, n_experts), int) if used is None else np.array(used)
    keep = np.zeros((t, k), bool)
    for i in range(t):
        n = i // seq_len
        for j in range(k):
            e = choices[i, j]
            if e < n_experts and counts[n, e] < capacity:
                keep[i, j] = True
                counts[n, e] += 1
    return keep, counts


def ref_token_choice(layer, x):
    e = layer.cfg.moe
    _, probs = ref_router(layer, x)
    choices, weights = ref_topk(probs, e.top_k, e.renormalize)
    return ref_output(layer, x, dense_weights(choices, weights, e.num_experts))


# ------------------------------------------------------------ token choice, no drops


@pytest.mark.parametrize(
    "n_experts, k, n_tokens, block_size, n_shared",
    [
        (4, 2, 16, 5, 0),  # 32 assignments, block 5: does not divide
        (4, 1, 13, 32, 1),  # one block bigger than all assignments, shared expert
        (8, 2, 24, 7, 0),
        (8, 1, 9, 1, 1),  # one row per block
        (4, 2, 120, 256, 0),  # no expert fills 256 rows: each runs one block (a multiple of 32)
        (8, 2, 3, 512, 0),  # decoding-sized: blocks longer than the whole buffer
        (4, 2, 120, 32, 0),  # whole blocks of 32, then the rest (8-24 rows) in one block
    ],
)
@pytest.mark.parametrize("kind", ["blocks", "batched"])
def test_dropless_blocks_matches_reference(n_experts, k, n_tokens, block_size, n_shared, kind):
    layer = make_layer(
        num_experts=n_experts,
        top_k=k,
        dispatch="dropless",
        grouped_matmul=kind,
        block_size=block_size,
        num_shared=n_shared,
    )
    x = tokens(n_tokens)
    y, stats = apply(layer, x)
    np.testing.assert_allclose(np.asarray(y), ref_token_choice(layer, x), **TOL)
    assert float(stats.dropped) == 0.0


def test_gated_shared_experts_of_their_own_width_match_reference():
    """Qwen2-MoE's shared expert: moe.d_shared wide, scaled by sigmoid(x w_shared_sigmoid)."""
    layer = make_layer(**BLOCKS_4, num_shared=2, d_shared=20, shared_gate=True)
    assert layer.w_shared_up[...].shape == (D_MODEL, 2 * 20)
    assert layer.w_shared_sigmoid[...].shape == (D_MODEL, 1)
    x = tokens(16)
    y, _ = apply(layer, x)
    want = ref_token_choice(layer, x)
    np.testing.assert_allclose(np.asarray(y), want, **TOL)
    shared = (layer.w_shared_gate, layer.w_shared_up, layer.w_shared_down)
    ungated = want - ref_shared(layer, x) + _swiglu(_f64(x), *(_f64(w[...]) for w in shared))
    assert np.abs(want - ungated).max() > 0.1  # the gate changes the output


@pytest.mark.parametrize("block", [1, 3, 5, 7, 8, 32, 100, 128, 130, 200, 512, 1000, 4096])
def test_smallest_block_tiles_every_halving_of_the_block(block):
    # The CPU loop takes whole blocks (halved when decoding), then the rest in one block
    # of a multiple of the small block: each must be a multiple of it, or rows would be
    # skipped; and the rest has at most 15 sizes (one cond each).
    small = gm.smallest_block(block)
    ratio = block // small
    assert block % small == 0 and ratio & (ratio - 1) == 0, small
    assert ratio <= 16
    if block in (128, 256, 512):
        assert small == 32  # capped: big blocks cost no more padding
    elif block % 4 == 0 and block <= 128:
        assert small == block // 4
    if block == 4096:
        assert small == 256  # block/16: 15 sizes of the rest, not 127


@pytest.mark.parametrize(
    "n_experts, k, n_tokens, n_shared",
    [
        (4, 2, 16, 1),
        (8, 1, 5, 0),  # 5 assignments for 8 experts: some experts get no rows
    ],
)
@pytest.mark.parametrize("kind", ["ragged_dot", TOKAMAX])
def test_dropless_ragged_matches_reference(kind, n_experts, k, n_tokens, n_shared):
    layer = make_layer(num_experts=n_experts, top_k=k, grouped_matmul=kind, num_shared=n_shared)
    x = tokens(n_tokens)
    y, stats = apply(layer, x)
    np.testing.assert_allclose(np.asarray(y), ref_token_choice(layer, x), **TOL)
    assert float(stats.dropped) == 0.0


@NEEDS_TOKAMAX
def test_tokamax_runs_beside_the_commands_own_arguments(monkeypatch):
    # tokamax reads its options from absl flags, which parse sys.argv on first read unless
    # parsed before: `sparsemodel train --config ...` must not reach that parse.
    from absl import flags

    monkeypatch.setattr(sys, "argv", ["sparsemodel", "train", "--config", "tiny"])
    flags.FLAGS.unparse_flags()
    try:
        layer = make_layer(num_experts=4, top_k=2, grouped_matmul="tokamax")
        x = tokens(7)  # a size no other test traces: tokamax runs while this traces
        y, _ = apply(layer, x)
    finally:
        flags.FLAGS.mark_as_parsed()
    np.testing.assert_allclose(np.asarray(y), ref_token_choice(layer, x), **TOL)


@pytest.mark.parametrize("n_experts, k, n_shared", [(4, 2, 0), (8, 1, 1)])
def test_capacity_without_drops_matches_reference(n_experts, k, n_shared):
    # capacity_factor E/k makes C = T: every expert could take every token.
    layer = make_layer(
        num_experts=n_experts,
        top_k=k,
        dispatch="capacity",
        capacity_factor=n_experts / k,
        num_shared=n_shared,
    )
    x = tokens(16)
    y, stats = apply(layer, x)
    np.testing.assert_allclose(np.asarray(y), ref_token_choice(layer, x), **TOL)
    assert float(stats.dropped) == 0.0


def test_renormalize_false_keeps_softmax_weights():
    layer = make_layer(num_experts=4, top_k=2, renormalize=False, grouped_matmul="blocks")
    x = tokens(16)
    y, _ = apply(layer, x)
    _, probs = ref_router(layer, x)
    choices, weights = ref_topk(probs, 2, renormalize=False)
    assert np.all(weights.sum(-1) < 1.0)  # really unnormalised
    expected = ref_output(layer, x, dense_weights(choices, weights, 4))
    np.testing.assert_allclose(np.asarray(y), expected, **TOL)


# ------------------------------------------------------------------ capacity drops


def test_expert_capacity_formula():
    assert moe.expert_capacity(16, 2, 4, 0.5) == 4  # ceil(2*16/4 * 0.5)
    assert moe.expert_capacity(10, 1, 4, 1.25) == 4  # ceil(3.125)
    assert moe.expert_capacity(3, 1, 8, 0.1) == 1  # never zero
    assert moe.expert_capacity(16, 2, 4, 2.0) == 16  # factor E/k: C = T


@pytest.mark.parametrize("n_experts", [8, 40])  # the running count, and the sort beyond 32
def test_rank_within_expert_matches_naive_loop(n_experts):
    flat_e = np.random.default_rng(0).integers(0, n_experts + 1, 3000)  # E: padding
    rank, counts = dispatch.rank_within_expert(jnp.asarray(flat_e, jnp.int32), n_experts)
    seen = np.zeros(n_experts + 1, int)
    want = []
    for e in flat_e:  # token-major: each assignment's rank is how many of its expert came before
        want.append(seen[e])
        seen[e] += 1
    np.testing.assert_array_equal(np.asarray(rank), want)
    np.testing.assert_array_equal(np.asarray(counts), seen)


def test_capacity_rows_by_hand():
    e_pad = 4  # E marks a padding token
    experts = jnp.array([[0, 1], [0, 2], [0, 1], [e_pad, e_pad], [1, 0]], jnp.int32)
    placed = dispatch.capacity_rows(experts, n_experts=4, capacity=2)
    # Token-major ranks: e0 <- (0,0) (1,0) (2,0)x (4,1)x ; e1 <- (0,1) (2,1) (4,0)x ; e2 <- (1,1).
    # Row = e * C + rank for kept assignments, E * C = 8 for dropped and padding ones.
    assert placed.n_rows == 8
    np.testing.assert_array_equal(np.asarray(placed.rows), [[0, 2], [1, 4], [8, 3], [8, 8], [8, 8]])
    np.testing.assert_array_equal(
        np.asarray(placed.keep),
        [[True, True], [True, True], [False, True], [False, False], [False, False]],
    )


@pytest.mark.parametrize(
    "n_experts, k, factor, n_shared",
    [(4, 2, 0.5, 0), (8, 1, 1.0, 1)],
)
def test_batch_capacity_drops_over_capacity_in_token_major_order(n_experts, k, factor, n_shared):
    n_tokens = 16
    layer = make_layer(
        num_experts=n_experts,
        top_k=k,
        dispatch="capacity",
        capacity_group="batch",
        capacity_factor=factor,
        num_shared=n_shared,
    )
    x = tokens(n_tokens, seed=3)
    _, probs = ref_router(layer, x)
    choices, weights = ref_topk(probs, k, renormalize=True)
    capacity = math.ceil(k * n_tokens / n_experts * factor)
    keep, _ = ref_capacity_keep(choices, n_experts, n_tokens, capacity)  # one group of all
    assert not keep.all(), "the test needs some drops"

    y, stats = apply(layer, x)
    expected = ref_output(layer, x, dense_weights(choices, weights, n_experts, keep))
    np.testing.assert_allclose(np.asarray(y), expected, **TOL)
    np.testing.assert_allclose(float(stats.dropped), 1.0 - keep.mean(), atol=1e-6)


# ------------------------------------------------------------- capacity per sequence


@pytest.mark.parametrize("with_used", [False, True], ids=["first_call", "later_call"])
def test_capacity_rows_per_sequence_match_naive_loop(with_used):
    n_experts, k, seq_len, n_seqs, capacity = 4, 2, 6, 3, 3
    rng = np.random.default_rng(0)
    # Distinct experts per token, as top-k picks them; two padding tokens choose none (E).
    choices = np.stack([rng.choice(n_experts, k, replace=False) for _ in range(n_seqs * seq_len)])
    choices[[4, 11]] = n_experts
    used = rng.integers(0, capacity + 1, (n_seqs, n_experts)) if with_used else None
    placed = dispatch.capacity_rows(
        jnp.asarray(choices, jnp.int32),
        n_experts,
        capacity,
        seq_len,
        None if used is None else jnp.asarray(used, jnp.int32),
    )
    keep, counts = ref_capacity_keep(choices, n_experts, seq_len, capacity, used)
    assert keep.any() and not keep[choices < n_experts].all(), "the test needs some drops"
    np.testing.assert_array_equal(np.asarray(placed.keep), keep)
    np.testing.assert_array_equal(np.asarray(placed.counts), counts)
    # Expert-major buffer: expert e's N * S rows, sequence n's S = min(C, seq_len) among
    # them, one assignment per row; dropped and padding assignments get no row.
    per_expert = n_seqs * min(capacity, seq_len)
    assert placed.n_rows == n_experts * per_expert
    rows = np.asarray(placed.rows)
    np.testing.assert_array_equal(rows[~keep], placed.n_rows)
    kept_rows = rows[keep]
    assert len(set(kept_rows.tolist())) == len(kept_rows)
    np.testing.assert_array_equal(kept_rows // per_expert, choices[keep])
    token = np.nonzero(keep)[0]
    np.testing.assert_array_equal(
        kept_rows % per_expert // min(capacity, seq_len), token // seq_len
    )


@pytest.mark.parametrize("n_experts, k, factor, n_shared", [(4, 2, 0.25, 0), (8, 1, 0.25, 1)])
def test_capacity_per_sequence_matches_reference(n_experts, k, factor, n_shared):
    seq_len, n_seqs = 8, 3
    layer = make_layer(
        num_experts=n_experts,
        top_k=k,
        dispatch="capacity",
        capacity_factor=factor,
        num_shared=n_shared,
    )
    x = tokens(seq_len * n_seqs, seed=3)
    _, probs = ref_router(layer, x)
    choices, weights = ref_topk(probs, k, renormalize=True)
    # C comes from train.seq_len (32 in tiny), not from the 8 tokens of these sequences.
    capacity = math.ceil(k * layer.cfg.train.seq_len / n_experts * factor)
    keep, _ = ref_capacity_keep(choices, n_experts, seq_len, capacity)
    assert not keep.all(), "the test needs some drops"

    y, stats = apply(layer, x, seq_len=seq_len)
    expected = ref_output(layer, x, dense_weights(choices, weights, n_experts, keep))
    np.testing.assert_allclose(np.asarray(y), expected, **TOL)
    np.testing.assert_allclose(float(stats.dropped), 1.0 - keep.mean(), atol=1e-6)


@nnx.jit(static_argnames="seq_len")
def _apply_counted(layer, x, counts, seq_len):
    out = layer(x, seq_len=seq_len, expert_counts=counts)
    return out.y, out.expert_counts


def test_capacity_per_sequence_in_two_calls_equals_one():
    # What cached decoding relies on: sequences run in two pieces, the second given the
    # per-expert counts the first kept, give the one-call output (drops included).
    seq_len, n_seqs, split = 8, 3, 5
    layer = make_layer(num_experts=4, top_k=2, dispatch="capacity", capacity_factor=0.25)
    x = tokens(seq_len * n_seqs, seed=3)
    whole, stats = apply(layer, x, seq_len=seq_len)
    assert float(stats.dropped) > 0
    x_nsd = x.reshape(n_seqs, seq_len, -1)
    counts = jnp.zeros((n_seqs, 4), jnp.int32)
    first, counts = _apply_counted(layer, x_nsd[:, :split].reshape(-1, D_MODEL), counts, split)
    rest, counts = _apply_counted(
        layer, x_nsd[:, split:].reshape(-1, D_MODEL), counts, seq_len - split
    )
    pieces = jnp.concatenate(
        [first.reshape(n_seqs, split, -1), rest.reshape(n_seqs, seq_len - split, -1)], axis=1
    )
    np.testing.assert_allclose(np.asarray(pieces).reshape(x.shape), np.asarray(whole), **TOL)
    _, probs = ref_router(layer, x)
    choices, _ = ref_topk(probs, 2, renormalize=True)
    _, want_counts = ref_capacity_keep(choices, 4, seq_len, 4)  # C = ceil(2*32/4 * 0.25)
    np.testing.assert_array_equal(np.asarray(counts), want_counts)


# ------------------------------------------------------------------ losses and stats


def test_lb_loss_is_one_for_uniform_router():
    layer = make_layer(**BLOCKS_4)
    layer.w_router[...] = jnp.zeros_like(layer.w_router[...])  # uniform probabilities
    _, stats = apply(layer, tokens(16))
    np.testing.assert_allclose(float(stats.lb_loss), 1.0, atol=1e-6)
    np.testing.assert_allclose(float(stats.z_loss), math.log(4) ** 2, rtol=1e-6)
    np.testing.assert_allclose(float(stats.entropy), math.log(4), rtol=1e-6)


def served(routing, n_experts: int) -> moe.Served:
    """Every assignment of `routing` served (nothing dropped)."""
    load = jnp.zeros((n_experts,), jnp.float32).at[routing.experts.reshape(-1)].add(1.0)
    return moe.Served(None, load, jnp.float32(0), jnp.float32(routing.experts.size))


def test_lb_loss_balanced_by_hand_and_skewed():
    n_experts, n_tokens = 4, 8
    row = np.array([0.7, 0.1, 0.1, 0.1])
    mask = jnp.ones((n_tokens,), bool)

    # Balanced: token t prefers expert t % 4; each expert gets 2 tokens and P_e = 1/4.
    probs = jnp.asarray(np.stack([np.roll(row, t) for t in range(n_tokens)]), jnp.float32)
    logits = jnp.log(probs)
    stats = moe.router_stats(
        logits, probs, mask, served(moe.top_k_routing(probs, mask, 1, True), n_experts)
    )
    np.testing.assert_allclose(np.asarray(stats.load), np.full(n_experts, 0.25), atol=1e-7)
    np.testing.assert_allclose(float(stats.lb_loss), 1.0, atol=1e-6)
    np.testing.assert_allclose(float(stats.max_load), 1.0, atol=1e-6)

    # Skewed: every token prefers expert 0 -> f = (1, 0, 0, 0), P_0 = 0.7, loss 4 * 0.7.
    probs = jnp.asarray(np.tile(row, (n_tokens, 1)), jnp.float32)
    routing = moe.top_k_routing(probs, mask, 1, True)
    stats = moe.router_stats(jnp.log(probs), probs, mask, served(routing, n_experts))
    np.testing.assert_allclose(float(stats.lb_loss), 2.8, rtol=1e-6)
    np.testing.assert_allclose(float(stats.max_load), 4.0, rtol=1e-6)


def test_lb_loss_larger_when_router_is_skewed():
    x = tokens(16) + 1.0  # a direction shared by all tokens ...
    layer = make_layer(**BLOCKS_4)
    _, random_stats = apply(layer, x)
    layer.w_router[...] = layer.w_router[...].at[:, 1].add(0.5)  # ... that expert 1 now likes
    _, skewed_stats = apply(layer, x)
    assert float(skewed_stats.max_load) == pytest.approx(2.0)  # e1 in every token's top 2
    assert float(skewed_stats.lb_loss) > 1.5
    assert float(skewed_stats.lb_loss) > float(random_stats.lb_loss) + 0.1


def test_router_stats_match_reference():
    n_experts, k = 8, 2
    layer = make_layer(**BLOCKS_8)
    x = tokens(24)
    _, stats = apply(layer, x)
    logits, probs = ref_router(layer, x)
    choices, _ = ref_topk(probs, k, True)
    load = np.bincount(choices.reshape(-1), minlength=n_experts) / choices.size
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(float(stats.z_loss), np.mean(lse**2), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(stats.load), load, atol=1e-6)
    np.testing.assert_allclose(
        float(stats.lb_loss), n_experts * np.sum(load * probs.mean(0)), rtol=1e-5
    )
    np.testing.assert_allclose(float(stats.max_load), n_experts * load.max(), rtol=1e-5)
    entropy = -np.sum(probs * np.log(probs), -1).mean()
    np.testing.assert_allclose(float(stats.entropy), entropy, rtol=1e-5)


# ------------------------------------------------------------------- router gradient


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("k", [1, 2])
def test_router_gets_gradient_from_output(dispatch, k):
    layer = make_layer(num_experts=4, top_k=k, dispatch=dispatch, renormalize=True)
    x = tokens(16)
    probe = jax.random.normal(jax.random.key(7), x.shape, jnp.float32)

    @nnx.jit
    def grads(layer):
        return nnx.grad(lambda m: jnp.sum(m(x)[0] * probe))(layer)

    g = np.asarray(grads(layer)["w_router"][...])
    assert np.isfinite(g).all()
    assert np.linalg.norm(g) > 1e-6


def _dense_jax_reference(params, x, k, scores=jax.nn.softmax, scale=1.0):
    """Differentiable dense reference in JAX (every expert on every token, renormalised
    top-k combine times scale; the choice of experts is piecewise constant, as in the
    layer). scores: the router's logits -> scores function."""
    probs = scores(x @ params["w_router"])
    top_p, top_e = jax.lax.top_k(probs, k)
    if k > 1:
        top_p = top_p / top_p.sum(-1, keepdims=True)
    top_p = top_p * scale
    w_te = jnp.zeros_like(probs).at[jnp.arange(x.shape[0])[:, None], top_e].add(top_p)
    g = jnp.einsum("td,edf->etf", x, params["w_gate_up"][:, :, 0])
    u = jnp.einsum("td,edf->etf", x, params["w_gate_up"][:, :, 1])
    y_etd = jnp.einsum("etf,efd->etd", jax.nn.silu(g) * u, params["w_down"])
    return jnp.einsum("te,etd->td", w_te, y_etd)


@pytest.mark.parametrize("kind", ["blocks", "batched", TOKAMAX])
@pytest.mark.parametrize("block, n_tokens", [(4, 11), (8, 40)])
def test_dropless_blocks_gradients_match_dense_reference(kind, block, n_tokens):
    # Both block matmuls have hand-written backward passes, and tokamax's ragged_dot its
    # own. E=8 with few tokens: some experts get no rows, and blocks past the used ones are
    # skipped (or computed on zeros). With 40 tokens most experts take a whole block of 8
    # and then the rest in one block.
    k = 2
    layer = make_layer(num_experts=8, top_k=k, grouped_matmul=kind, block_size=block)
    x = tokens(n_tokens)
    probe = jax.random.normal(jax.random.key(8), x.shape, jnp.float32)
    graphdef, state = nnx.split(layer)

    def layer_loss(state, x):
        return jnp.sum(nnx.merge(graphdef, state)(x)[0] * probe)

    def ref_loss(params, x):
        return jnp.sum(_dense_jax_reference(params, x, k) * probe)

    names = ("w_router", "w_gate_up", "w_down")
    got_state, got_x = jax.jit(jax.grad(layer_loss, argnums=(0, 1)))(state, x)
    params = {n: getattr(layer, n)[...] for n in names}
    want, want_x = jax.jit(jax.grad(ref_loss, argnums=(0, 1)))(params, x)
    for n in names:
        got, ref = np.asarray(got_state[n][...]), np.asarray(want[n])
        # A gradient summed over tokens has float32 rounding relative to its largest
        # element (~100 for the router here): a few ulps of that on top of TOL.
        atol = max(TOL["atol"], 2e-7 * float(np.abs(ref).max()))
        np.testing.assert_allclose(got, ref, rtol=TOL["rtol"], atol=atol, err_msg=n)
    np.testing.assert_allclose(np.asarray(got_x), np.asarray(want_x), **TOL, err_msg="x")


# ------------------------------------------------------------------------- padding


# CAPACITY_4 has capacity_factor E/k: no drops, so only the mask matters. With tokamax the
# padding tokens' rows ride in the last expert's group.
@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(BLOCKS_4, id="dropless"),
        pytest.param(CAPACITY_4, id="capacity"),
        pytest.param({**BLOCKS_4, "grouped_matmul": "tokamax"}, id="tokamax", marks=NEEDS_TOKAMAX),
    ],
)
def test_padding_tokens_get_zero_and_are_excluded_from_stats(overrides):
    n_experts, k, n_tokens = 4, 2, 16
    layer = make_layer(**overrides)
    x = tokens(n_tokens)
    mask = np.ones(n_tokens, bool)
    mask[[1, 5, 6, 14, 15]] = False
    y, stats = apply(layer, x, mask)
    y = np.asarray(y)

    np.testing.assert_array_equal(y[~mask], 0.0)
    np.testing.assert_allclose(y[mask], ref_token_choice(layer, x)[mask], **TOL)

    logits, probs = ref_router(layer, x)
    logits, probs = logits[mask], probs[mask]
    choices, _ = ref_topk(probs, k, True)
    load = np.bincount(choices.reshape(-1), minlength=n_experts) / choices.size
    lse = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(np.asarray(stats.load), load, atol=1e-6)
    np.testing.assert_allclose(
        float(stats.lb_loss), n_experts * np.sum(load * probs.mean(0)), rtol=1e-5
    )
    np.testing.assert_allclose(float(stats.z_loss), np.mean(lse**2), rtol=1e-5)
    assert float(stats.dropped) == 0.0

    # What a padding token holds changes nothing.
    x2 = jnp.where(jnp.asarray(mask)[:, None], x, 100.0)
    y2, stats2 = apply(layer, x2, mask)
    np.testing.assert_allclose(np.asarray(y2), y, **TOL)
    np.testing.assert_allclose(np.asarray(stats2.load), np.asarray(stats.load), atol=1e-7)
    np.testing.assert_allclose(float(stats2.z_loss), float(stats.z_loss), rtol=1e-6)


# --------------------------------------------------------------------- expert choice


@pytest.mark.parametrize("n_experts, k, factor, n_shared", [(4, 2, 1.0, 0), (8, 1, 1.5, 1)])
def test_expert_choice_matches_reference(n_experts, k, factor, n_shared):
    n_tokens = 16
    layer = make_layer(
        num_experts=n_experts,
        top_k=k,
        router="expert_choice",
        capacity_factor=factor,
        num_shared=n_shared,
    )
    x = tokens(n_tokens, seed=5)
    capacity = min(n_tokens, math.ceil(k * n_tokens / n_experts * factor))
    _, probs = ref_router(layer, x)
    w_te = np.zeros_like(probs)
    for e in range(n_experts):  # each expert takes its top-C tokens by probability
        chosen = np.argsort(-probs[:, e], kind="stable")[:capacity]
        w_te[chosen, e] = probs[chosen, e]
    assert ((w_te > 0).sum(0) == capacity).all()

    y, stats = apply(layer, x)
    np.testing.assert_allclose(np.asarray(y), ref_output(layer, x, w_te), **TOL)
    # Every expert processed exactly C tokens: the load is C / (E * C) each.
    np.testing.assert_allclose(np.asarray(stats.load), np.full(n_experts, 1 / n_experts), atol=1e-7)
    unserved = 1.0 - (w_te > 0).any(-1).mean()
    np.testing.assert_allclose(float(stats.dropped), unserved, atol=1e-6)


# ----------------------------------------------------------------------------- cost


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0]
    return float(cost["flops"])


def _trip_counted_flops(monkeypatch, fn, args, trips: int) -> float:
    """FLOPs of fn(*args) with its scans' bodies counted once per iteration.

    XLA's cost analysis counts a while-loop body once whatever its trip count, so the
    plain number leaves out all but one block of the grouped matmul. Compiled once with
    every scan rolled and once with two iterations per loop body (unroll=2), the difference
    is the cost of one iteration of each loop; every loop here runs `trips` times (the
    forward scan and its transpose over the same blocks), so the total is
    rolled + (trips - 1) * difference. `trips` must be even (no remainder iteration).
    """
    assert trips % 2 == 0
    scan = jax.lax.scan

    def count(unroll):
        monkeypatch.setattr(jax.lax, "scan", lambda *a, **kw: scan(*a, **{**kw, "unroll": unroll}))
        try:
            return _flops(lambda *a: fn(*a), *args)  # a new function: no trace cache hit
        finally:
            monkeypatch.setattr(jax.lax, "scan", scan)

    with kernels.counting_flops():  # the MoE layer's countable (static-bound) block form
        rolled = count(1)
        return rolled + (trips - 1) * (count(2) - rolled)


@pytest.mark.slow
@pytest.mark.cpu_flop_count
def test_dropless_blocks_cost_does_not_scale_with_experts(monkeypatch):
    # Blocks of 32 rows, as in the tiny preset; T*k/B = 256 blocks of real rows, so the
    # static bound's E spare blocks (skipped at run time, counted by cost analysis) are small.
    n_tokens, k, d_model, d_expert, block = 4096, 2, 32, 64, 32
    x = jax.random.normal(jax.random.key(0), (n_tokens, d_model), jnp.float32)

    def moe_flops(n_experts):
        cfg = config.load(
            "tiny",
            overrides={
                "model.d_model": d_model,
                "moe.num_experts": n_experts,
                "moe.top_k": k,
                "moe.d_expert": d_expert,
                "moe.dispatch": "dropless",
                "moe.grouped_matmul": "blocks",
                "moe.block_size": block,
            },
        )
        graphdef, state = nnx.split(moe.MoE(cfg, rngs=nnx.Rngs(0)))

        def fwd_bwd(state, x):
            loss = lambda s, x: jnp.sum(nnx.merge(graphdef, s)(x)[0] ** 2)
            return jax.grad(loss, argnums=(0, 1))(state, x)

        small = gm.smallest_block(block)
        n_blocks = -(-n_tokens * k // small) + n_experts  # expert_rows' static bound
        return _trip_counted_flops(monkeypatch, fwd_bwd, (state, x), n_blocks)

    def dense_fwd_bwd(w, x):
        def loss(w, x):
            h = jax.nn.silu(x @ w[0]) * (x @ w[1])
            return jnp.sum((h @ w[2]) ** 2)

        return jax.grad(loss, argnums=(0, 1))(w, x)

    width = k * d_expert
    keys = jax.random.split(jax.random.key(1), 3)
    shapes = [(d_model, width), (d_model, width), (width, d_model)]
    w = [jax.random.normal(kk, s, jnp.float32) for kk, s in zip(keys, shapes, strict=True)]
    dense = _flops(dense_fwd_bwd, w, x)
    e8, e32 = moe_flops(8), moe_flops(32)

    assert e8 >= dense, "the count must include every block's matmuls"
    assert e32 / e8 < 1.5, (e8, e32)
    assert e8 < 2 * dense and e32 < 2 * dense, (e8, e32, dense)


# ------------------------------------------------------------------ dispatch by index


@pytest.mark.parametrize("kind", ["capacity", "order"])
def test_dispatch_and_combine_gradients_equal_plain_indexing(kind):
    # dispatch/combine have hand-written backward passes (gathers, no scatter-add): they
    # must equal autodiff through plain indexing, drops and empty rows included.
    n_tokens, k, n_experts, d = 12, 2, 4, 3
    experts = jax.random.randint(jax.random.key(0), (n_tokens, k), 0, n_experts + 1)
    if kind == "capacity":  # E marks padding; capacity 2 drops some assignments
        placed = dispatch.capacity_rows(experts, n_experts, 2)
        layout, keep = dispatch.layout_from_rows(placed.rows, placed.n_rows), placed.keep
    else:
        order = jnp.argsort(experts.reshape(-1), stable=True)
        layout, keep = dispatch.layout_from_order(order, k), experts < n_experts
    n_rows = layout.source.shape[0]
    x = jax.random.normal(jax.random.key(1), (n_tokens, d))
    y_rows = jax.random.normal(jax.random.key(2), (n_rows, d))
    wts = jnp.where(keep, jax.random.uniform(jax.random.key(3), (n_tokens, k)), 0.0)

    def plain_dispatch(x):
        x_pad = jnp.concatenate([x, jnp.zeros((1, d))])
        return x_pad[layout.source // k]

    def plain_combine(y, w):
        y_pad = jnp.concatenate([y, jnp.zeros((1, d))])
        return jnp.einsum("tkd,tk->td", y_pad[layout.rows], w)

    probe_r = jax.random.normal(jax.random.key(4), (n_rows, d))
    probe_t = jax.random.normal(jax.random.key(5), (n_tokens, d))
    got = jax.grad(lambda x: jnp.sum(dispatch.gather_rows(x, layout) * probe_r))(x)
    want = jax.grad(lambda x: jnp.sum(plain_dispatch(x) * probe_r))(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **TOL)
    np.testing.assert_allclose(np.asarray(dispatch.gather_rows(x, layout)), plain_dispatch(x))
    got = jax.grad(lambda y, w: jnp.sum(dispatch.combine(y, w, layout) * probe_t), (0, 1))
    want = jax.grad(lambda y, w: jnp.sum(plain_combine(y, w) * probe_t), (0, 1))
    for g, w_ in zip(got(y_rows, wts), want(y_rows, wts), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), **TOL)


@pytest.mark.parametrize("block", [3, 8])
def test_counted_block_form_equals_the_per_expert_loops(block):
    # Training runs loop_swiglu (whole blocks of 8 rows, then the rest in one block of 2,
    # 4 or 6 for block=8; blocks of 3 for block=3); cost analysis counts scan_swiglu.
    # Same values and gradients, with some experts given no rows at all and others many.
    n_tokens, k, n_experts, d, f = 23, 2, 6, 8, 12
    choice = np.random.default_rng(0).choice([0, 2, 3, 5], (n_tokens, k), p=[0.6, 0.2, 0.1, 0.1])
    experts = jnp.asarray(choice, jnp.int32)
    blocks = gm.expert_rows(experts, n_experts, gm.smallest_block(block))
    n_rows = blocks.block_expert.shape[0] * gm.smallest_block(block)
    keys = jax.random.split(jax.random.key(0), 3)
    w = [
        0.3 * jax.random.normal(keys[1], (n_experts, d, 2, f)),  # gate and up
        0.3 * jax.random.normal(keys[2], (n_experts, f, d)),
    ]
    layout = dispatch.layout_from_rows(blocks.rows, n_rows)
    x = dispatch.gather_rows(jax.random.normal(keys[0], (n_tokens, d)), layout)  # [R, D]

    def loop(x, *w):  # what training runs
        return jnp.sum(jnp.sin(gm.loop_swiglu(x, blocks, block, gm.StackedExperts.single(*w))[0]))

    def scan(x, *w):  # what profile's FLOP count traces
        return jnp.sum(jnp.sin(gm.scan_swiglu(x, blocks, block, *w)))

    want = jax.value_and_grad(scan, argnums=(0, 1, 2))(x, *w)
    got = jax.value_and_grad(loop, argnums=(0, 1, 2))(x, *w)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    for g, w_ in zip(got[1], want[1], strict=True):  # summation order differs (GPU: 1.5e-5)
        np.testing.assert_allclose(np.asarray(g), np.asarray(w_), rtol=5e-5, atol=1e-5)
    assert not np.any(np.asarray(got[1][1])[[1, 4]]), "experts without rows get zero gradient"

    def recomputed(x, *w):  # the backward recomputes each block's gate/up product
        stack = gm.StackedExperts.single(*w)
        return jnp.sum(jnp.sin(gm.loop_swiglu(x, blocks, block, stack, recompute=True)[0]))

    again = jax.value_and_grad(recomputed, argnums=(0, 1, 2))(x, *w)
    for g, g_ in zip(jax.tree.leaves(again), jax.tree.leaves(got), strict=True):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(g_))

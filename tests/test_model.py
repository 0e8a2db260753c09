"""Transformer: causality, batch independence, KV-cache decoding, layer layout, axis names.

Models use the tiny preset (4 experts, top-2, dropless) and its variants.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparsemodel import config, evaluate, kernels, layers, model
from sparsemodel import grouped_matmul as gm

VOCAB = 256  # tiny preset
# Tests share these shapes so that models of one config reuse compiled forwards.
BATCH, SEQ, PROMPT = 4, 10, 4
# Capacity per sequence that must drop: C = ceil(2 * 32 / 4 * 0.25) = 4 slots per expert
# for the 20 assignments of SEQ tokens (tiny: train.seq_len 32, 4 experts, top-2).
CAPACITY = {"moe.dispatch": "capacity", "moe.capacity_factor": 0.25}
# The features of the Qwen/OLMoE/Llama 3 families at once (head_dim != d_model / n_heads).
QWEN_LIKE = {
    "model.head_dim": 24,
    "model.qkv_bias": True,
    "model.qk_norm": "full",
    "model.rope_scaling": "llama3",
    "model.rope_original_max_len": 8,
    "moe.num_shared": 1,
    "moe.d_shared": 40,
    "moe.shared_gate": True,
}


def make_lm(seed=0, **overrides) -> model.Transformer:
    """Transformer.from_config run abstractly (nnx.eval_shape), parameters drawn with NumPy.

    Eager initialisation compiles every op anew for each new parameter shape (seconds per
    configuration on CPU). Weights are N(0, 0.2^2), norm scales 1 + N(0, 0.1^2): at the
    preset's init_std of 0.02 attention would be near-uniform and every token would route
    alike, hiding position, cache and routing mistakes.
    """
    cfg = config.load("tiny", overrides=overrides)
    abstract = nnx.eval_shape(lambda: model.Transformer.from_config(cfg, rngs=nnx.Rngs(seed)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def draw(path, s):
        is_scale = "'scale'" in jax.tree_util.keystr(path)
        value = 1.0 + 0.1 * rng.normal(size=s.shape) if is_scale else rng.normal(0, 0.2, s.shape)
        return jnp.asarray(value, jnp.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(draw, state))


def abstract_lm(**overrides) -> model.Transformer:
    cfg = config.load("tiny", overrides=overrides)
    return nnx.eval_shape(lambda: model.Transformer.from_config(cfg, rngs=nnx.Rngs(0)))


def random_tokens(batch, seq, seed=0):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, VOCAB, jnp.int32)


@nnx.jit
def forward(lm, tokens):
    return lm(tokens)


@nnx.jit
def decode(lm, tokens, positions, cache):
    return lm.decode(tokens, positions, cache)


def output_shapes(lm, tokens):
    """Shapes of lm(tokens) from tracing alone (no compile; lm may be abstract)."""
    graphdef, state = nnx.split(lm)
    return jax.eval_shape(lambda s, t: nnx.merge(graphdef, s)(t), state, tokens)


def n_params(module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


# ------------------------------------------------------------------------ causality


def _rms_norm(x, scale, axes):
    return x / np.sqrt(np.mean(x * x, axis=axes, keepdims=True) + 1e-5) * scale


@pytest.mark.parametrize("qk_norm", ["none", "head", "full"])
def test_attention_projections_match_a_naive_reference(qk_norm):
    """q, k, v before RoPE: projection plus bias, then RMSNorm over each head ('head') or
    over all heads of the projection at once ('full', so one head's scale depends on the
    others')."""
    lm = make_lm(**{"model.head_dim": 24, "model.qkv_bias": True, "model.qk_norm": qk_norm})
    attn = lm.units.blocks[0].attn
    layer0 = nnx.merge(*nnx.split(attn)[:1], jax.tree.map(lambda a: a[0], nnx.split(attn)[1]))
    x = np.random.default_rng(0).normal(size=(2, 5, 64)).astype(np.float32)
    q, k, v = (np.asarray(a, np.float64) for a in layer0._project(jnp.asarray(x)))
    assert q.shape == (2, 5, 4, 24) and k.shape == v.shape == (2, 5, 2, 24)
    w = {n: np.asarray(getattr(layer0, n)[...], np.float64) for n in ("wq", "wk", "wv")}
    b = {n: np.asarray(getattr(layer0, f"{n}_bias")[...], np.float64) for n in "qkv"}
    want_q = np.einsum("btd,dhk->bthk", x, w["wq"]) + b["q"]
    want_k = np.einsum("btd,dhk->bthk", x, w["wk"]) + b["k"]
    want_v = np.einsum("btd,dhk->bthk", x, w["wv"]) + b["v"]
    if qk_norm != "none":
        axes = -1 if qk_norm == "head" else (-2, -1)
        want_q = _rms_norm(want_q, np.asarray(layer0.q_norm.scale[...]), axes)
        want_k = _rms_norm(want_k, np.asarray(layer0.k_norm.scale[...]), axes)
    for got, want in ((q, want_q), (k, want_k), (v, want_v)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_rope_frequencies_default_and_llama3():
    """Default: theta^(-2i/d_head). llama3: wavelengths below original_max_len /
    high_freq_factor unchanged, above original_max_len / low_freq_factor slowed by
    rope_factor, those between a blend that joins the two."""
    cfg = config.load("tiny", {"model.head_dim": 24, "model.rope_theta": 100.0})
    freqs = layers.rope_frequencies(cfg.model)
    np.testing.assert_allclose(freqs, 100.0 ** (-np.arange(12) / 12), rtol=1e-6)
    scaled_cfg = cfg.replace({"model.rope_scaling": "llama3", "model.rope_original_max_len": 64})
    scaled = layers.rope_frequencies(scaled_cfg.model)  # factor 8, low 1, high 4
    wavelen = 2 * np.pi / freqs
    short, long_ = wavelen < 64 / 4, wavelen > 64 / 1
    assert short.any() and long_.any() and (~short & ~long_).any()  # all three regimes
    np.testing.assert_array_equal(scaled[short], freqs[short])
    np.testing.assert_allclose(scaled[long_], freqs[long_] / 8, rtol=1e-6)
    between = ~short & ~long_
    assert np.all(scaled[between] < freqs[between]) and np.all(scaled[between] > freqs[between] / 8)


@pytest.mark.parametrize("n_kv", [4, 2])
def test_fused_causal_attention_equals_masked_reference(n_kv):
    """The training path (jax.nn.dot_product_attention; cuDNN's kernel on GPU) against the
    position-masked softmax the KV-cache path uses, with grouped-query heads too."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, 16, 4, 8))
    k = jax.random.normal(kk, (2, 16, n_kv, 8))
    v = jax.random.normal(kv, (2, 16, n_kv, 8))
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    want = layers.attend(q, k, v, pos, pos)
    got = layers.causal_attention(q, k, v, "xla")
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_moe_model_is_causal():
    lm = make_lm()  # tiny: 4 experts, top-2, dropless
    tokens = random_tokens(1, SEQ)
    base, _ = forward(lm, tokens)
    base = np.asarray(base)
    assert np.abs(base).max() > 0.1  # logits are not ~0, so "unchanged" means something
    for t in (0, 3, 6, SEQ - 1):
        changed = tokens.at[0, t].set((tokens[0, t] + 1) % VOCAB)
        logits = np.asarray(forward(lm, changed)[0])
        np.testing.assert_allclose(logits[:, :t], base[:, :t], rtol=0, atol=1e-6)
        assert np.abs(logits[:, t] - base[:, t]).max() > 1e-3, f"position {t} ignored its token"


def test_capacity_per_sequence_is_causal():
    """Later tokens of any sequence change no earlier output, though tokens are dropped (with
    one capacity for the whole batch, sequence 0's later tokens take sequence 1's slots)."""
    lm = make_lm(**CAPACITY)
    tokens = random_tokens(BATCH, SEQ, seed=3)
    base, stats = forward(lm, tokens)
    base = np.asarray(base)
    assert float(stats.dropped.min()) > 0  # every MoE layer drops
    for t in (2, 6):
        changed = tokens.at[:, t + 1 :].set(random_tokens(BATCH, SEQ - t - 1, seed=4 + t))
        logits = np.asarray(forward(lm, changed)[0])
        np.testing.assert_allclose(logits[:, : t + 1], base[:, : t + 1], rtol=0, atol=1e-6)
        assert np.abs(logits[:, t + 1] - base[:, t + 1]).max() > 1e-3


@pytest.mark.parametrize("overrides", [{}, CAPACITY], ids=["dropless", "capacity_per_sequence"])
def test_sequences_in_a_batch_are_independent(overrides):
    lm = make_lm(**overrides)
    batch = random_tokens(BATCH, SEQ, seed=1)
    together, stats = forward(lm, batch)
    alone, _ = forward(lm, batch[2:3])
    reversed_, _ = forward(lm, batch[::-1])
    together = np.asarray(together)
    np.testing.assert_allclose(np.asarray(alone[0]), together[2], rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(reversed_), together[::-1], rtol=0, atol=1e-5)
    if overrides:
        assert float(stats.dropped.min()) > 0  # every MoE layer drops
    else:
        assert float(stats.dropped.max()) == 0.0  # dropless


# ------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({}, id="moe"),
        pytest.param(CAPACITY, id="capacity_per_sequence"),
        pytest.param({"moe.num_experts": 0, "model.tie_embeddings": True}, id="dense_tied"),
        pytest.param(QWEN_LIKE, id="head_dim_bias_qk_norm_llama3_gated_shared"),
        pytest.param({"moe.pool": "global", "moe.num_experts": 6}, id="pool"),
        pytest.param(
            {"moe.first_dense": 1, "model.n_layers": 3}, id="first_dense", marks=pytest.mark.slow
        ),
        pytest.param(
            {"model.n_layers": 4, "model.share_layers": 2},
            id="share_layers",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_prefill_then_decode_matches_full_forward(overrides):
    lm = make_lm(**overrides)
    tokens = random_tokens(BATCH, SEQ, seed=2)
    positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))
    full, stats = forward(lm, tokens)
    full = np.asarray(full)
    if overrides is CAPACITY:  # the counts the cache carries decide real drops
        assert float(stats.dropped.min()) > 0

    cache = lm.init_cache(BATCH, SEQ + 3)  # slots past the last position stay empty
    logits, cache = decode(lm, tokens[:, :PROMPT], positions[:, :PROMPT], cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, :PROMPT], rtol=0, atol=1e-4)
    for t in range(PROMPT, SEQ):
        logits, cache = decode(lm, tokens[:, t : t + 1], positions[:, t : t + 1], cache)
        np.testing.assert_allclose(
            np.asarray(logits[:, 0]), full[:, t], rtol=0, atol=1e-4, err_msg=f"position {t}"
        )


def test_greedy_sampling_with_capacity_per_sequence_matches_full_forward():
    # evaluate.sample carries the per-expert counts through its compiled decoding loop.
    lm = make_lm(**CAPACITY)
    prompt = random_tokens(BATCH, PROMPT, seed=5)
    new = np.asarray(evaluate.sample(lm, prompt, SEQ - PROMPT, 0.0, 0, jax.random.key(0)))
    logits, stats = forward(lm, jnp.concatenate([prompt, jnp.asarray(new)], axis=1))
    assert float(stats.dropped.min()) > 0
    expected = np.argmax(np.asarray(logits[:, PROMPT - 1 : SEQ - 1]), axis=-1)
    np.testing.assert_array_equal(new, expected)


# --------------------------------------------------------------------- layer layout


def _block_params(cfg, kind: str) -> int:
    m, e = cfg.model, cfg.moe
    d, dh = m.d_model, m.d_model // m.n_heads
    attn = d * m.n_heads * dh * 2 + d * m.n_kv_heads * dh * 2  # wq, wo; wk, wv
    norms = 2 * d
    if kind == "dense":
        return attn + norms + 3 * d * m.d_ff
    return attn + norms + d * e.num_experts + 3 * e.num_experts * d * e.d_expert


def _outer_params(cfg) -> int:
    m = cfg.model
    return m.vocab_size * m.d_model * (1 if m.tie_embeddings else 2) + m.d_model


def test_moe_every_and_first_dense_place_layers():
    lm = abstract_lm(**{"moe.every": 2, "moe.first_dense": 1, "model.n_layers": 5})
    cfg = lm.cfg
    assert cfg.layer_plan().kinds() == ["dense", "dense", "moe", "dense", "moe"]
    logits, stats = output_shapes(lm, random_tokens(1, 6))
    assert logits.shape == (1, 6, VOCAB)
    for leaf in stats:
        assert leaf.shape[0] == 2  # stats of exactly two MoE layers
    expected = _outer_params(cfg) + 3 * _block_params(cfg, "dense") + 2 * _block_params(cfg, "moe")
    assert n_params(lm) == expected


def test_dense_model_has_no_stats():
    lm = abstract_lm(**{"moe.num_experts": 0})
    logits, stats = output_shapes(lm, random_tokens(1, 5))
    assert stats is None
    assert logits.shape == (1, 5, VOCAB)
    assert n_params(lm) == _outer_params(lm.cfg) + 2 * _block_params(lm.cfg, "dense")
    lb, z = model.aux_losses(None)
    assert float(lb) == 0.0 and float(z) == 0.0


def test_share_layers_reduces_unique_parameters():
    shared = abstract_lm(**{"model.n_layers": 4, "model.share_layers": 2})
    unshared = abstract_lm(**{"model.n_layers": 4})
    block = _block_params(shared.cfg, "moe")
    outer = _outer_params(shared.cfg)
    assert n_params(unshared) == outer + 4 * block
    assert n_params(shared) == outer + 2 * block

    tokens = random_tokens(2, 6)
    logits_s, stats_s = output_shapes(shared, tokens)
    logits_u, stats_u = output_shapes(unshared, tokens)
    assert logits_s.shape == logits_u.shape == (2, 6, VOCAB)
    assert stats_s.lb_loss.shape == stats_u.lb_loss.shape == (4,)  # still 4 MoE layers run


# ----------------------------------------------------------------------- axis names


def test_every_parameter_has_logical_axis_names():
    lm = abstract_lm(**{"moe.first_dense": 1, "model.n_layers": 3, **QWEN_LIKE})
    flat = list(nnx.to_flat_state(nnx.state(lm, nnx.Param)))
    assert len(flat) > 10
    seen_stacked = 0
    for path, var in flat:
        names = var.get_metadata()["out_sharding"]
        ndim = var.get_value().ndim
        assert isinstance(names, tuple), (path, names)
        assert len(names) == ndim, (path, names, ndim)
        assert all(n is None or isinstance(n, str) for n in names), (path, names)
        if path[0] in ("prefix", "units"):
            seen_stacked += 1
            assert names[0] == "layers", (path, names)
            assert "layers" not in names[1:], (path, names)
        else:
            assert "layers" not in names, (path, names)
    assert seen_stacked > 0


# ------------------------------------------------- expert weights read in place by the scan

EXPERT_STACK = {"moe.num_experts": 6, "moe.d_expert": 48}  # [E, D, 2, F] = [6, 64, 2, 48]


def _loss_and_grads(lm, tokens):
    graphdef, state = nnx.split(lm)

    def loss(state):
        logits, stats = nnx.merge(graphdef, state)(tokens)
        lb, z = model.aux_losses(stats)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 0]) + lb + z

    return jax.jit(jax.value_and_grad(loss)), state


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"moe.every": 2, "moe.first_dense": 1, "model.n_layers": 5},
        {"train.remat": "full"},
        {"train.dtype": "bfloat16"},
    ],
)
def test_scan_reading_experts_in_place_gives_the_same_gradients(overrides, monkeypatch):
    # The layer scan hands the MoE kernel the whole expert stack and carries the gradient's
    # sink (grouped_matmul.StackedExperts); the per-layer slices it replaces are the reference.
    lm = make_lm(**EXPERT_STACK, **overrides)
    tokens = random_tokens(BATCH, SEQ)
    singles = []
    single = gm.StackedExperts.single
    monkeypatch.setattr(gm.StackedExperts, "single", lambda *w: singles.append(1) or single(*w))
    fn, state = _loss_and_grads(lm, tokens)
    loss, grads = fn(state)
    assert not singles, "the scan should have read the expert stack in place"

    choose = kernels.choose
    no_stack = lambda cfg: dataclasses.replace(choose(cfg), experts_in_place=False)  # noqa: E731
    monkeypatch.setattr(kernels, "choose", no_stack)
    fn, _ = _loss_and_grads(lm, tokens)
    want_loss, want = fn(state)
    assert singles, "the reference should run one layer's slice at a time"
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    bf16 = "train.dtype" in overrides
    tol = {"rtol": 2e-2, "atol": 2e-3} if bf16 else {"rtol": 1e-5, "atol": 1e-7}
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(flat_want[path]), err_msg=str(path), **tol
        )


def test_scan_copies_no_layer_slice_of_the_expert_weights():
    # What the in-place read is for: no copy of a layer's [E, D, 2, F] or [E, F, D] experts
    # in either pass.
    lm = make_lm(**EXPERT_STACK)
    fn, state = _loss_and_grads(lm, random_tokens(BATCH, SEQ))
    hlo = fn.lower(state).compile().as_text()
    assert "f32[2,6,64,2,48]" in hlo and "f32[2,6,48,64]" in hlo  # the stacks themselves
    made = r"\{[\d,]*\} (dynamic-slice|dynamic-update-slice|fusion|copy|broadcast)\("
    layer_slices = re.findall(r"= f32\[(?:1,)*6,(?:64,2,48|64,96|48,64)\]" + made, hlo)
    assert not layer_slices, f"{len(layer_slices)} ops make a layer's expert weights"


# ----------------------------------------------- one expert pool shared by every MoE layer

POOL = {**EXPERT_STACK, "moe.pool": "global"}


def _per_layer_twin(pool_lm) -> model.Transformer:
    """The reference for a moe.pool=global model: a moe.pool=layer model with its weights in
    which every MoE layer's experts are a copy of the pool."""
    cfg = pool_lm.cfg.replace({"moe.pool": "layer"})
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: model.Transformer.from_config(cfg, rngs=nnx.Rngs(0)))
    )
    weights = nnx.to_pure_dict(nnx.state(pool_lm))
    pool = weights.pop("pool")
    for block in weights["units"]["blocks"].values():
        if "w_router" in block["ffn"]:
            n_unique = block["ffn"]["w_router"].shape[0]
            for name, w in pool.items():
                block["ffn"][name] = jnp.broadcast_to(w, (n_unique, *w.shape))
    nnx.replace_by_pure_dict(state, weights)
    return nnx.merge(graphdef, state)


def _moe_blocks(tree):
    """The MoE blocks' ffn nodes of a params tree (its units' blocks that hold a router)."""
    return [b["ffn"] for b in tree["units"]["blocks"].values() if "w_router" in b["ffn"]]


SHARED = {"model.n_layers": 4, "model.share_layers": 2}
EVERY = {"moe.every": 2, "moe.first_dense": 1, "model.n_layers": 5}


@pytest.mark.parametrize(
    "overrides, in_place",
    [
        pytest.param({}, True, id="in_place"),
        pytest.param({}, False, id="slices"),  # the kernels' reading under a mesh
        pytest.param(SHARED, True, id="share_layers_in_place"),
        pytest.param(SHARED, False, id="share_layers_slices"),
        pytest.param(
            {"moe.dispatch": "capacity", "moe.capacity_factor": 1.0}, False, id="capacity"
        ),
        pytest.param(EVERY, True, id="every", marks=pytest.mark.slow),
        pytest.param(EVERY, False, id="every_slices", marks=pytest.mark.slow),
        pytest.param(
            {"moe.grouped_matmul": "batched"}, False, id="batched", marks=pytest.mark.slow
        ),
        pytest.param({"train.remat": "full"}, True, id="remat", marks=pytest.mark.slow),
    ],
)
def test_pool_equals_every_layer_holding_a_copy_and_gets_their_summed_gradient(
    overrides, in_place, monkeypatch
):
    choose = kernels.choose
    no_stack = lambda cfg: dataclasses.replace(choose(cfg), experts_in_place=False)  # noqa: E731
    if not in_place:  # as under a mesh: the pool goes in as each MoE layer's weights
        monkeypatch.setattr(kernels, "choose", no_stack)
    singles = []
    single = gm.StackedExperts.single
    monkeypatch.setattr(gm.StackedExperts, "single", lambda *w: singles.append(1) or single(*w))
    lm = make_lm(**POOL, **overrides)
    tokens = random_tokens(BATCH, SEQ)
    fn, state = _loss_and_grads(lm, tokens)
    loss, grads = fn(state)
    if in_place:
        assert not singles, "the scan should have handed the layers the pool as a stack"
    twin_fn, twin_state = _loss_and_grads(_per_layer_twin(lm), tokens)
    want_loss, want = twin_fn(twin_state)

    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-6)
    grads, want = nnx.to_pure_dict(grads), nnx.to_pure_dict(want)
    tol = {"rtol": 1e-5, "atol": 1e-7}
    layers_hold = [{n: ffn.pop(n) for n in ("w_gate_up", "w_down")} for ffn in _moe_blocks(want)]
    for name, g in grads.pop("pool").items():
        summed = sum(np.asarray(held[name], np.float64).sum(0) for held in layers_hold)
        assert np.abs(summed).max() > 0
        np.testing.assert_allclose(np.asarray(g), summed, err_msg=name, **tol)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        np.testing.assert_allclose(
            np.asarray(g), np.asarray(flat_want[path]), err_msg=str(path), **tol
        )

"""Parameter and FLOP accounting against hand-computed numbers and XLA's own count, and the
peak FLOP/s that MFU divides by."""

from __future__ import annotations

import json
import math

import jax
import pytest
from flax import nnx

from sparsemodel import cli, config, flops, hardware, initialize, kernels, model, profile, sharding
from sparsemodel.steps import make_train_step


def test_tiny_parameter_counts_by_hand():
    # tiny: d=64, 2 layers, 4 heads of 16, 2 kv heads, vocab 256, 4 experts of width 64, top-2
    attention = 64 * 16 * (2 * 4 + 2 * 2)  # wq, wo: 4 heads; wk, wv: 2 kv heads = 12,288
    experts = 3 * 64 * 64 * 4  # gate, up, down of 4 experts = 49,152
    router, norms = 64 * 4, 2 * 64
    layer = attention + experts + router + norms  # 61,824
    embeddings = 2 * 256 * 64  # untied embedding + unembedding
    c = flops.param_counts(config.load("tiny"))
    assert c.total == c.unique == 2 * layer + 64 + embeddings == 156_480
    active_layer = attention + router + norms + 3 * 64 * 64 * 2  # two experts per token
    assert c.active_per_token == 2 * active_layer + 64 + 256 * 64 == 90_944
    assert c.embedding == embeddings
    assert c.breakdown["experts"] == 2 * experts


def test_small_parameter_counts_by_hand():
    # small: d=256, 4 layers, 4 heads of 64, vocab 256, 8 experts of width 512, top-2
    attention = 256 * 64 * 16  # 262,144
    layer = attention + 3 * 256 * 512 * 8 + 256 * 8 + 2 * 256  # 3,410,432
    c = flops.param_counts(config.load("small"))
    assert c.total == 4 * layer + 256 + 2 * 256 * 256 == 13_773_056
    active_layer = attention + 3 * 256 * 512 * 2 + 256 * 8 + 2 * 256
    assert c.active_per_token == 4 * active_layer + 256 + 256 * 256 == 4_270_336
    dense = flops.param_counts(config.load("small-dense"))
    assert dense.active_per_token == dense.total - 256 * 256  # all but the embedding lookup
    # A dense model with tied embeddings uses every parameter for every token.
    tied = flops.param_counts(config.load("small-dense", {"model.tie_embeddings": True}))
    assert tied.active_per_token == tied.total == dense.total - 256 * 256
    # Equal active compute: small and small-dense differ by the router only.
    assert c.active_per_token - dense.active_per_token == 4 * 256 * 8


def test_hf_family_features_counted_by_hand():
    """Heads of 24 (not d_model / n_heads = 16), q/k/v biases, q/k norms over all heads,
    and one shared expert of width 40 behind a sigmoid gate; tiny otherwise."""
    overrides = {"model.head_dim": 24, "model.qkv_bias": True, "model.qk_norm": "full"}
    overrides |= {"moe.num_shared": 1, "moe.d_shared": 40, "moe.shared_gate": True}
    cfg = config.load("tiny", overrides)
    attention = 64 * 24 * (2 * 4 + 2 * 2)  # wq, wo: 4 heads of 24; wk, wv: 2 = 18,432
    biases = 24 * (4 + 2 + 2)  # q, k, v = 192
    norms = 2 * 64 + 24 * (4 + 2)  # two block norms, q and k norm scales = 272
    shared = 3 * 64 * 40 + 64  # gate, up, down of width 40, sigmoid gate [64, 1] = 7,744
    router, routed = 64 * 4, 3 * 64 * 64  # one expert's gate, up, down
    c = flops.param_counts(cfg)
    layer = attention + biases + norms + shared + router + 4 * routed
    assert c.total == 2 * layer + 64 + 2 * 256 * 64 == 184_928
    abstract = nnx.eval_shape(lambda: model.Transformer.from_config(cfg, rngs=nnx.Rngs(0)))
    assert c.total == sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    active_layer = attention + biases + norms + shared + router + 2 * routed
    assert c.active_per_token == 2 * active_layer + 64 + 256 * 64
    # Biases and norm scales multiply nothing; attention runs 4 heads of 24.
    matmul = 2 * (attention + shared + router + 2 * routed) + 256 * 64
    assert flops.matmul_params_per_token(cfg) == matmul
    assert flops.model_flops_per_token(cfg) == 6 * matmul + 6 * 2 * 32 * 4 * 24


def test_sharing_keeps_flops_and_cuts_unique_parameters():
    base = config.load("tiny", {"model.n_layers": 4})
    shared = config.load("tiny", {"model.n_layers": 4, "model.share_layers": 2})
    a, b = flops.param_counts(base), flops.param_counts(shared)
    assert a.total == b.total and b.unique < a.unique
    layer = a.breakdown["attention"] // 4 + a.breakdown["experts"] // 4
    assert a.unique - b.unique == 2 * (layer + 64 * 4 + 2 * 64)
    assert flops.model_flops_per_token(base) == flops.model_flops_per_token(shared)


@pytest.mark.parametrize("share", [0, 2])
def test_a_global_expert_pool_counts_once_and_costs_what_per_layer_experts_cost(share):
    # tiny, 4 layers, with 8 experts: one pool of 8 that every layer routes into.
    layered = config.load(
        "tiny", {"model.n_layers": 4, "model.share_layers": share, "moe.num_experts": 8}
    )
    pooled = layered.replace({"moe.pool": "global"})
    a, b = flops.param_counts(layered), flops.param_counts(pooled)
    pool = 3 * 64 * 64 * 8  # gate, up, down of 8 experts of width 64 = 98,304
    unique_layers = share or 4
    assert b.breakdown["experts"] == pool
    assert a.unique - b.unique == (unique_layers - 1) * pool
    assert b.total == b.unique + (a.total - a.unique) - (4 - unique_layers) * pool
    assert b.active_per_token == a.active_per_token  # still top-2 of 8 per layer
    assert flops.model_flops_per_token(pooled) == flops.model_flops_per_token(layered)
    _, shapes = initialize.abstract_params(pooled, sharding.abstract_mesh(pooled.mesh))
    assert initialize.count(shapes) == b.unique


def test_model_flops_formula():
    cfg = config.load("tiny")
    c = flops.param_counts(cfg)
    matmul = c.active_per_token - (2 * 64 * 2 + 64)  # norms do no matmul
    attention = 6 * 2 * 32 * 4 * 16  # 6 L S H dh
    assert flops.model_flops_per_token(cfg) == 6 * matmul + attention


@pytest.mark.slow
@pytest.mark.cpu_flop_count
def test_compiled_flops_agree_with_model_flops_on_a_dense_config():
    cfg = config.load("small-dense", {"train.batch_size": 4, "train.steps": 10})
    r = profile.profile(cfg, steps=1)
    ratio = r["compiled"]["hw_model_flops_ratio"]
    # XLA also computes the masked half of causal attention: a few percent here.
    assert 0.95 < ratio < 1.10, ratio
    assert r["params"]["counted_from_arrays"] == r["params"]["unique"]
    assert r["measured"]["mfu"] > 0 and r["measured"]["tokens_per_s"] > 0


def test_gpu_batched_form_is_not_a_dense_fallback(monkeypatch):
    # The GPU grouped matmul, counted on any backend (on GPU from the compiled program's
    # matmuls): padding blocks aside, it does the model's work, not E/k = 4 times it.
    traced_unrolled = []

    def spy(*args):
        step = make_train_step(*args)

        def traced(*a):
            traced_unrolled.append(kernels.choose(cfg).unroll is True)
            return step(*a)

        return traced

    monkeypatch.setattr(profile, "make_train_step", spy)
    cfg = config.load("tiny", {"moe.grouped_matmul": "batched", "train.steps": 10})
    c = profile.profile(cfg, steps=1)["compiled"]
    # The counting form (loops unrolled) and the timed step are traced apart: jax caches a
    # jitted function's trace, and one jit for both timed the counting form.
    assert traced_unrolled == [True, False], traced_unrolled
    assert c["hw_model_flops_ratio"] < 1.35, c
    # The matmuls are most of the work even at this size, and never more than all of it.
    assert 0.8 * c["flops_per_step"] < c["matmul_flops_per_step"] <= c["flops_per_step"], c


@pytest.mark.slow
@pytest.mark.cpu_flop_count
def test_moe_small_compiled_flops_stay_near_model_flops(tmp_path):
    cfg = config.load("small", {"train.batch_size": 4})  # the preset, a quarter of the batch
    plot = tmp_path / "load.png"
    r = profile.profile(cfg, steps=1, plot=str(plot), trace_dir=str(tmp_path / "trace"))
    ratio = r["compiled"]["hw_model_flops_ratio"]
    # E/k = 4 would mean every expert runs on every token.
    assert ratio < 1.35, ratio
    assert r["params"]["counted_from_arrays"] == r["params"]["unique"]
    routing = r["routing"]
    assert len(routing["load"]) == 4 and len(routing["load"][0]) == 8
    for load in routing["load"]:
        assert abs(sum(load) - 1.0) < 1e-5
    assert plot.stat().st_size > 1000
    traces = list((tmp_path / "trace").rglob("*.xplane.pb"))
    assert traces and traces[0].stat().st_size > 0
    text = profile.format_report(r)
    assert "hw / model FLOPs" in text and "MFU" in text


def test_abstract_gpt4_scale_profile_without_allocating(capsys):
    rc = cli.main(["profile", "--config", "gpt4-scale", "--abstract", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)
    assert abs(r["params"]["total"] - 1.76e12) / 1.76e12 < 0.02
    assert r["params"]["counted_from_shapes"] == r["params"]["unique"]
    assert r["mesh"] == {"data": 16, "fsdp": 8, "expert": 16, "tensor": 8}
    per_device = r["memory"]["params_bytes_per_device"]
    # Experts split 16 x 8 x 8 ways, everything else at least 8 x 8 ways (fsdp x tensor).
    assert per_device < 4 * r["params"]["total"] / 64
    assert r["params"]["active_per_token"] < r["params"]["total"] / 5


# device_kind strings as JAX reports them -> dense bf16 peak of one chip (vendor data sheets)
REAL_KINDS = [
    ("NVIDIA H100 80GB HBM3", 989e12),
    ("NVIDIA H100 PCIe", 756e12),
    ("NVIDIA H100 NVL", 835e12),
    ("NVIDIA H200", 989e12),
    ("NVIDIA H200 NVL", 835e12),
    ("NVIDIA GH200 480GB", 989e12),
    ("NVIDIA B200", 2250e12),
    ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA A100 80GB PCIe", 312e12),
    ("NVIDIA L4", 121e12),
    ("NVIDIA L40", 181e12),
    ("NVIDIA L40S", 362e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12),
]


@pytest.mark.parametrize("kind, peak", REAL_KINDS, ids=[k for k, _ in REAL_KINDS])
@pytest.mark.parametrize("order", ["as listed", "reversed"])
def test_peak_flops_by_whole_words_most_specific_first(kind, peak, order, monkeypatch):
    if order == "reversed":  # the match must not depend on the order the table lists names
        monkeypatch.setattr(hardware, "PEAK_FLOPS", dict(reversed(hardware.PEAK_FLOPS.items())))
    assert hardware.peak_flops(kind, "gpu") == (peak, f"table: {kind} dense bf16")


@pytest.mark.parametrize("kind", ["NVIDIA Z9000", "NVIDIA L4000", "TPU v55", "NVIDIA H1000"])
def test_unknown_device_kind_has_no_peak_and_says_its_name(kind):
    peak, source = hardware.peak_flops(kind, "gpu")
    assert math.isnan(peak)
    assert source == f"unknown device kind {kind!r}"


def test_device_memory_on_cpu_is_the_memory_available(monkeypatch):
    if jax.devices()[0].platform != "cpu":
        pytest.skip("accelerators report their allocator's limit")
    monkeypatch.setattr(hardware, "host_memory_available", lambda: 123 * 2**20)
    assert hardware.device_memory_available() == (123 * 2**20, "memory available")

"""Hugging Face families (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral; dense Llama, Mistral, Qwen2,
Qwen3): parity with transformers, exact round trips, refusals, export from scratch.

Every model is a tiny random one built by transformers here (never downloaded), with heads
of 24 where the family allows a head_dim other than hidden_size / heads (64 / 4 = 16), and
norm scales and biases drawn at random (transformers initialises them to 1 and 0, which
would hide a norm or bias put in the wrong place).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_hf import hf_logits, import_hf, our_logits, refusal, tokens, workdir_at_init  # noqa: E402

from sparsemodel import cli, config, evaluate, hf, hf_families, layers  # noqa: E402

BASE = dict(
    vocab_size=256,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    # Wider than the default 0.02 so routing is decisive and logits are not near-uniform.
    initializer_range=0.15,
    bos_token_id=None,
    eos_token_id=None,  # greedy decoding must not stop early on a random "end" token
    pad_token_id=None,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 10000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # Short, so that the tiny heads' wavelengths fall in all three regimes of the scaling.
    "original_max_position_embeddings": 16,
}
# model_type: (config class, model class, settings). Each exercises its family's features:
# Qwen3-MoE a dense first layer (mlp_only_layers) and norm_topk_prob; Qwen2-MoE MoE in
# every second layer (decoder_sparse_step) without renormalisation; Llama 3 RoPE scaling
# and tied embeddings.
FAMILIES = {
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            head_dim=24,
            intermediate_size=80,
            moe_intermediate_size=48,
            num_experts=6,
            num_experts_per_tok=3,
            norm_topk_prob=True,
            num_hidden_layers=3,
            mlp_only_layers=[0],
        ),
    ),
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            head_dim=24,
            intermediate_size=80,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=40,
            num_experts=6,
            num_experts_per_tok=2,
            num_hidden_layers=4,
            decoder_sparse_step=2,
        ),
    ),
    "olmoe": (  # its q/k norms span hidden_size: head_dim must be 64 / 4
        "OlmoeConfig",
        "OlmoeForCausalLM",
        dict(intermediate_size=48, num_experts=6, num_experts_per_tok=2),
    ),
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(head_dim=24, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2),
    ),
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            head_dim=24, intermediate_size=96, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE
        ),
    ),
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(head_dim=24, intermediate_size=96, sliding_window=None),
    ),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(head_dim=24, intermediate_size=96)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=24, intermediate_size=96)),
}
MOE = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral")
# The MoE families compile more (router, dispatch, the decoding loop): seconds more each,
# so all but Qwen3-MoE run with the slow tests.
BY_COST = [
    pytest.param(f, marks=pytest.mark.slow) if f in MOE and f != "qwen3_moe" else f
    for f in FAMILIES
]


def tiny(family: str, seed: int = 0, **overrides):
    """A tiny random transformers model of the family, norm scales and biases drawn too."""
    config_class, model_class, settings = FAMILIES[family]
    torch.manual_seed(seed)
    cfg = getattr(transformers, config_class)(**{**BASE, **settings, **overrides})
    model = getattr(transformers, model_class)(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    return model


def state_dicts_equal(a, b) -> list[str]:
    """Names of the tensors that differ (or exist in one only) between two state dicts."""
    a, b = a.state_dict(), b.state_dict()
    return sorted((a.keys() ^ b.keys()) | {k for k in a.keys() & b.keys() if not a[k].equal(b[k])})


# ------------------------------------------------------------------------- import


@pytest.mark.parametrize("family", BY_COST)
def test_import_matches_transformers_logits_routing_and_greedy_decoding(tmp_path, family):
    model = tiny(family)
    model.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "wd")
    cfg = config.load(tmp_path / "wd" / "config.yaml")
    assert cfg.model.d_head == (16 if family == "olmoe" else 24)

    batch = tokens((2, 24))
    r = evaluate.restore(tmp_path / "wd")
    with jax.set_mesh(r.mesh):
        logits, stats = r.model()(jnp.asarray(batch, jnp.int32))
    with torch.no_grad():
        out = model(torch.tensor(batch), output_router_logits=family in MOE)
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4)

    if family in MOE:  # each MoE layer sends as many assignments to each expert as HF's
        k, n_experts = cfg.moe.top_k, cfg.moe.num_experts
        assert len(out.router_logits) == stats.load.shape[0]
        for layer, router_logits in enumerate(out.router_logits):  # [B*S, E] each
            chosen = torch.topk(torch.softmax(router_logits, -1), k, dim=-1).indices
            hf_load = np.bincount(chosen.numpy().ravel(), minlength=n_experts)
            np.testing.assert_allclose(np.asarray(stats.load[layer]) * batch.size * k, hf_load)

    prompt = tokens((1, 5), seed=2)
    with torch.no_grad():
        want = model.generate(
            torch.tensor(prompt), max_new_tokens=16, do_sample=False, pad_token_id=0
        )[0, 5:].numpy()
    with jax.set_mesh(r.mesh):
        got = evaluate.sample(
            r.model(), jnp.asarray(prompt, jnp.int32), 16, 0.0, 0, jax.random.key(0)
        )
    assert len(set(want.tolist())) > 3, want  # a non-degenerate continuation
    np.testing.assert_array_equal(np.asarray(got)[0], want)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_moe", "olmoe"])
def test_import_reads_bfloat16_and_transformers5_fused_experts(tmp_path, family):
    """A state_dict saved as it is in memory (experts fused into gate_up_proj / down_proj,
    transformers 5) in bfloat16, beside a gated shared expert or full q/k norms."""
    from safetensors.torch import save_file

    model = tiny(family, seed=3)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.1.mlp.experts.gate_up_proj" in state
    # The reference: the bf16 weights in a float32 model (its RoPE buffers stay float32).
    model.load_state_dict({k: v.float() for k, v in state.items()})
    (tmp_path / "hf").mkdir()
    save_file(state, tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_text(model.config.to_json_string())
    import_hf(tmp_path / "hf", tmp_path / "wd")
    batch = tokens((2, 16))
    np.testing.assert_allclose(
        our_logits(tmp_path / "wd", batch), hf_logits(model, batch), atol=1e-4
    )


def test_import_maps_each_familys_settings(tmp_path):
    """What each family's config.json becomes in ours (the parity test checks the maths)."""
    expected = {
        "qwen3_moe": {"model.qk_norm": "head", "moe.first_dense": 1, "moe.renormalize": True},
        "qwen2_moe": {
            "model.qkv_bias": True,
            "moe.every": 2,
            "moe.num_shared": 1,
            "moe.d_shared": 40,
            "moe.shared_gate": True,
            "moe.renormalize": False,
        },
        "olmoe": {"model.qk_norm": "full", "model.head_dim": 0, "moe.d_expert": 48},
        "llama": {"model.rope_scaling": "llama3", "model.rope_original_max_len": 16},
        "qwen2": {"model.qkv_bias": True, "moe.num_experts": 0, "model.d_ff": 96},
        "qwen3": {"model.qk_norm": "head", "model.head_dim": 24, "moe.num_experts": 0},
    }
    for family, settings in expected.items():
        src = tmp_path / family
        src.mkdir()
        (src / "config.json").write_text(tiny(family).config.to_json_string())
        hf_cfg = json.loads((src / "config.json").read_text())
        cfg = hf_families.config_from_hf(hf_cfg, "config.json")
        flat = {f"{s}.{k}": v for s, section in cfg.to_dict().items() for k, v in section.items()}
        assert {k: flat[k] for k in settings} == settings, family


# ------------------------------------------------------------------------- export


@pytest.mark.parametrize("family", FAMILIES)
def test_export_round_trip_is_exact(tmp_path, family):
    """import-hf -> export-hf -> from_pretrained: every tensor and the logits bit for bit,
    as the family it came from, in shards of --max-shard-size, with generation_config.json."""
    model = tiny(family)
    # Settings only generation_config.json holds.
    model.generation_config.do_sample, model.generation_config.temperature = True, 0.7
    model.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "wd")
    out = tmp_path / "out"
    argv = ["export-hf", "--workdir", str(tmp_path / "wd"), str(out), "--max-shard-size", "100KB"]
    assert cli.main(argv) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    assert type(loaded) is type(model)
    assert state_dicts_equal(loaded, model) == []
    batch = torch.tensor(tokens((2, 24)))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(batch).logits, model(batch).logits)
    assert loaded.generation_config.do_sample and loaded.generation_config.temperature == 0.7


SLOW = pytest.mark.slow
EXPORTS = [  # tiny (4 heads of 16, 2 KV heads, 4 experts top-2) with overrides -> the family
    pytest.param({"moe.num_experts": 0, "model.head_dim": 24}, "llama", id="llama"),
    pytest.param({"moe.num_experts": 0, "model.qkv_bias": True}, "qwen2", id="qwen2"),
    pytest.param(
        {"moe.num_experts": 0, "model.qk_norm": "head", "model.rope_scaling": "llama3"},
        "qwen3",
        id="qwen3",
    ),
    pytest.param(
        {"model.qk_norm": "head", "moe.first_dense": 1, "model.n_layers": 3},
        "qwen3_moe",
        id="qwen3_moe",
        marks=SLOW,
    ),
    pytest.param(
        {"model.qkv_bias": True, "moe.num_shared": 1, "moe.d_shared": 40, "moe.shared_gate": True},
        "qwen2_moe",
        id="qwen2_moe",
        marks=SLOW,
    ),
    pytest.param(
        {"model.qk_norm": "full", "moe.renormalize": False}, "olmoe", id="olmoe", marks=SLOW
    ),
]


@pytest.mark.parametrize("overrides, family", EXPORTS)
def test_export_of_a_model_trained_from_scratch_picks_the_family_that_expresses_it(
    tmp_path, overrides, family
):
    wd = tmp_path / "wd"
    workdir_at_init(wd, {**overrides, "model.init_std": 0.2, "model.rope_original_max_len": 8})
    files = hf.export_hf(wd, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == family
    assert (tmp_path / "out" / "generation_config.json") in files
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not any(info.values()), info
    batch = tokens((2, 16))
    np.testing.assert_allclose(hf_logits(loaded.eval(), batch), our_logits(wd, batch), atol=1e-4)


@pytest.mark.slow
def test_qwen3_moe_fine_tuned_for_20_steps_loads_back_in_transformers(tmp_path):
    """import-hf a Qwen3-MoE -> train 20 steps (fresh optimizer) -> export-hf ->
    from_pretrained holds exactly our fine-tuned weights, which moved from the original."""
    from safetensors.numpy import load_file

    from sparsemodel import tokenizer as tokenizer_lib

    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n" * 60)
    model = tiny("qwen3_moe", vocab_size=300)
    model.save_pretrained(tmp_path / "hf")
    raw = np.frombuffer(text.read_bytes(), np.uint8)
    tokenizer_lib.train_bpe(raw, 300).save(tmp_path / "hf" / "tokenizer.json")
    wd = tmp_path / "wd"
    import_hf(tmp_path / "hf", wd)
    settings = [f"data.source={text}", "train.steps=20", "train.batch_size=2", "train.seq_len=16"]
    settings += ["train.eval_every=1000", "train.lr=1e-3", "train.warmup_steps=0"]
    assert cli.main(["train", "--workdir", str(wd), "--set", *settings]) == 0
    losses = [json.loads(ln)["loss"] for ln in (wd / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 20 and losses[-1] < losses[0]

    assert cli.main(["export-hf", "--workdir", str(wd), str(tmp_path / "out")]) == 0
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded).__name__ == "Qwen3MoeForCausalLM"
    r = evaluate.restore(wd)
    assert r.step == 20
    tensors = load_file(tmp_path / "out" / "model.safetensors")  # what from_pretrained read
    for slot in hf.slots(r.cfg, hf_families.FAMILIES["qwen3_moe"]):
        ours = r.params
        for key in slot.leaf:
            ours = ours[key]
        want = slot.to_hf(np.asarray(ours[...])[slot.index])
        np.testing.assert_array_equal(tensors.pop(slot.hf), want, err_msg=slot.hf)
    assert not tensors  # and nothing else
    moved = state_dicts_equal(loaded, model)
    assert "model.layers.1.self_attn.q_norm.weight" in moved
    assert "model.layers.2.mlp.experts.gate_up_proj" in moved
    batch = tokens((2, 16), vocab=300)
    np.testing.assert_allclose(hf_logits(loaded, batch), our_logits(wd, batch), atol=1e-4)


def test_export_leaves_the_imported_family_when_it_cannot_express_the_model(tmp_path, capsys):
    """A workdir that says it came from Llama but holds an MoE (e.g. upcycled) is written
    as the first MoE family that expresses it; naming Llama is refused."""
    wd = tmp_path / "wd"
    workdir_at_init(wd)
    (wd / "hf_config.json").write_text(json.dumps({"model_type": "llama", "eos_token_id": 7}))
    hf.export_hf(wd, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written["model_type"] == "mixtral" and written["eos_token_id"] == 7
    argv = ["export-hf", "--workdir", str(wd), str(tmp_path / "out2"), "--model-type", "llama"]
    assert "Llama cannot express moe.num_experts=4: an MoE model" in refusal(argv, capsys)


def test_export_as_another_family_that_expresses_the_model(tmp_path):
    """A dense model without biases or q/k norms is Llama and Mistral alike."""
    wd = tmp_path / "wd"
    workdir_at_init(wd, {"moe.num_experts": 0, "model.init_std": 0.2})
    hf.export_hf(wd, tmp_path / "out", model_type="mistral")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(loaded).__name__ == "MistralForCausalLM"
    assert loaded.config.sliding_window is None
    batch = tokens((2, 16))
    np.testing.assert_allclose(hf_logits(loaded, batch), our_logits(wd, batch), atol=1e-4)


@pytest.mark.parametrize(
    "overrides, args, message",
    [
        ({}, ["--model-type", "qwen3_moe"], "Qwen3-MoE cannot express model.qk_norm=none"),
        ({}, ["--model-type", "llama"], "Llama cannot express moe.num_experts=4: an MoE model"),
        (
            {"moe.num_experts": 0},
            ["--model-type", "qwen2"],
            "Qwen2 cannot express model.qkv_bias=false (its q/k/v biases: always)",
        ),
        (
            {"model.qkv_bias": True},
            ["--model-type", "qwen2_moe"],
            "Qwen2-MoE cannot express moe.num_shared=0 (its shared expert is always there)",
        ),
        (
            {"model.qkv_bias": True, "moe.num_shared": 1},
            ["--model-type", "qwen2_moe"],
            "Qwen2-MoE cannot express moe.shared_gate=false (its shared expert is always gated)",
        ),
        (
            {"model.qk_norm": "full", "model.head_dim": 24},
            ["--model-type", "olmoe"],
            "OLMoE cannot express model.head_dim=24 with d_model 64 and 4 heads",
        ),
        (
            {"model.qk_norm": "full", "moe.every": 2, "model.n_layers": 4},
            ["--model-type", "olmoe"],
            "OLMoE cannot express moe.every/first_dense: layers mixing dense and MoE",
        ),
        (
            {"model.qk_norm": "head", "model.qkv_bias": True},
            [],
            "export-hf: no Hugging Face family expresses this model (mixtral: model.qk_norm=head",
        ),
        ({}, ["--model-type", "gpt2"], "--model-type 'gpt2': not one of mixtral, qwen3_moe"),
        ({}, ["--max-shard-size", "lots"], "--max-shard-size 'lots': expected a size such as"),
        ({}, ["--max-shard-size", "0KB"], "--max-shard-size '0KB': expected a size such as"),
    ],
)
def test_export_refuses_what_the_family_cannot_express(tmp_path, capsys, overrides, args, message):
    wd = tmp_path / "wd"
    wd.mkdir()
    config.dump(config.load("tiny", overrides), wd / "config.yaml")
    argv = ["export-hf", "--workdir", str(wd), str(tmp_path / "out"), *args]
    assert message in refusal(argv, capsys)
    assert not (tmp_path / "out").exists()


def test_max_shard_size_reads_save_pretrained_sizes():
    assert hf.parse_size("5GB") == 5 * 10**9
    assert hf.parse_size("2GiB") == 2 * 2**30
    assert hf.parse_size("500mb") == 500 * 10**6
    assert hf.parse_size("1.5KB") == 1500
    assert hf.parse_size("4096") == 4096


# ----------------------------------------------------------------------- refusals


def family_json(family: str, **changes) -> dict:
    return {**json.loads(tiny(family).config.to_json_string()), **changes}


@pytest.mark.parametrize(
    "family, changes, message",
    [
        ("qwen3_moe", {"model_type": "qwen4_moe"}, "model_type 'qwen4_moe' is not supported"),
        ("qwen3_moe", {"model_type": "deepseek_v3"}, "multi-head latent attention (MLA)"),
        (
            "qwen3_moe",
            {"use_sliding_window": True, "sliding_window": 64},
            "use_sliding_window=true (sliding_window 64) does not map",
        ),
        (
            "qwen2",
            {"layer_types": ["full_attention", "sliding_attention"]},
            "layer_types 'sliding_attention' does not map",
        ),
        (
            "mistral",
            {"sliding_window": 32, "max_position_embeddings": 128},
            "sliding_window 32 < max_position_embeddings 128 does not map",
        ),
        ("llama", {"attention_bias": True}, "attention_bias=true does not map"),
        ("llama", {"mlp_bias": True}, "mlp_bias=true does not map"),
        (
            "llama",
            {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
            "RoPE scaling 'yarn' does not map (ours: default, llama3)",
        ),
        ("llama", {"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 does not map"),
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv 8.0 does not map"),
        (
            "olmoe",
            {"head_dim": 24},
            "head_dim 24 != hidden_size/num_attention_heads (64/4) does not map",
        ),
        (
            "qwen3_moe",
            {"num_experts_per_tok": 1},  # with norm_topk_prob: weight 1.0
            "num_experts_per_tok=1 with renormalised weights (always 1.0) does not map",
        ),
        (
            "qwen3_moe",
            {"mlp_only_layers": [1]},
            "decoder_sparse_step=1, mlp_only_layers=[1] put MoE in layers [0, 2], which does "
            "not map",
        ),
        ("qwen2_moe", {"decoder_sparse_step": 3}, "put MoE in layers [2], which does not map"),
        ("qwen3_moe", {"mlp_only_layers": "0"}, "mlp_only_layers: expected a list of layer"),
        ("llama", {"hidden_act": "gelu"}, "hidden_act 'gelu' does not map"),
    ],
)
def test_import_refuses_what_does_not_map_in_one_line(tmp_path, capsys, family, changes, message):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(family_json(family, **changes)))
    argv = ["import-hf", str(src), "--workdir", str(tmp_path / "wd")]
    assert message in refusal(argv, capsys)
    assert sorted(tmp_path.iterdir()) == [src]


# Per family: a tensor only that family has, in a wrong layout or shape, and the message.
MALFORMED = {
    "qwen3_moe": (
        "model.layers.0.mlp.gate_proj.weight",  # the dense first layer's
        np.transpose,
        "shape (64, 80) in the checkpoint, expected (80, 64) from config.json",
    ),
    "qwen2_moe": (
        "model.layers.1.mlp.shared_expert_gate.weight",
        np.transpose,
        "shape (64, 1) in the checkpoint, expected (1, 64) from config.json",
    ),
    "olmoe": (
        "model.layers.1.self_attn.k_norm.weight",  # per head (16) instead of all heads (32)
        lambda w: w[:16],
        "shape (16,) in the checkpoint, expected (32,) from config.json",
    ),
    "mixtral": (
        "model.layers.0.self_attn.q_proj.weight",
        np.transpose,
        "shape (64, 96) in the checkpoint, expected (96, 64) from config.json",
    ),
    "llama": (
        "model.layers.1.self_attn.o_proj.weight",
        np.transpose,
        "shape (96, 64) in the checkpoint, expected (64, 96) from config.json",
    ),
    "mistral": (
        "model.layers.0.mlp.down_proj.weight",
        np.transpose,
        "shape (96, 64) in the checkpoint, expected (64, 96) from config.json",
    ),
    "qwen2": (
        "model.layers.0.self_attn.k_proj.bias",
        lambda w: np.concatenate([w, w]),
        "shape (96,) in the checkpoint, expected (48,) from config.json",
    ),
    "qwen3": (
        "model.layers.1.self_attn.q_norm.weight",  # over all heads (Olmo) instead of one
        lambda w: np.tile(w, 4),
        "shape (96,) in the checkpoint, expected (24,) from config.json",
    ),
}


@pytest.mark.parametrize("family", FAMILIES)
def test_import_refuses_malformed_checkpoints_in_one_line(tmp_path, capsys, family):
    """A tensor in the wrong layout or shape, a missing tensor, a missing shard and an
    unknown model_type: each one line, exit 2, nothing written."""
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "hf"
    tiny(family).save_pretrained(src, max_shard_size="50KB")
    index = src / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    argv = ["import-hf", str(src), "--workdir", str(tmp_path / "wd")]

    name, change, message = MALFORMED[family]
    path = src / weight_map[name]
    original = load_file(path)
    save_file({**original, name: np.ascontiguousarray(change(original[name]))}, path)
    assert refusal(argv, capsys) == f"tensor {name}: {message}"

    save_file({k: v for k, v in original.items() if k != name}, path)
    assert refusal(argv, capsys).startswith(f"checkpoint has no tensor {name}")

    save_file(original, path)
    shards = sorted(set(weight_map.values()))
    (src / shards[-1]).unlink()
    assert refusal(argv, capsys) == (
        f"{index}: names {shards[-1]}, which is not a file in {src} "
        f"(1 of {len(shards)} files missing)"
    )

    (src / "config.json").write_text(json.dumps(family_json(family, model_type="qwen9")))
    assert "model_type 'qwen9' is not supported" in refusal(argv, capsys)
    assert sorted(tmp_path.iterdir()) == [src]


def test_llama3_rope_frequencies_equal_transformers():
    """Our llama3 RoPE scaling against transformers' own function, Llama 3.1's settings."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = {**LLAMA3_ROPE, "rope_theta": 500000.0, "original_max_position_embeddings": 8192}
    model = tiny("llama", rope_parameters=rope, head_dim=128, max_position_embeddings=131072)
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config)
    cfg = hf_families.config_from_hf(json.loads(model.config.to_json_string()), "config.json")
    got = layers.rope_frequencies(cfg.model)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-6)

"""Hugging Face Mixtral in and out: parity with transformers, refusals, fine-tuning, export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparsemodel import cli, config, evaluate, hf, params, sharding  # noqa: E402
from sparsemodel.checkpoint import Checkpointer  # noqa: E402

TINY = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_local_experts=4,
    num_experts_per_tok=2,
    max_position_embeddings=128,
    # Wider than the default 0.02 so routing is decisive and logits are not near-uniform.
    initializer_range=0.15,
    bos_token_id=None,
    eos_token_id=None,  # greedy decoding must not stop early on a random "end" token
)


def tiny_mixtral(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(**{**TINY, **overrides})
    return transformers.MixtralForCausalLM(cfg).float().eval()


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def our_logits(workdir, tokens: np.ndarray) -> np.ndarray:
    r = evaluate.restore(workdir)
    with jax.set_mesh(r.mesh):
        logits, _ = r.model()(jnp.asarray(tokens, jnp.int32))
    return np.asarray(logits)


def import_hf(src, workdir):
    assert cli.main(["import-hf", str(src), "--workdir", str(workdir)]) == 0


def tokens(shape, seed=1, vocab=256):
    return np.random.default_rng(seed).integers(0, vocab, shape)


# ------------------------------------------------------------------------- import


def test_import_matches_transformers_logits_routing_and_greedy_decoding(tmp_path):
    model = tiny_mixtral()
    # Small shards: the index (model.safetensors.index.json) path of the reader.
    model.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "hf", tmp_path / "wd")

    batch = tokens((2, 24))
    r = evaluate.restore(tmp_path / "wd")
    with jax.set_mesh(r.mesh):
        logits, stats = r.model()(jnp.asarray(batch, jnp.int32))
    with torch.no_grad():
        out = model(torch.tensor(batch), output_router_logits=True)
    np.testing.assert_allclose(np.asarray(logits), out.logits.numpy(), atol=1e-4)

    # Routing: each layer sends the same number of assignments to each expert.
    k = TINY["num_experts_per_tok"]
    for layer, router_logits in enumerate(out.router_logits):  # [B*S, E] each
        chosen = torch.topk(torch.softmax(router_logits, -1), k, dim=-1).indices
        hf_load = np.bincount(chosen.numpy().ravel(), minlength=TINY["num_local_experts"])
        np.testing.assert_allclose(np.asarray(stats.load[layer]) * batch.size * k, hf_load)

    prompt = tokens((1, 5), seed=2)
    with torch.no_grad():
        want = model.generate(
            torch.tensor(prompt), max_new_tokens=24, do_sample=False, pad_token_id=0
        )[0, 5:].numpy()
    with jax.set_mesh(r.mesh):
        got = evaluate.sample(
            r.model(), jnp.asarray(prompt, jnp.int32), 24, 0.0, 0, jax.random.key(0)
        )
    assert len(set(want.tolist())) > 3, want  # a non-degenerate continuation
    np.testing.assert_array_equal(np.asarray(got)[0], want)


def test_import_reads_bfloat16_and_transformers5_fused_expert_names(tmp_path):
    """bf16 tensors under the in-memory names of transformers 5 (gate_up_proj / down_proj
    stacked over experts)."""
    from safetensors.torch import save_file

    model = tiny_mixtral(seed=3)
    state = {k: v.to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
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


MIXTRAL_JSON = {
    "model_type": "mixtral",
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 256,
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 4096,
}


@pytest.mark.parametrize(
    "changes, message",
    [
        (
            {"model_type": "qwen2_moe"},
            "qwen2_moe does not map: it has q/k/v projection biases and a "
            "sigmoid-gated shared expert",
        ),
        ({"model_type": "olmoe"}, "olmoe does not map: it has q/k RMSNorm"),
        ({"model_type": "llama"}, "model_type 'llama' is not supported"),
        ({"sliding_window": 1024}, "sliding_window 1024 < max_position_embeddings 4096"),
        ({"head_dim": 32}, "head_dim 32 != hidden_size/num_attention_heads"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' does not map"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ],
)
def test_import_refuses_what_does_not_map_in_one_line(tmp_path, capsys, changes, message):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({**MIXTRAL_JSON, **changes}))
    assert cli.main(["import-hf", str(src), "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsemodel: error: "), err
    assert message in err, err
    assert not (tmp_path / "wd" / "checkpoints").exists()


def test_import_refuses_a_tensor_with_no_place_in_mixtral(tmp_path, capsys):
    """E.g. a q_proj bias (Qwen2-MoE style) next to otherwise Mixtral weights."""
    from safetensors.numpy import save_file

    tiny_mixtral().save_pretrained(tmp_path / "hf")
    bias = {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)}
    save_file(bias, tmp_path / "hf" / "extra.safetensors")
    assert cli.main(["import-hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "wd")]) == 2
    err = capsys.readouterr().err
    assert "tensor model.layers.0.self_attn.q_proj.bias has no place in a Mixtral model" in err
    assert not (tmp_path / "wd" / "config.yaml").exists()


# ----------------------------------------------------------- fine-tune and export


def test_fine_tune_an_imported_model_then_export_it(tmp_path):
    """import-hf -> train a few steps (fresh optimizer) -> eval -> export-hf -> transformers."""
    from sparsemodel import tokenizer as tokenizer_lib

    text = tmp_path / "corpus.txt"
    text.write_text("def add(a, b):\n    return a + b\n\nclass Point:\n    x: int\n" * 60)
    model = tiny_mixtral(seed=4, vocab_size=300)
    model.save_pretrained(tmp_path / "hf")
    raw = np.frombuffer(text.read_bytes(), np.uint8)
    tokenizer_lib.train_bpe(raw, 300).save(tmp_path / "hf" / "tokenizer.json")
    wd = tmp_path / "wd"
    import_hf(tmp_path / "hf", wd)
    assert (wd / "tokenizer.json").read_bytes() == (tmp_path / "hf" / "tokenizer.json").read_bytes()
    assert config.load(wd / "config.yaml").data.tokenizer == "bpe"

    settings = [f"data.source={text}", "train.steps=3", "train.batch_size=2", "train.seq_len=16"]
    settings += ["train.eval_batches=1", "train.lr=1e-3", "train.warmup_steps=0"]
    assert cli.main(["train", "--workdir", str(wd), "--set", *settings]) == 0
    ckpt = Checkpointer(wd)
    assert ckpt.steps()[-1] == 3 and (ckpt.directory / "3" / "opt_state").is_dir()
    ckpt.close()
    lines = [json.loads(ln) for ln in (wd / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in lines)
    assert cli.main(["eval", "--workdir", str(wd), "--max-tokens", "64"]) == 0

    out = tmp_path / "out"
    assert cli.main(["export-hf", "--workdir", str(wd), str(out)]) == 0
    assert (out / "tokenizer.json").is_file()
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    batch = tokens((2, 16), vocab=300)
    np.testing.assert_allclose(hf_logits(loaded.eval(), batch), our_logits(wd, batch), atol=1e-4)


def test_export_writes_shared_layers_once_per_layer_and_shards(tmp_path):
    """model.share_layers: each unique block's weights appear in every layer it serves."""
    cfg = config.load(
        "tiny",
        {"model.n_layers": 4, "model.share_layers": 2, "moe.block_size": 8, "model.init_std": 0.2},
    )
    wd = tmp_path / "wd"
    wd.mkdir()
    config.dump(cfg, wd / "config.yaml")
    mesh = sharding.make_mesh(cfg.mesh)
    _, state = params.init_params(cfg, mesh, seed=0)
    ckpt = Checkpointer(wd, async_save=False)
    ckpt.save(0, state, None, {"step": 0})
    ckpt.close()

    files = hf.export_hf(wd, tmp_path / "out", max_shard_bytes=200_000)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert sum(f.suffix == ".safetensors" for f in files) > 1
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    layers = loaded.model.layers
    assert torch.equal(layers[0].self_attn.q_proj.weight, layers[2].self_attn.q_proj.weight)
    assert not torch.equal(layers[0].self_attn.q_proj.weight, layers[1].self_attn.q_proj.weight)
    batch = tokens((2, 16))
    np.testing.assert_allclose(hf_logits(loaded.eval(), batch), our_logits(wd, batch), atol=1e-4)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"moe.num_experts": 0}, "a dense model"),
        ({"model.n_layers": 4, "moe.every": 2}, "layers mixing dense and MoE"),
        ({"moe.first_dense": 1, "model.n_layers": 3}, "layers mixing dense and MoE"),
        ({"moe.num_shared": 1}, "shared experts"),
        ({"moe.router": "expert_choice"}, "moe.router=expert_choice"),
        ({"moe.renormalize": False}, "moe.top_k=2 without moe.renormalize"),
        ({"moe.top_k": 1}, "moe.top_k=1"),
    ],
)
def test_export_refuses_what_mixtral_cannot_express(tmp_path, capsys, overrides, message):
    wd = tmp_path / "wd"
    wd.mkdir()
    config.dump(config.load("tiny", overrides), wd / "config.yaml")
    assert cli.main(["export-hf", "--workdir", str(wd), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Mixtral cannot express" in err and message in err, err
    assert not (tmp_path / "out").exists()

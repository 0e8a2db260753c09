"""Hugging Face Mixtral in and out: parity with transformers, refusals, fine-tuning, export."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from sparsemodel import cli, config, evaluate, hf, initialize, sharding  # noqa: E402
from sparsemodel.checkpoint import Checkpointer, CheckpointError  # noqa: E402

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
            {"model_type": "deepseek_v3"},
            "model_type deepseek_v3 does not map: it has multi-head latent attention (MLA)",
        ),
        ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported (import-hf reads mixtral,"),
        ({"model_type": ["mixtral"]}, "model_type ['mixtral'] is not supported"),
        ({"model_type": {"a": 1}}, "model_type {'a': 1} is not supported"),
        ({"sliding_window": 1024}, "sliding_window 1024 < max_position_embeddings 4096"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' does not map"),
        ({"num_experts_per_tok": 1}, "num_experts_per_tok=1 with renormalised weights"),
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


def refusal(argv: list[str], capsys) -> str:
    """The message of a command refused as it must be: exit 2, one `sparsemodel: error:` line."""
    capsys.readouterr()  # what came before, e.g. save_pretrained's progress bar
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("sparsemodel: error: "), err
    return err.removeprefix("sparsemodel: error: ").rstrip("\n")


def save_tiny(src, fused: bool) -> None:
    """A tiny random Mixtral in src/model.safetensors: transformers 5's in-memory names
    (fused experts) or the v4 names save_pretrained writes."""
    from safetensors.torch import save_file

    model = tiny_mixtral()
    if not fused:
        model.save_pretrained(src)
        return
    src.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src / "model.safetensors")
    (src / "config.json").write_text(model.config.to_json_string())


def rewrite(path, name, change) -> None:
    """Replaces tensor `name` of the safetensors file path by change(it), or drops it (None)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(path)
    tensor = tensors.pop(name)
    if change is not None:
        tensors[name] = np.ascontiguousarray(change(tensor))
    save_file(tensors, path)


LAYER_0, LAYER_1 = "model.layers.0.", "model.layers.1."


@pytest.mark.parametrize(
    "fused, name, change, message",
    [
        (
            False,
            LAYER_1 + "self_attn.k_proj.weight",
            np.transpose,
            "shape (64, 32) in the checkpoint, expected (32, 64) from config.json",
        ),
        (
            False,
            LAYER_0 + "block_sparse_moe.experts.2.w1.weight",
            np.transpose,
            "shape (64, 96) in the checkpoint, expected (96, 64) from config.json",
        ),
        (
            False,
            LAYER_0 + "block_sparse_moe.experts.3.w2.weight",
            np.transpose,
            "shape (96, 64) in the checkpoint, expected (64, 96) from config.json",
        ),
        (
            True,
            LAYER_1 + "mlp.experts.gate_up_proj",
            lambda w: w.transpose(0, 2, 1),
            "shape (4, 64, 192) in the checkpoint, expected (4, 192, 64) from config.json",
        ),
        (
            True,
            LAYER_0 + "mlp.experts.down_proj",
            lambda w: w.transpose(0, 2, 1),
            "shape (4, 96, 64) in the checkpoint, expected (4, 64, 96) from config.json",
        ),
        (
            False,
            "model.embed_tokens.weight",
            lambda w: np.concatenate([w, w[:44]]),
            "shape (300, 64) in the checkpoint, expected (256, 64) from config.json",
        ),
        (
            True,
            LAYER_0 + "mlp.gate.weight",
            lambda w: w[:3],
            "shape (3, 64) in the checkpoint, expected (4, 64) from config.json",
        ),
        (
            False,
            "model.norm.weight",
            lambda w: w.astype(np.int32),
            "dtype I32, expected a float (F16, BF16, F32, F64)",
        ),
    ],
)
def test_import_refuses_a_tensor_of_the_wrong_layout_shape_or_dtype(
    tmp_path, capsys, fused, name, change, message
):
    """A transposed non-square projection has the right size: only its raw shape shows it."""
    save_tiny(tmp_path / "hf", fused)
    rewrite(tmp_path / "hf" / "model.safetensors", name, change)
    argv = ["import-hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "wd")]
    assert refusal(argv, capsys) == f"tensor {name}: {message}"
    assert sorted(tmp_path.iterdir()) == [tmp_path / "hf"]  # no workdir, no temporary one


def test_import_refuses_a_missing_tensor_before_writing_anything(tmp_path, capsys):
    save_tiny(tmp_path / "hf", fused=False)
    name = LAYER_1 + "block_sparse_moe.experts.0.w3.weight"
    rewrite(tmp_path / "hf" / "model.safetensors", name, None)
    argv = ["import-hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "wd")]
    fused = LAYER_1 + "mlp.experts.gate_up_proj"
    assert refusal(argv, capsys) == f"checkpoint has no tensor {name} (nor {fused})"
    assert sorted(tmp_path.iterdir()) == [tmp_path / "hf"]


def test_import_refuses_a_missing_or_truncated_shard_in_one_line(tmp_path, capsys):
    src = tmp_path / "hf"
    tiny_mixtral().save_pretrained(src, max_shard_size="200KB")
    index = src / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    argv = ["import-hf", str(src), "--workdir", str(tmp_path / "wd")]

    truncated = src / shards[0]
    truncated.write_bytes(truncated.read_bytes()[:-100])
    assert refusal(argv, capsys).startswith(f"{truncated}: not a readable safetensors file (")

    (src / shards[1]).unlink()
    assert refusal(argv, capsys) == (
        f"{index}: names {shards[1]}, which is not a file in {src} "
        f"(1 of {len(shards)} files missing)"
    )
    assert sorted(tmp_path.iterdir()) == [src]


def test_import_fills_an_empty_directory_but_never_one_with_files(tmp_path, capsys):
    save_tiny(tmp_path / "hf", fused=False)
    (tmp_path / "empty").mkdir()
    import_hf(tmp_path / "hf", tmp_path / "empty")
    assert (tmp_path / "empty" / "config.yaml").is_file()

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    argv = ["import-hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "notes")]
    message = f"--workdir {tmp_path / 'notes'}: already holds files (use a new directory)"
    assert refusal(argv, capsys) == message
    assert [p.name for p in (tmp_path / "notes").iterdir()] == ["todo.txt"]


def test_import_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    """E.g. a full disk while the checkpoint is written: no workdir, no temporary directory."""

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    save_tiny(tmp_path / "hf", fused=False)
    monkeypatch.setattr(Checkpointer, "save_host_params", disk_full)
    with pytest.raises(OSError, match="No space left"):
        hf.import_hf(tmp_path / "hf", tmp_path / "wd", log=lambda s: None)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "hf"]


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


def workdir_at_init(wd, overrides=None) -> None:
    """A workdir holding the tiny config (with overrides) and its step-0 parameters."""
    cfg = config.load("tiny", overrides)
    wd.mkdir()
    config.dump(cfg, wd / "config.yaml")
    _, state = initialize.init_params(cfg, sharding.make_mesh(cfg.mesh), seed=0)
    ckpt = Checkpointer(wd, async_save=False)
    ckpt.save(0, state, None, {"step": 0})
    ckpt.close()


def test_export_writes_shared_layers_once_per_layer_and_shards(tmp_path):
    """model.share_layers: each unique block's weights appear in every layer it serves."""
    wd = tmp_path / "wd"
    workdir_at_init(
        wd,
        {"model.n_layers": 4, "model.share_layers": 2, "moe.block_size": 8, "model.init_std": 0.2},
    )
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
        ({"moe.pool": "global"}, "moe.pool=global: one expert pool shared by all layers"),
        ({"moe.router": "expert_choice"}, "moe.router=expert_choice"),
        ({"moe.renormalize": False}, "moe.top_k=2 without moe.renormalize"),
        ({"moe.top_k": 1}, "moe.top_k=1"),
        ({"moe.score": "sigmoid"}, "moe.score=sigmoid"),
        ({"moe.groups": 2}, "moe.groups=2 (group-limited routing)"),
        ({"moe.route_scale": 2.5}, "moe.route_scale=2.5"),
    ],
)
def test_export_refuses_what_mixtral_cannot_express(tmp_path, capsys, overrides, message):
    wd = tmp_path / "wd"
    wd.mkdir()
    config.dump(config.load("tiny", overrides), wd / "config.yaml")
    argv = ["export-hf", "--workdir", str(wd), str(tmp_path / "out"), "--model-type", "mixtral"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Mixtral cannot express" in err and message in err, err
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_zero_router_bias(tmp_path, capsys):
    """The bias of moe.bias_rate changes which experts run: a zero one exports (Mixtral's
    router, same logits), a trained one is refused."""
    wd = tmp_path / "wd"
    workdir_at_init(wd, {"moe.bias_rate": 0.001})
    hf.export_hf(wd, tmp_path / "zero")
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "zero")
    batch = tokens((2, 16))
    np.testing.assert_allclose(hf_logits(loaded.eval(), batch), our_logits(wd, batch), atol=1e-4)

    ckpt = Checkpointer(wd, async_save=False)
    r = evaluate.restore(wd)
    ffn = r.params["units"]["blocks"][0]["ffn"]
    ffn["router_bias"] = ffn["router_bias"].replace(ffn["router_bias"][...].at[0, 1].set(0.002))
    ckpt.save(1, r.params, None, {"step": 1})
    ckpt.close()
    capsys.readouterr()  # transformers' loading messages
    assert cli.main(["export-hf", "--workdir", str(wd), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == (
        "sparsemodel: error: export-hf: no Hugging Face family expresses the router bias "
        "of moe.bias_rate (non-zero in checkpoint step 1)\n"
    )
    assert not (tmp_path / "out").exists()


def test_export_failing_midway_leaves_nothing(tmp_path, monkeypatch):
    """A parameter that cannot be read after some shards are written: no output directory
    that looks complete, no temporary one."""
    wd = tmp_path / "wd"
    workdir_at_init(wd)
    restore_leaf, calls = Checkpointer.restore_leaf, []

    def damaged_third_leaf(self, step, path):
        calls.append(path)
        if len(calls) == 3:
            raise CheckpointError(f"checkpoint step {step}: cannot read {path}: damaged")
        return restore_leaf(self, step, path)

    monkeypatch.setattr(Checkpointer, "restore_leaf", damaged_third_leaf)
    with pytest.raises(CheckpointError, match="damaged"):
        hf.export_hf(wd, tmp_path / "out", max_shard_bytes=20_000)
    assert len(calls) == 3
    assert sorted(tmp_path.iterdir()) == [wd]

"""Hugging Face Mixtral checkpoints in and out (`sparsemodel import-hf` / `export-hf`).

Our Mixtral-shaped model (every layer MoE, top-k of the full softmax renormalised, SwiGLU
experts, GQA attention with rotate-half RoPE, RMSNorm) is the same function as
transformers' MixtralForCausalLM, so conversion is a relabelling of tensors:

    HF tensor (nn.Linear weights are [out, in])          ours ([in, out], stacked over layers)
    model.embed_tokens.weight             [V, D]         embed.embedding            [V, D]
    lm_head.weight                        [V, D]         unembed                    [D, V]
    model.norm.weight                     [D]            final_norm.scale           [D]
    layers.L.input_layernorm.weight       [D]            attn_norm.scale[L]         [D]
    layers.L.post_attention_layernorm...  [D]            ffn_norm.scale[L]          [D]
    layers.L.self_attn.q_proj.weight      [H*Dh, D]      attn.wq[L]                 [D, H, Dh]
    layers.L.self_attn.k_proj/v_proj      [Hkv*Dh, D]    attn.wk/wv[L]              [D, Hkv, Dh]
    layers.L.self_attn.o_proj.weight      [D, H*Dh]      attn.wo[L]                 [H, Dh, D]
    layers.L.block_sparse_moe.gate.weight [E, D]         ffn.w_router[L]            [D, E]
    ...experts.i.w1.weight (gate)         [F, D]         ffn.w_gate_up[L, i, :, 0]  [D, F]
    ...experts.i.w3.weight (up)           [F, D]         ffn.w_gate_up[L, i, :, 1]  [D, F]
    ...experts.i.w2.weight (down)         [D, F]         ffn.w_down[L, i]           [F, D]

Hugging Face checkpoints already hold q/k in rotate-half order (their conversion from
Meta's interleaved layout permuted the rows), which is our `layers.rope`, so no
permutation is needed. transformers 5 keeps experts fused in memory
(`mlp.gate.weight`, `mlp.experts.gate_up_proj` [E, 2F, D] gate rows first,
`mlp.experts.down_proj` [E, D, F]); we read those names too, and write the v4 names above,
which is what transformers 5's `save_pretrained` writes and what every version loads.

Both directions stream tensor by tensor, so a checkpoint larger than memory converts:
import assembles each stacked parameter in a numpy memmap on disk (in the workdir being
built) and checkpoints the memmaps; export restores one of our parameters at a time and
writes safetensors shards with a header computed up front.

Import checks every stored tensor's name, dtype and shape against config.json (from the
safetensors headers) before converting any, as transformers does: a reshape alone would
accept a same-sized tensor in the wrong layout, e.g. a transposed projection. Both
directions build their output under a temporary name beside it and rename it at the end,
so a refusal or a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import struct
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401 - registers numpy's 'bfloat16', so safetensors can read bf16
import numpy as np

from sparsemodel import config as config_lib
from sparsemodel.config import Config, ConfigError
from sparsemodel.workdir import built_beside, refuse_existing

# model_types close to Mixtral that we refuse, and exactly what of theirs our model lacks.
NOT_MAPPABLE = {
    "qwen2_moe": "q/k/v projection biases and a sigmoid-gated shared expert "
    "(our attention has no biases; our shared experts have no gate)",
    "qwen3_moe": "q/k RMSNorm on every attention head (our attention has none)",
    "olmoe": "q/k RMSNorm in attention (our attention has none)",
}

MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size for save_pretrained


# ------------------------------------------------------------------------- configs


def _read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in path, or ConfigError (one line) naming the file."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


_REQUIRED = object()  # a config.json key with no default

# What each kind of config.json value must be, as a check and in words.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "count": (lambda v: type(v) is int and v > 0, "a positive integer"),
    "number": (lambda v: type(v) in (int, float) and math.isfinite(v), "a finite number"),
    "flag": (lambda v: type(v) is bool, "true or false"),
    "mapping": (lambda v: isinstance(v, dict), "an object"),
}


def _hf_value(
    hf: dict[str, Any], key: str, kind: str, default: Any = _REQUIRED, *, where: str
) -> Any:
    """hf[key] checked to be of `kind` (default when absent or null), else ConfigError."""
    if key not in hf and default is _REQUIRED:
        raise ConfigError(f"{where}: missing key {key}")
    found = hf.get(key)
    if found is None and default is not _REQUIRED:
        return default
    is_kind, in_words = _KINDS[kind]
    if not is_kind(found):
        raise ConfigError(f"{where}: {key}: expected {in_words}, got {found!r:.60}")
    return found


def config_from_hf(hf: dict[str, Any], where: str) -> Config:
    """Our Config for a Mixtral config.json, or ConfigError naming what does not map."""
    _refuse_unmapped(hf, where)
    data = _config_dict(hf, where)
    try:
        return config_lib.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: does not map: {e}") from None


def _refuse_unmapped(hf: dict[str, Any], where: str) -> None:
    """ConfigError (one line) for a config.json of another model than ours: not a Mixtral,
    or a Mixtral whose activation, head size, attention window, biases or RoPE differ."""

    def refuse(reason: str):
        raise ConfigError(f"{where}: {reason}")

    value = partial(_hf_value, hf, where=where)
    model_type = hf.get("model_type")
    if isinstance(model_type, str) and model_type in NOT_MAPPABLE:
        refuse(f"model_type {model_type} does not map: it has {NOT_MAPPABLE[model_type]}")
    if model_type != "mixtral":
        shown = config_lib.bounded(model_type)  # any JSON value: a list or object too
        refuse(f"model_type {shown} is not supported (import-hf reads model_type mixtral)")
    d, heads = value("hidden_size", "count"), value("num_attention_heads", "count")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r} does not map (our experts are SwiGLU: silu)")
    head_dim = value("head_dim", "count", None)
    if head_dim not in (None, d // heads) or d % heads:
        refuse(f"head_dim {head_dim} != hidden_size/num_attention_heads ({d}/{heads})")
    window = value("sliding_window", "count", None)
    max_pos = value("max_position_embeddings", "count", None)
    if window is not None and (max_pos is None or window < max_pos):
        refuse(
            f"sliding_window {window} < max_position_embeddings {max_pos} does not map "
            "(our attention is full causal)"
        )
    for flag in ("attention_bias", "mlp_bias"):
        if value(flag, "flag", False):
            refuse(f"{flag}=true does not map (our projections have no biases)")
    rope = _rope(hf, where)
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        refuse(f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r} does not map")


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The RoPE settings: transformers 5's rope_parameters, else rope_scaling ({} if none)."""
    value = partial(_hf_value, hf, where=where)
    return value("rope_parameters", "mapping", None) or value("rope_scaling", "mapping", {})


def _config_dict(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """Our config (sections of keys, as config.from_dict reads them) for a Mixtral
    config.json that _refuse_unmapped has accepted."""
    value = partial(_hf_value, hf, where=where)
    heads = value("num_attention_heads", "count")
    theta = value("rope_theta", "number", 1e6)  # 1e6: MixtralConfig's default
    theta = _hf_value(_rope(hf, where), "rope_theta", "number", theta, where=where)  # v5's place
    top_k, ffn = value("num_experts_per_tok", "count", 2), value("intermediate_size", "count")
    return {
        "model": {
            "d_model": value("hidden_size", "count"),
            "n_layers": value("num_hidden_layers", "count"),
            "n_heads": heads,
            "n_kv_heads": value("num_key_value_heads", "count", heads),
            "d_ff": ffn,  # unused (no dense layers) but kept meaningful
            "vocab_size": value("vocab_size", "count"),
            "tie_embeddings": value("tie_word_embeddings", "flag", False),
            "rope_theta": float(theta),
            "norm_eps": float(value("rms_norm_eps", "number", 1e-5)),
            "init_std": float(value("initializer_range", "number", 0.02)),
        },
        "moe": {
            "num_experts": value("num_local_experts", "count", 8),
            "top_k": top_k,
            "d_expert": ffn,
            "router": "topk",
            "dispatch": "dropless",
            "renormalize": True,
            # HF jitters the whole MoE input, we the router input: training-only noise.
            "jitter": float(value("router_jitter_noise", "number", 0.0)),
            # HF's f_e counts assignments per token (sums to k), ours per assignment (sums
            # to 1): the same loss needs k times the coefficient.
            "lb_coef": float(value("router_aux_loss_coef", "number", 0.001)) * top_k,
            "z_coef": 0.0,  # Mixtral trains without a router z-loss
        },
        # Fine-tuning defaults: a small learning rate; --set overrides as usual.
        "train": {"lr": 1e-5, "warmup_steps": 10, "steps": 100},
    }


def config_to_hf(cfg: Config, source_hf: dict[str, Any] | None = None) -> dict[str, Any]:
    """A Mixtral config.json for cfg, or ConfigError naming what Mixtral cannot express."""
    refuse_export(cfg)
    m, e = cfg.model, cfg.moe
    src = source_hf or {}
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "hidden_size": m.d_model,
        "intermediate_size": e.d_expert,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.d_model // m.n_heads,
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_embeddings,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # transformers 4 reads this ...
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},  # ... 5 this
        "hidden_act": "silu",
        "num_local_experts": e.num_experts,
        "num_experts_per_tok": e.top_k,
        "router_aux_loss_coef": e.lb_coef / e.top_k,  # see config_from_hf
        "router_jitter_noise": e.jitter,
        "initializer_range": m.init_std,
        "max_position_embeddings": src.get("max_position_embeddings", cfg.train.seq_len),
        "sliding_window": None,
        "attention_dropout": 0.0,
        "bos_token_id": src.get("bos_token_id"),
        "eos_token_id": src.get("eos_token_id"),
        "pad_token_id": src.get("pad_token_id"),
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }


def refuse_export(cfg: Config) -> None:
    """ConfigError (one line) for a model Mixtral cannot express."""
    e = cfg.moe
    reasons = [
        (not cfg.is_moe, "moe.num_experts=0: a dense model"),
        (
            cfg.is_moe and (e.every != 1 or e.first_dense != 0),
            "moe.every/first_dense: "
            f"layers mixing dense and MoE (every={e.every}, first_dense={e.first_dense})",
        ),
        (e.num_shared > 0, f"moe.num_shared={e.num_shared}: shared experts"),
        (
            cfg.is_moe and e.pool == "global",
            "moe.pool=global: one expert pool shared by all layers",
        ),
        (e.router != "topk", f"moe.router={e.router}"),
        (e.top_k > 1 and not e.renormalize, f"moe.top_k={e.top_k} without moe.renormalize"),
        # Mixtral renormalises even k=1 (weight 1.0); ours keeps the softmax probability.
        (e.top_k == 1, "moe.top_k=1 (weighted by the softmax probability, Switch style)"),
        (e.score != "softmax", f"moe.score={e.score}"),
        (e.groups > 1, f"moe.groups={e.groups} (group-limited routing)"),
        (e.route_scale != 1, f"moe.route_scale={e.route_scale}"),
    ]
    for bad, reason in reasons:
        if bad:
            raise ConfigError(f"export-hf: Mixtral cannot express {reason}")


# ------------------------------------------------------------------ tensor layout


@dataclass(frozen=True)
class Slot:
    """One HF tensor and where it lives among our parameters."""

    hf: str
    leaf: tuple  # our parameter's path in the params State
    index: tuple  # into that (stacked) parameter
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _same(x):
    return x


def _linear(ours_shape: tuple[int, ...], n_in: int):
    """HF nn.Linear weight [out, in] <-> ours [*in_dims, *out_dims] (n_in leading dims)."""
    n_rows = math.prod(ours_shape[:n_in])
    return (
        lambda w: np.ascontiguousarray(w.T).reshape(ours_shape),
        lambda x: np.ascontiguousarray(x.reshape(n_rows, -1).T),
    )


def slots(cfg: Config) -> list[Slot]:
    """Every tensor of the Mixtral checkpoint of cfg, in checkpoint order.

    With model.share_layers, layer L reads unit L % g (the scan repeats the g unique units),
    so shared weights appear once per layer that uses them.
    """
    m, e = cfg.model, cfg.moe
    d, h, kv, dh, f = m.d_model, m.n_heads, m.n_kv_heads, m.d_model // m.n_heads, e.d_expert
    n_unique = m.share_layers or m.n_layers
    out = [Slot("model.embed_tokens.weight", ("embed", "embedding"), (), _same, _same)]
    blk = ("units", "blocks", 0)
    gate_up = blk + ("ffn", "w_gate_up")  # [U, E, D, 2, F]: gate then up
    for layer in range(m.n_layers):
        u, p = (layer % n_unique,), f"model.layers.{layer}."
        moe = p + "block_sparse_moe."
        out += [
            Slot(p + "input_layernorm.weight", blk + ("attn_norm", "scale"), u, _same, _same),
            Slot(p + "self_attn.q_proj.weight", blk + ("attn", "wq"), u, *_linear((d, h, dh), 1)),
            Slot(p + "self_attn.k_proj.weight", blk + ("attn", "wk"), u, *_linear((d, kv, dh), 1)),
            Slot(p + "self_attn.v_proj.weight", blk + ("attn", "wv"), u, *_linear((d, kv, dh), 1)),
            Slot(p + "self_attn.o_proj.weight", blk + ("attn", "wo"), u, *_linear((h, dh, d), 2)),
            Slot(
                p + "post_attention_layernorm.weight", blk + ("ffn_norm", "scale"), u, _same, _same
            ),
            Slot(
                moe + "gate.weight", blk + ("ffn", "w_router"), u, *_linear((d, e.num_experts), 1)
            ),
        ]
        for i in range(e.num_experts):
            x = f"{moe}experts.{i}."
            out += [
                Slot(x + "w1.weight", gate_up, u + (i, slice(None), 0), *_linear((d, f), 1)),
                Slot(x + "w2.weight", blk + ("ffn", "w_down"), u + (i,), *_linear((f, d), 1)),
                Slot(x + "w3.weight", gate_up, u + (i, slice(None), 1), *_linear((d, f), 1)),
            ]
    out.append(Slot("model.norm.weight", ("final_norm", "scale"), (), _same, _same))
    if not m.tie_embeddings:
        out.append(Slot("lm_head.weight", ("unembed",), (), *_linear((d, m.vocab_size), 1)))
    return out


# ------------------------------------------------------------------------ reading


class SafetensorsDir:
    """The tensors of a Hugging Face checkpoint directory, read one at a time by name.

    Accepts v4 names for experts also when the files hold transformers 5's fused ones.
    Opening reads only the files' headers (names, dtypes, shapes), which safetensors checks
    against the file sizes.
    """

    _V4_EXPERT = re.compile(r"(model\.layers\.\d+\.)block_sparse_moe\.experts\.(\d+)\.w([123])\.")

    def __init__(self, src: Path, stack: ExitStack):
        from safetensors import SafetensorError, safe_open

        self.file_of: dict[str, Any] = {}
        for name in _safetensors_files(src):
            try:
                handle = stack.enter_context(safe_open(str(src / name), framework="numpy"))
            except (SafetensorError, OSError) as e:
                raise ConfigError(f"{src / name}: not a readable safetensors file ({e})") from None
            self.file_of.update(dict.fromkeys(handle.keys(), handle))

    def names(self) -> set[str]:
        return set(self.file_of)

    def header(self, stored: str) -> tuple[tuple[int, ...], str]:
        """(shape, safetensors dtype such as 'BF16') of a stored tensor, without its data."""
        view = self.file_of[stored].get_slice(stored)
        return tuple(view.get_shape()), view.get_dtype()

    def stored_name(self, name: str) -> str:
        """The stored tensor that holds the v4 tensor `name`: itself or transformers 5's."""
        if name in self.file_of:
            return name
        match = self._V4_EXPERT.match(name)
        if match is not None:
            w = match.group(3)
            alias = match.group(1) + (
                "mlp.experts.down_proj" if w == "2" else "mlp.experts.gate_up_proj"
            )
        else:
            alias = name.replace("block_sparse_moe.gate.", "mlp.gate.")
        if alias in self.file_of:
            return alias
        nor = f" (nor {alias})" if alias != name else ""
        raise ConfigError(f"checkpoint has no tensor {name}{nor}")

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` (a v4 name) as float32."""
        stored = self.stored_name(name)
        match = self._V4_EXPERT.match(name)
        if stored == name or match is None:
            return self.file_of[stored].get_tensor(stored).astype(np.float32)
        i, w = int(match.group(2)), match.group(3)
        rows = self.file_of[stored].get_slice(stored)[i].astype(np.float32)  # one expert only
        if w == "2":
            return rows  # [D, F]
        half = rows.shape[0] // 2  # gate_up rows: gate then up
        return rows[:half] if w == "1" else rows[half:]  # [F, D]


def _safetensors_files(src: Path) -> list[str]:
    """The files of src's index (each checked to exist), else every *.safetensors in src."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) for f in weight_map.values()
        ):
            raise ConfigError(f"{index}: expected a weight_map object of tensor -> file name")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (src / f).is_file()]
        if missing:
            raise ConfigError(
                f"{index}: names {missing[0]}, which is not a file in {src} "
                f"({len(missing)} of {len(files)} files missing)"
            )
    else:
        files = sorted(p.name for p in src.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"{src}: no *.safetensors files (only safetensors are read)")
    return files


_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # safetensors' names of what we convert


def _check_tensors(cfg: Config, reader: SafetensorsDir) -> None:
    """ConfigError (one line) for the first stored tensor that is missing, unused, not
    floating point or not of the shape config.json implies, so that a wrong layout of the
    same size (e.g. a transposed projection) is refused, not silently reshaped."""
    stored = dict.fromkeys(reader.stored_name(slot.hf) for slot in slots(cfg))  # in order
    for name in stored:
        shape, dtype = reader.header(name)
        if dtype not in _FLOAT_DTYPES:
            floats = ", ".join(_FLOAT_DTYPES)
            raise ConfigError(f"tensor {name}: dtype {dtype}, expected a float ({floats})")
        expected = _hf_shape(name, cfg)
        if shape != expected:
            raise ConfigError(
                f"tensor {name}: shape {shape} in the checkpoint, expected {expected} "
                "from config.json"
            )
    ignorable = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    left = sorted(reader.names() - stored.keys() - ignorable)
    left = [n for n in left if not n.endswith("rotary_emb.inv_freq")]  # a buffer, not a weight
    if left:
        raise ConfigError(f"tensor {left[0]} has no place in a Mixtral model ({len(left)} unused)")


# ------------------------------------------------------------------------- import


def import_hf(src: str | Path, workdir: str | Path, log=print) -> Config:
    """Converts a Hugging Face Mixtral directory into a workdir holding a step-0 checkpoint.

    The checkpoint holds parameters only; `sparsemodel train` on the workdir starts a fresh
    optimizer from it (fine-tuning). Every check runs before anything is written, and the
    workdir is built under a temporary name beside it, so a refused or failed import leaves
    nothing behind.
    """
    from sparsemodel.checkpoint import Checkpointer

    src, workdir = Path(src), Path(workdir)
    cfg_path = src / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"{src}: no config.json (not a Hugging Face checkpoint directory)")
    hf_cfg = _read_json_object(cfg_path)
    cfg = config_from_hf(hf_cfg, str(cfg_path))
    tokenizer = src / "tokenizer.json"
    if tokenizer.is_file():
        cfg = cfg.replace({"data.tokenizer": "bpe"})  # train/eval/generate read the copy below
    refuse_existing(workdir, f"--workdir {workdir}")
    with ExitStack() as stack:
        reader = SafetensorsDir(src, stack)
        _check_tensors(cfg, reader)
        with built_beside(workdir, f"--workdir {workdir}") as build:
            if tokenizer.is_file():
                shutil.copyfile(tokenizer, build / "tokenizer.json")
            (build / "hf_config.json").write_text(json.dumps(hf_cfg, indent=2))  # for export-hf
            memmaps = build / "import-memmaps"
            memmaps.mkdir()
            params = _assemble(cfg, reader, memmaps, log)
            ckpt = Checkpointer(build, async_save=False)
            ckpt.save_host_params(0, params, {"step": 0, "seed": 0, "source": str(src)})
            ckpt.close()
            shutil.rmtree(memmaps)
            config_lib.dump(cfg, build / "config.yaml")
    return cfg


def _assemble(cfg: Config, reader: SafetensorsDir, memmaps: Path, log):
    """Our params State with numpy memmap leaves (under memmaps), filled tensor by tensor."""
    import jax

    from sparsemodel import sharding
    from sparsemodel.initialize import abstract_params

    _, target = abstract_params(cfg, sharding.make_mesh(config_lib.MeshConfig()))
    arrays = {}

    def memmap(path, x):
        name = "-".join(str(getattr(k, "key", k)) for k in path)
        arrays[_leaf_key(path)] = a = np.lib.format.open_memmap(
            memmaps / f"{name}.npy", mode="w+", dtype=np.float32, shape=x.shape
        )
        return a

    params = jax.tree_util.tree_map_with_path(memmap, target)
    todo = slots(cfg)
    for n, slot in enumerate(todo):
        # _check_tensors has matched the HF shape to the config, so this reshape is exact.
        arrays[slot.leaf][slot.index] = slot.to_ours(reader.get(slot.hf))
        if n and n % 200 == 0:
            log(f"converted {n}/{len(todo)} tensors")
    for a in arrays.values():
        a.flush()
    return params


def _leaf_key(path) -> tuple:
    """A params-State path without the trailing `.value`: ('units', 'blocks', 0, 'attn', 'wq')."""
    keys = tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)
    return keys[:-1] if keys and keys[-1] == "value" else keys


# ------------------------------------------------------------------------- export


def export_hf(
    workdir: str | Path,
    out: str | Path,
    step: int | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> list[Path]:
    """Writes a Mixtral-format directory (config.json + safetensors) that transformers loads.

    One of our parameters is held in memory at a time. out must be new (or an empty
    directory); it is written under a temporary name beside it and renamed when complete.
    Returns the files written.
    """
    from sparsemodel.checkpoint import Checkpointer, CheckpointError

    workdir, out = Path(workdir), Path(out)
    if not (workdir / "config.yaml").is_file():
        raise ConfigError(f"--workdir {workdir}: no config.yaml (not a sparsemodel workdir)")
    cfg = config_lib.load_stored(workdir / "config.yaml")
    source = workdir / "hf_config.json"
    hf_cfg = config_to_hf(cfg, _read_json_object(source) if source.is_file() else None)
    refuse_existing(out, f"output {out}")
    ckpt = Checkpointer(workdir, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"--workdir {workdir}: holds no checkpoint yet")
    _check_checkpoint_holds(ckpt, step, cfg)
    _refuse_router_bias(ckpt, step, cfg)

    todo = sorted(slots(cfg), key=lambda s: tuple(map(str, s.leaf)))  # a leaf's slots together
    fetch = _one_leaf_at_a_time(ckpt, step)
    shapes = {s.hf: _hf_shape(s.hf, cfg) for s in todo}
    shards = list(_split(todo, shapes, max_shard_bytes))
    names = _shard_names(len(shards))
    with built_beside(out, f"output {out}") as build:
        try:
            for name, shard in zip(names, shards, strict=True):
                tensors = [(s.hf, shapes[s.hf], lambda s=s: fetch(s)) for s in shard]
                _write_safetensors(build / name, tensors)
        finally:
            ckpt.close()
        if len(shards) > 1:
            names.append(_write_index(build, names, shards, shapes))
        (build / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        names.append("config.json")
        if (workdir / "tokenizer.json").is_file():
            shutil.copyfile(workdir / "tokenizer.json", build / "tokenizer.json")
            names.append("tokenizer.json")
    return [out / name for name in names]


def _one_leaf_at_a_time(ckpt, step: int) -> Callable[[Slot], np.ndarray]:
    """slot -> its HF tensor, holding one of our parameters in memory at a time (so slots
    should come grouped by parameter)."""
    cache: dict[tuple, np.ndarray] = {}

    def fetch(slot: Slot) -> np.ndarray:
        if slot.leaf not in cache:
            cache.clear()
            cache[slot.leaf] = ckpt.restore_leaf(step, slot.leaf)
        return slot.to_hf(cache[slot.leaf][slot.index])

    return fetch


def _shard_names(n_shards: int) -> list[str]:
    """The safetensors file names save_pretrained gives n_shards shards."""
    if n_shards == 1:
        return ["model.safetensors"]
    return [f"model-{n:05d}-of-{n_shards:05d}.safetensors" for n in range(1, n_shards + 1)]


def _write_index(build: Path, names: list[str], shards, shapes) -> str:
    """Writes model.safetensors.index.json (total size, tensor -> file); returns its name."""
    index = {
        "metadata": {"total_size": sum(4 * math.prod(v) for v in shapes.values())},
        "weight_map": {
            s.hf: name for name, shard in zip(names, shards, strict=True) for s in shard
        },
    }
    (build / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return "model.safetensors.index.json"


def _check_checkpoint_holds(ckpt, step: int, cfg: Config) -> None:
    """ConfigError unless checkpoint `step` holds cfg's model (an edited config.yaml)."""
    from sparsemodel import sharding
    from sparsemodel.initialize import abstract_params

    _, target = abstract_params(cfg, sharding.make_mesh(config_lib.MeshConfig()))
    ckpt.check_model(step, ckpt.meta(step), target, cfg)


def _refuse_router_bias(ckpt, step: int, cfg: Config) -> None:
    """ConfigError when the checkpoint's router bias (moe.bias_rate) is not zero: it changes
    which experts run, and Mixtral's router has none."""
    if cfg.moe.bias_rate == 0:
        return
    from flax import nnx

    from sparsemodel import sharding
    from sparsemodel.initialize import abstract_params
    from sparsemodel.moe import RouterBias

    _, target = abstract_params(cfg, sharding.make_mesh(config_lib.MeshConfig()))
    for path, _ in nnx.to_flat_state(nnx.filter_state(target, RouterBias)):
        if np.any(ckpt.restore_leaf(step, path)):
            raise ConfigError(
                f"export-hf: Mixtral cannot express the router bias of moe.bias_rate "
                f"(non-zero in checkpoint step {step})"
            )


def _hf_shape(name: str, cfg: Config) -> tuple[int, ...]:
    """Shape of the HF tensor `name` (v4 or transformers 5's fused experts) from the config
    alone: what export writes and what import accepts."""
    m, e = cfg.model, cfg.moe
    d, f = m.d_model, e.d_expert
    q_rows, kv_rows = m.n_heads * (d // m.n_heads), m.n_kv_heads * (d // m.n_heads)
    for suffix, shape in (
        ("embed_tokens.weight", (m.vocab_size, d)),
        ("lm_head.weight", (m.vocab_size, d)),
        ("norm.weight", (d,)),  # also input_/post_attention_layernorm
        ("q_proj.weight", (q_rows, d)),
        ("k_proj.weight", (kv_rows, d)),
        ("v_proj.weight", (kv_rows, d)),
        ("o_proj.weight", (d, q_rows)),
        ("gate.weight", (e.num_experts, d)),  # block_sparse_moe. or mlp.
        ("w1.weight", (f, d)),
        ("w3.weight", (f, d)),
        ("w2.weight", (d, f)),
        ("experts.gate_up_proj", (e.num_experts, 2 * f, d)),  # w1 rows then w3 rows
        ("experts.down_proj", (e.num_experts, d, f)),
    ):
        if name.endswith(suffix):
            return shape
    raise AssertionError(name)


def _split(todo: list[Slot], shapes, max_bytes: int) -> Iterator[list[Slot]]:
    """Consecutive runs of slots of at most max_bytes (float32) each."""
    shard, size = [], 0
    for slot in todo:
        n = 4 * math.prod(shapes[slot.hf])
        if shard and size + n > max_bytes:
            yield shard
            shard, size = [], 0
        shard.append(slot)
        size += n
    if shard:
        yield shard


def _write_safetensors(path: Path, tensors: list[tuple[str, tuple, Callable]]) -> None:
    """A float32 safetensors file written one tensor at a time.

    The format is an 8-byte little-endian header length, a JSON header of names, dtypes,
    shapes and byte ranges, then the raw little-endian data, so the header can be computed
    from shapes alone and each tensor fetched only when its bytes are due.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, _ in tensors:
        n = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, fetch in tensors:
            value = np.ascontiguousarray(fetch(), dtype="<f4")
            assert value.shape == tuple(shape), (name, value.shape, shape)
            f.write(value.tobytes())

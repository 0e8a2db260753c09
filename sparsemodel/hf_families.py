"""Hugging Face model families: their config.json <-> our Config, and what each can express.

Each supported transformers model_type (a `Family`) computes the same function as our
model with some config choices:

    model_type  ours
    mixtral     MoE in every layer, top-k renormalised
    qwen3_moe   model.qk_norm=head, moe.renormalize=norm_topk_prob, dense layers by
                decoder_sparse_step / mlp_only_layers -> moe.every / moe.first_dense
    qwen2_moe   model.qkv_bias, one shared expert of moe.d_shared with moe.shared_gate,
                layers as qwen3_moe
    olmoe       model.qk_norm=full, MoE in every layer
    llama, mistral, qwen2 (model.qkv_bias), qwen3 (model.qk_norm=head): dense,
                moe.num_experts=0 (a start for upcycling)

Import refuses (one line, naming it) what a config.json has that our model lacks: another
activation, a sliding window, biases on o or the MLPs, q/k/v clipping, RoPE scaling other
than llama3, partial rotary, routing our router does not compute, or MoE layers that
moe.every / moe.first_dense cannot place. Export writes a family's config.json for a
Config that family can express (`cannot_express` says what it lacks).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sparsemodel import config as config_lib
from sparsemodel.config import Config, ConfigError

# model_types we refuse by name, and exactly what of theirs our model lacks.
NOT_MAPPABLE = {
    "deepseek_v2": "multi-head latent attention (MLA)",
    "deepseek_v3": "multi-head latent attention (MLA)",
    "qwen3_next": "linear-attention (Gated DeltaNet) layers",
    "gpt_oss": "attention sinks and sliding-window layers",
    "jamba": "Mamba layers",
    "olmo2": "norms on the attention and MLP outputs (ours normalise their inputs)",
    "gemma": "GeGLU MLPs and (1 + w) norm scales",
}


def read_json_object(path: Path) -> dict[str, Any]:
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


# ------------------------------------------------------------------------ families


@dataclass(frozen=True)
class MoEKeys:
    """Where a family's config.json keeps its MoE settings, with transformers' defaults."""

    num_experts: tuple[str, ...]  # the first key present counts
    num_experts_default: int
    top_k_default: int
    d_expert: str
    d_expert_default: Any  # _REQUIRED: the key must be there
    renormalize: str | None  # the key of renormalised top-k weights; None: always
    lb_coef_default: float
    dense_layers: bool  # decoder_sparse_step / mlp_only_layers place dense layers
    shared_expert: bool  # one sigmoid-gated shared expert (Qwen2-MoE)


@dataclass(frozen=True)
class Family:
    """One transformers model_type: its names, defaults and what of ours it has."""

    model_type: str
    title: str
    architecture: str
    moe: MoEKeys | None  # None: a dense model
    qk_norm: str = "none"  # our model.qk_norm it always has
    qkv_bias: str = "none"  # "none", "always", or the config.json key that sets it
    head_dim_default: int | None = None  # None: hidden_size / num_attention_heads
    theta_default: float = 10000.0
    eps_default: float = 1e-6
    # How config.json turns on a sliding window: "window" (sliding_window below
    # max_position_embeddings, default window_default), "flag" (use_sliding_window).
    sliding: str = "flag"
    window_default: int | None = None
    experts_prefix: str = "mlp."
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")


_QWEN_MOE = dict(
    num_experts=("num_experts", "num_local_experts"),
    d_expert="moe_intermediate_size",
    renormalize="norm_topk_prob",
    lb_coef_default=0.001,
    dense_layers=True,
)
FAMILIES = {
    f.model_type: f
    for f in (
        Family(
            "mixtral",
            "Mixtral",
            "MixtralForCausalLM",
            MoEKeys(
                num_experts=("num_local_experts",),
                num_experts_default=8,
                top_k_default=2,
                d_expert="intermediate_size",
                d_expert_default=_REQUIRED,
                renormalize=None,  # always
                lb_coef_default=0.001,
                dense_layers=False,
                shared_expert=False,
            ),
            theta_default=1e6,
            eps_default=1e-5,
            sliding="window",
            experts_prefix="block_sparse_moe.",
            expert_names=("w1", "w3", "w2"),
        ),
        Family(
            "qwen3_moe",
            "Qwen3-MoE",
            "Qwen3MoeForCausalLM",
            MoEKeys(
                num_experts_default=128,
                top_k_default=8,
                d_expert_default=768,
                shared_expert=False,
                **_QWEN_MOE,
            ),
            qk_norm="head",
        ),
        Family(
            "qwen2_moe",
            "Qwen2-MoE",
            "Qwen2MoeForCausalLM",
            MoEKeys(
                num_experts_default=60,
                top_k_default=4,
                d_expert_default=1408,
                shared_expert=True,
                **_QWEN_MOE,
            ),
            qkv_bias="qkv_bias",
        ),
        Family(
            "olmoe",
            "OLMoE",
            "OlmoeForCausalLM",
            MoEKeys(
                num_experts=("num_experts", "num_local_experts"),
                num_experts_default=64,
                top_k_default=8,
                d_expert="intermediate_size",
                d_expert_default=2048,
                renormalize="norm_topk_prob",
                lb_coef_default=0.01,
                dense_layers=False,
                shared_expert=False,
            ),
            qk_norm="full",
            eps_default=1e-5,
            sliding="none",
        ),
        Family("llama", "Llama", "LlamaForCausalLM", None, sliding="none"),
        Family(
            "mistral", "Mistral", "MistralForCausalLM", None, sliding="window", window_default=4096
        ),
        Family("qwen2", "Qwen2", "Qwen2ForCausalLM", None, qkv_bias="always"),
        Family("qwen3", "Qwen3", "Qwen3ForCausalLM", None, qk_norm="head", head_dim_default=128),
    )
}


def family_of(hf: dict[str, Any], where: str) -> Family:
    """The Family of a config.json's model_type, or ConfigError (one line) naming it."""
    model_type = hf.get("model_type")
    if isinstance(model_type, str) and model_type in NOT_MAPPABLE:
        raise ConfigError(
            f"{where}: model_type {model_type} does not map: it has {NOT_MAPPABLE[model_type]}"
        )
    if not isinstance(model_type, str) or model_type not in FAMILIES:
        shown = config_lib.bounded(model_type)  # any JSON value: a list or object too
        raise ConfigError(
            f"{where}: model_type {shown} is not supported (import-hf reads {', '.join(FAMILIES)})"
        )
    return FAMILIES[model_type]


# ------------------------------------------------------------ config.json -> ours


def config_from_hf(hf: dict[str, Any], where: str) -> Config:
    """Our Config for a config.json of a supported family, or ConfigError naming what does
    not map."""
    family = family_of(hf, where)
    _refuse_unmapped(hf, family, where)
    data = _config_dict(hf, family, where)
    try:
        return config_lib.from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{where}: does not map: {e}") from None


def _refuse_unmapped(hf: dict[str, Any], family: Family, where: str) -> None:
    """ConfigError (one line) for a config.json whose activation, head size, attention
    window, biases, q/k clipping or RoPE our model does not have."""

    def refuse(reason: str):
        raise ConfigError(f"{where}: {reason}")

    value = partial(_hf_value, hf, where=where)
    d, heads = value("hidden_size", "count"), value("num_attention_heads", "count")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r} does not map (our MLPs are SwiGLU: silu)")
    head_dim = _head_dim(hf, family, where)
    if family.qk_norm == "full" and head_dim * heads != d:
        refuse(
            f"head_dim {head_dim} != hidden_size/num_attention_heads ({d}/{heads}) does not "
            f"map ({family.title}'s q/k norms span hidden_size)"
        )
    _refuse_sliding_window(hf, family, where)
    if value("attention_bias", "flag", False):
        refuse(
            "attention_bias=true does not map (biases on q, k, v and o; ours: model.qkv_bias, "
            "on q, k and v only)"
        )
    if value("mlp_bias", "flag", False):
        refuse("mlp_bias=true does not map (our MLPs have no biases)")
    if hf.get("clip_qkv") is not None:
        refuse(f"clip_qkv {hf['clip_qkv']!r} does not map (our attention does not clip q, k, v)")
    rope = _rope(hf, where)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "llama3"):
        refuse(f"RoPE scaling {kind!r} does not map (ours: default, llama3)")
    for settings in (hf, rope):
        rotated = _hf_value(settings, "partial_rotary_factor", "number", 1.0, where=where)
        if rotated != 1:
            refuse(f"partial_rotary_factor {rotated} does not map (ours rotates whole heads)")
    if family.moe is not None:
        _refuse_unmapped_moe(hf, family, where)


def _head_dim(hf: dict[str, Any], family: Family, where: str) -> int:
    """Each attention head's width as transformers computes it for the family."""
    value = partial(_hf_value, hf, where=where)
    d, heads = value("hidden_size", "count"), value("num_attention_heads", "count")
    default = family.head_dim_default or d // heads
    return _hf_value(hf, "head_dim", "count", default, where=where)


def _refuse_sliding_window(hf: dict[str, Any], family: Family, where: str) -> None:
    """ConfigError for attention limited to a window, in any of the families' spellings."""
    value = partial(_hf_value, hf, where=where)
    if family.sliding == "window":
        window = value("sliding_window", "count", family.window_default)
        max_pos = value("max_position_embeddings", "count", None)
        if window is not None and (max_pos is None or window < max_pos):
            raise ConfigError(
                f"{where}: sliding_window {window} < max_position_embeddings {max_pos} does "
                "not map (our attention is full causal)"
            )
    if family.sliding == "flag" and value("use_sliding_window", "flag", False):
        raise ConfigError(
            f"{where}: use_sliding_window=true (sliding_window {hf.get('sliding_window')}) "
            "does not map (our attention is full causal)"
        )
    kinds = hf.get("layer_types") or []
    other = [k for k in kinds if k != "full_attention"] if isinstance(kinds, list) else [kinds]
    if other:
        raise ConfigError(
            f"{where}: layer_types {config_lib.bounded(other[0])} does not map "
            "(ours: full causal attention in every layer)"
        )


def _refuse_unmapped_moe(hf: dict[str, Any], family: Family, where: str) -> None:
    """ConfigError for an MoE config.json whose routing our router does not compute."""
    keys = family.moe
    top_k = _hf_value(hf, "num_experts_per_tok", "count", keys.top_k_default, where=where)
    if top_k == 1 and _renormalize(hf, family, where):
        raise ConfigError(
            f"{where}: num_experts_per_tok=1 with renormalised weights (always 1.0) does not "
            "map (our top-1 router weighs by the softmax probability)"
        )


def _renormalize(hf: dict[str, Any], family: Family, where: str) -> bool:
    """Whether the family renormalises the top-k weights to sum 1."""
    key = family.moe.renormalize
    return key is None or _hf_value(hf, key, "flag", False, where=where)


def _rope(hf: dict[str, Any], where: str) -> dict[str, Any]:
    """The RoPE settings: transformers 5's rope_parameters, else rope_scaling ({} if none)."""
    value = partial(_hf_value, hf, where=where)
    return value("rope_parameters", "mapping", None) or value("rope_scaling", "mapping", {})


def _config_dict(hf: dict[str, Any], family: Family, where: str) -> dict[str, Any]:
    """Our config (sections of keys, as config.from_dict reads them) for a config.json
    that _refuse_unmapped has accepted."""
    value = partial(_hf_value, hf, where=where)
    d, heads = value("hidden_size", "count"), value("num_attention_heads", "count")
    head_dim = _head_dim(hf, family, where)
    qkv_bias = {"none": False, "always": True}.get(family.qkv_bias)
    if qkv_bias is None:  # a config.json key, true unless set (Qwen2-MoE)
        qkv_bias = value(family.qkv_bias, "flag", True)
    model = {
        "d_model": d,
        "n_layers": value("num_hidden_layers", "count"),
        "n_heads": heads,
        "n_kv_heads": value("num_key_value_heads", "count", heads),
        # 0 (d_model / n_heads) where that is the width, so the config reads as usual.
        "head_dim": 0 if head_dim * heads == d else head_dim,
        "qkv_bias": qkv_bias,
        "qk_norm": family.qk_norm,
        "d_ff": value("intermediate_size", "count"),
        "vocab_size": value("vocab_size", "count"),
        "tie_embeddings": value("tie_word_embeddings", "flag", False),
        "norm_eps": float(value("rms_norm_eps", "number", family.eps_default)),
        "init_std": float(value("initializer_range", "number", 0.02)),
        **_rope_settings(hf, family, where),
    }
    return {
        "model": model,
        "moe": _moe_dict(hf, family, model["n_layers"], where) if family.moe else {},
        # Fine-tuning defaults: a small learning rate; --set overrides as usual.
        "train": {"lr": 1e-5, "warmup_steps": 10, "steps": 100},
    }


def _rope_settings(hf: dict[str, Any], family: Family, where: str) -> dict[str, Any]:
    """Our model.rope_* keys for the config.json's RoPE (default or llama3)."""
    rope = _rope(hf, where)
    value = partial(_hf_value, rope, where=where)
    theta = _hf_value(hf, "rope_theta", "number", family.theta_default, where=where)
    out = {"rope_theta": float(value("rope_theta", "number", theta))}  # v5's place, else v4's
    if rope.get("rope_type", rope.get("type", "default")) == "llama3":
        max_pos = _hf_value(hf, "max_position_embeddings", "count", 8192, where=where)
        out |= {
            "rope_scaling": "llama3",
            "rope_factor": float(value("factor", "number")),
            "rope_low_freq_factor": float(value("low_freq_factor", "number")),
            "rope_high_freq_factor": float(value("high_freq_factor", "number")),
            "rope_original_max_len": value("original_max_position_embeddings", "count", max_pos),
        }
    return out


def _moe_dict(hf: dict[str, Any], family: Family, n_layers: int, where: str) -> dict[str, Any]:
    """Our moe section for an MoE family's config.json."""
    keys, value = family.moe, partial(_hf_value, hf, where=where)
    n_key = next((k for k in keys.num_experts if k in hf), keys.num_experts[0])
    top_k = value("num_experts_per_tok", "count", keys.top_k_default)
    d_expert = value(keys.d_expert, "count", keys.d_expert_default)
    every, first_dense = _moe_layers(hf, n_layers, where) if keys.dense_layers else (1, 0)
    out = {
        "num_experts": value(n_key, "count", keys.num_experts_default),
        "top_k": top_k,
        "d_expert": d_expert,
        "every": every,
        "first_dense": first_dense,
        "router": "topk",
        "dispatch": "dropless",
        "renormalize": _renormalize(hf, family, where),
        # HF jitters the whole MoE input, we the router input: training-only noise.
        "jitter": float(value("router_jitter_noise", "number", 0.0)),
        # HF's f_e counts assignments per token (sums to k), ours per assignment (sums
        # to 1): the same loss needs k times the coefficient.
        "lb_coef": float(value("router_aux_loss_coef", "number", keys.lb_coef_default)) * top_k,
        "z_coef": 0.0,  # these families train without a router z-loss
    }
    if keys.shared_expert:
        d_shared = value("shared_expert_intermediate_size", "count", 5632)  # Qwen2MoeConfig's
        out |= {"num_shared": 1, "d_shared": d_shared, "shared_gate": True}
    return out


def _moe_layers(hf: dict[str, Any], n_layers: int, where: str) -> tuple[int, int]:
    """(moe.every, moe.first_dense) placing the MoE layers where decoder_sparse_step and
    mlp_only_layers do, or ConfigError when ours cannot: layer i is MoE there iff i is
    not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    step = _hf_value(hf, "decoder_sparse_step", "count", 1, where=where)
    dense = hf.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(type(i) is int for i in dense):
        raise ConfigError(f"{where}: mlp_only_layers: expected a list of layer numbers")
    hf_kinds = [i not in dense and (i + 1) % step == 0 for i in range(n_layers)]
    moe_layers = [i for i, is_moe in enumerate(hf_kinds) if is_moe]
    for every in range(1, (moe_layers[0] + 2) if moe_layers else 1):
        first_dense = moe_layers[0] + 1 - every  # the first MoE layer ends the first unit
        ours = [i >= first_dense and (i - first_dense + 1) % every == 0 for i in range(n_layers)]
        if ours == hf_kinds and (n_layers - first_dense) % every == 0:
            return every, first_dense
    raise ConfigError(
        f"{where}: decoder_sparse_step={step}, mlp_only_layers={config_lib.bounded(dense)} "
        f"put MoE in layers {config_lib.bounded(moe_layers)}, which does not map (ours: "
        "moe.first_dense dense layers, then every moe.every-th layer MoE, through the last)"
    )


# ------------------------------------------------------------ ours -> config.json


def config_to_hf(cfg: Config, family: Family, source_hf: dict[str, Any] | None = None) -> dict:
    """A config.json of `family` for cfg (which refuse_export has accepted)."""
    m, src = cfg.model, source_hf or {}
    rope = {"rope_type": "default", "rope_theta": m.rope_theta}
    if m.rope_scaling == "llama3":
        rope |= {
            "rope_type": "llama3",
            "factor": m.rope_factor,
            "low_freq_factor": m.rope_low_freq_factor,
            "high_freq_factor": m.rope_high_freq_factor,
            "original_max_position_embeddings": m.rope_original_max_len,
        }
    out = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": m.d_model,
        "intermediate_size": m.d_ff,
        "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads,
        "num_key_value_heads": m.n_kv_heads,
        "head_dim": m.d_head,
        "vocab_size": m.vocab_size,
        "tie_word_embeddings": m.tie_embeddings,
        "rms_norm_eps": m.norm_eps,
        "rope_theta": m.rope_theta,  # transformers 4 reads this (and rope_scaling) ...
        "rope_scaling": None if m.rope_scaling == "none" else rope,
        "rope_parameters": rope,  # ... 5 this
        "hidden_act": "silu",
        "initializer_range": m.init_std,
        "max_position_embeddings": src.get("max_position_embeddings", cfg.train.seq_len),
        "attention_bias": False,
        "attention_dropout": 0.0,
        "sliding_window": None,
        "bos_token_id": src.get("bos_token_id"),
        "eos_token_id": src.get("eos_token_id"),
        "pad_token_id": src.get("pad_token_id"),
        "use_cache": True,
        "dtype": "float32",
        "torch_dtype": "float32",
    }
    if family.sliding == "flag":
        out["use_sliding_window"] = False
    if family.qkv_bias not in ("none", "always"):
        out[family.qkv_bias] = m.qkv_bias
    if family.moe is not None:
        out |= _moe_to_hf(cfg, family)
    return out


def _moe_to_hf(cfg: Config, family: Family) -> dict[str, Any]:
    """The config.json keys of an MoE family for cfg's moe section."""
    keys, e, plan = family.moe, cfg.moe, cfg.layer_plan()
    out = {
        keys.num_experts[0]: e.num_experts,
        keys.d_expert: e.d_expert,
        "num_experts_per_tok": e.top_k,
        "router_aux_loss_coef": e.lb_coef / e.top_k,  # see _moe_dict
        "output_router_logits": False,
    }
    if keys.renormalize is not None:
        out[keys.renormalize] = e.renormalize and e.top_k > 1  # ours weighs k=1 by p
    if family.model_type == "mixtral":
        out["router_jitter_noise"] = e.jitter
    if keys.dense_layers:
        # Every dense layer listed, each other layer MoE: exact for any every/first_dense.
        dense = [i for i, kind in enumerate(plan.kinds()) if kind == "dense"]
        out |= {"decoder_sparse_step": 1, "mlp_only_layers": dense}
    if keys.shared_expert:
        out["shared_expert_intermediate_size"] = e.shared_width
    return out


def refuse_export(cfg: Config, family: Family) -> None:
    """ConfigError (one line) for a model the family cannot express."""
    reason = cannot_express(cfg, family)
    if reason:
        raise ConfigError(f"export-hf: {family.title} cannot express {reason}")


def cannot_express(cfg: Config, family: Family) -> str | None:
    """The first of cfg's choices the family lacks, in words, or None."""
    m, e, keys = cfg.model, cfg.moe, family.moe
    fixed_bias = {"none": False, "always": True}.get(family.qkv_bias)
    reasons = [
        (keys is not None and not cfg.is_moe, "moe.num_experts=0: a dense model"),
        (keys is None and cfg.is_moe, f"moe.num_experts={e.num_experts}: an MoE model"),
        (
            m.qk_norm != family.qk_norm,
            f"model.qk_norm={m.qk_norm} (its q/k norm: {family.qk_norm})",
        ),
        (
            fixed_bias is not None and m.qkv_bias != fixed_bias,
            f"model.qkv_bias={str(m.qkv_bias).lower()} (its q/k/v biases: "
            f"{'always' if fixed_bias else 'none'})",
        ),
        (
            family.qk_norm == "full" and m.d_head * m.n_heads != m.d_model,
            f"model.head_dim={m.d_head} with d_model {m.d_model} and {m.n_heads} heads "
            "(its q/k norms span d_model)",
        ),
    ]
    if cfg.is_moe and keys is not None:
        reasons += _moe_cannot_express(cfg, keys)
    return next((reason for bad, reason in reasons if bad), None)


def _moe_cannot_express(cfg: Config, keys: MoEKeys) -> list[tuple[bool, str]]:
    """(whether it applies, reason) for each MoE choice of cfg an MoE family might lack."""
    e = cfg.moe
    return [
        (
            not keys.dense_layers and (e.every != 1 or e.first_dense != 0),
            "moe.every/first_dense: "
            f"layers mixing dense and MoE (every={e.every}, first_dense={e.first_dense})",
        ),
        (
            not keys.shared_expert and e.num_shared > 0,
            f"moe.num_shared={e.num_shared}: shared experts",
        ),
        (
            keys.shared_expert and e.num_shared == 0,
            "moe.num_shared=0 (its shared expert is always there)",
        ),
        (
            keys.shared_expert and e.num_shared > 0 and not e.shared_gate,
            "moe.shared_gate=false (its shared expert is always gated)",
        ),
        (e.router != "topk", f"moe.router={e.router}"),
        (e.pool == "global", "moe.pool=global: one expert pool shared by all layers"),
        (e.score != "softmax", f"moe.score={e.score}"),
        (e.groups > 1, f"moe.groups={e.groups} (group-limited routing)"),
        (e.route_scale != 1, f"moe.route_scale={e.route_scale}"),
        (
            keys.renormalize is None and e.top_k > 1 and not e.renormalize,
            f"moe.top_k={e.top_k} without moe.renormalize",
        ),
        # Mixtral renormalises even k=1 (weight 1.0); ours keeps the softmax probability.
        (
            keys.renormalize is None and e.top_k == 1,
            "moe.top_k=1 (weighted by the softmax probability, Switch style)",
        ),
    ]


def export_family(cfg: Config, model_type: str | None, imported: str | None = None) -> Family:
    """The family to export cfg as: model_type's (refused when it cannot express cfg), else
    the one it was imported from if that can, else the first of FAMILIES that can, else
    ConfigError naming what each one lacks."""
    if model_type is not None:
        if model_type not in FAMILIES:
            raise ConfigError(
                f"--model-type {config_lib.bounded(model_type)}: not one of {', '.join(FAMILIES)}"
            )
        refuse_export(cfg, FAMILIES[model_type])
        return FAMILIES[model_type]
    kin = [f for f in FAMILIES.values() if (f.moe is not None) == cfg.is_moe]
    kin.sort(key=lambda f: f.model_type != imported)  # stable: the imported one first
    reasons = {f.model_type: cannot_express(cfg, f) for f in kin}
    for family in kin:
        if reasons[family.model_type] is None:
            return family
    lacks = "; ".join(f"{name}: {reason}" for name, reason in reasons.items())
    raise ConfigError(f"export-hf: no Hugging Face family expresses this model ({lacks})")

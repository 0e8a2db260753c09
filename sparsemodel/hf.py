"""Hugging Face checkpoints in and out (`sparsemodel import-hf` / `export-hf`).

Each supported family (`hf_families`: Mixtral, Qwen3-MoE, Qwen2-MoE, OLMoE, Llama,
Mistral, Qwen2, Qwen3) computes the same function as our model with some config choices,
so conversion is a relabelling of tensors (nn.Linear weights are [out, in]; ours are
[in, out], stacked over layers; L is layer L's place in its stack, `slots`):

    HF tensor                                  ours
    model.embed_tokens.weight       [V, D]     embed.embedding             [V, D]
    lm_head.weight                  [V, D]     unembed                     [D, V]
    model.norm.weight               [D]        final_norm.scale            [D]
    layers.L.input_layernorm.weight [D]        attn_norm.scale[L]          [D]
    ...post_attention_layernorm...  [D]        ffn_norm.scale[L]           [D]
    ...self_attn.q_proj.weight      [H*Dh, D]  attn.wq[L]                  [D, H, Dh]
    ...self_attn.k_proj/v_proj      [Hkv*Dh, D] attn.wk/wv[L]              [D, Hkv, Dh]
    ...self_attn.o_proj.weight      [D, H*Dh]  attn.wo[L]                  [H, Dh, D]
    ...self_attn.q_proj.bias (k, v) [H*Dh]     attn.q_bias[L] (k_, v_)     [H, Dh]
    ...self_attn.q_norm.weight (k)  [Dh]       attn.q_norm.scale[L]        [Dh]     (head)
                                    [H*Dh]                                 [H, Dh]  (full)
    ...mlp.gate_proj/up_proj        [F, D]     ffn.w_gate/w_up[L]          [D, F]   (dense)
    ...mlp.down_proj                [D, F]     ffn.w_down[L]               [F, D]
    ...mlp.gate.weight              [E, D]     ffn.w_router[L]             [D, E]
    ...experts.i.gate_proj (w1)     [F, D]     ffn.w_gate_up[L, i, :, 0]   [D, F]
    ...experts.i.up_proj (w3)       [F, D]     ffn.w_gate_up[L, i, :, 1]   [D, F]
    ...experts.i.down_proj (w2)     [D, F]     ffn.w_down[L, i]            [F, D]
    ...mlp.shared_expert.gate_proj  [Fs, D]    ffn.w_shared_gate[L] (up)   [D, Fs]
    ...mlp.shared_expert_gate       [1, D]     ffn.w_shared_sigmoid[L]     [D, 1]

Mixtral keeps its experts under `block_sparse_moe.` with w1/w3/w2 names. Hugging Face
checkpoints already hold q/k in rotate-half order (their conversion from Meta's
interleaved layout permuted the rows), which is our `layers.rope`, so no permutation is
needed. transformers 5 keeps experts fused in memory (`mlp.gate.weight`,
`mlp.experts.gate_up_proj` [E, 2F, D] gate rows first, `mlp.experts.down_proj` [E, D, F]);
we read those names too, and write the per-expert names above, which is what transformers
5's `save_pretrained` writes and what every version loads.

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
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401 - registers numpy's 'bfloat16', so safetensors can read bf16
import numpy as np

from sparsemodel import config as config_lib
from sparsemodel.config import Config, ConfigError
from sparsemodel.hf_families import (
    FAMILIES,
    Family,
    config_from_hf,
    config_to_hf,
    export_family,
    read_json_object,
)
from sparsemodel.workdir import built_beside, refuse_existing

MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size for save_pretrained

# ------------------------------------------------------------------ tensor layout


@dataclass(frozen=True)
class Slot:
    """One HF tensor, its shape, and where it lives among our parameters."""

    hf: str
    shape: tuple[int, ...]  # in the HF checkpoint
    leaf: tuple  # our parameter's path in the params State
    index: tuple  # into that (stacked) parameter
    to_ours: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]


def _linear(hf: str, leaf: tuple, index: tuple, ours_shape: tuple[int, ...], n_in: int) -> Slot:
    """An nn.Linear weight [out, in] <-> ours [*in_dims, *out_dims] (n_in leading dims)."""
    n_rows, n_cols = math.prod(ours_shape[:n_in]), math.prod(ours_shape[n_in:])
    return Slot(
        hf,
        (n_cols, n_rows),
        leaf,
        index,
        lambda w: np.ascontiguousarray(w.T).reshape(ours_shape),
        lambda x: np.ascontiguousarray(x.reshape(n_rows, -1).T),
    )


def _vector(hf: str, leaf: tuple, index: tuple, ours_shape: tuple[int, ...]) -> Slot:
    """A norm scale or bias [n] <-> ours of n elements in any shape, e.g. [H, Dh]."""
    return Slot(
        hf,
        (math.prod(ours_shape),),
        leaf,
        index,
        lambda w: w.reshape(ours_shape),
        lambda x: np.ascontiguousarray(x).reshape(-1),
    )


def _layer_places(cfg: Config) -> Iterator[tuple[tuple, tuple, str]]:
    """For each layer in order: (its block's path, its index into that block's stacked
    parameters, 'dense' or 'moe'), as model.Transformer stacks them.

    With model.share_layers, a layer reads its unit modulo the unique units (the scan
    repeats them), so shared weights appear once per layer that uses them.
    """
    plan = cfg.layer_plan()
    for layer in range(plan.prefix):
        yield ("prefix", "blocks", 0), (layer,), "dense"
    for j in range(cfg.model.n_layers - plan.prefix):
        unit, block = divmod(j, len(plan.unit))
        yield ("units", "blocks", block), (unit % plan.unique_units,), plan.unit[block]


def slots(cfg: Config, family: Family) -> list[Slot]:
    """Every tensor of the family's checkpoint of cfg, in checkpoint order."""
    m = cfg.model
    out = [
        Slot(
            "model.embed_tokens.weight",
            (m.vocab_size, m.d_model),
            ("embed", "embedding"),
            (),
            _same,
            _same,
        )
    ]
    for layer, (blk, u, kind) in enumerate(_layer_places(cfg)):
        p = f"model.layers.{layer}."
        out.append(
            _vector(p + "input_layernorm.weight", blk + ("attn_norm", "scale"), u, (m.d_model,))
        )
        out += _attention_slots(cfg, p + "self_attn.", blk + ("attn",), u)
        out.append(
            _vector(
                p + "post_attention_layernorm.weight", blk + ("ffn_norm", "scale"), u, (m.d_model,)
            )
        )
        if kind == "dense":
            out += _mlp_slots(p + "mlp.", blk + ("ffn",), u, m.d_model, m.d_ff)
        else:
            out += _moe_slots(cfg, family, p + family.experts_prefix, blk + ("ffn",), u)
    out.append(_vector("model.norm.weight", ("final_norm", "scale"), (), (m.d_model,)))
    if not m.tie_embeddings:
        out.append(_linear("lm_head.weight", ("unembed",), (), (m.d_model, m.vocab_size), 1))
    return out


def _same(x):
    return x


def _attention_slots(cfg: Config, p: str, attn: tuple, u: tuple) -> list[Slot]:
    """q, k, v, o projections, then their biases and q/k norms where cfg has them."""
    m = cfg.model
    d, h, kv, dh = m.d_model, m.n_heads, m.n_kv_heads, m.d_head
    out = [
        _linear(p + "q_proj.weight", attn + ("wq",), u, (d, h, dh), 1),
        _linear(p + "k_proj.weight", attn + ("wk",), u, (d, kv, dh), 1),
        _linear(p + "v_proj.weight", attn + ("wv",), u, (d, kv, dh), 1),
        _linear(p + "o_proj.weight", attn + ("wo",), u, (h, dh, d), 2),
    ]
    if m.qkv_bias:
        for name, heads in (("q", h), ("k", kv), ("v", kv)):
            out.append(_vector(f"{p}{name}_proj.bias", attn + (f"{name}_bias",), u, (heads, dh)))
    if m.qk_norm != "none":
        for name, heads in (("q", h), ("k", kv)):
            shape = (dh,) if m.qk_norm == "head" else (heads, dh)
            out.append(
                _vector(f"{p}{name}_norm.weight", attn + (f"{name}_norm", "scale"), u, shape)
            )
    return out


def _mlp_slots(p: str, ffn: tuple, u: tuple, d: int, f: int, ours=("w_gate", "w_up", "w_down")):
    """A SwiGLU MLP's gate_proj, up_proj, down_proj (a dense layer's, or a shared expert's)."""
    gate, up, down = ours
    return [
        _linear(p + "gate_proj.weight", ffn + (gate,), u, (d, f), 1),
        _linear(p + "up_proj.weight", ffn + (up,), u, (d, f), 1),
        _linear(p + "down_proj.weight", ffn + (down,), u, (f, d), 1),
    ]


def _moe_slots(cfg: Config, family: Family, p: str, ffn: tuple, u: tuple) -> list[Slot]:
    """The router, each expert's gate, up and down, and the gated shared expert if any."""
    d, e = cfg.model.d_model, cfg.moe
    gate_up = ffn + ("w_gate_up",)  # [U, E, D, 2, F]: gate then up
    out = [_linear(p + "gate.weight", ffn + ("w_router",), u, (d, e.num_experts), 1)]
    gate, up, down = family.expert_names
    for i in range(e.num_experts):
        x = f"{p}experts.{i}."
        out += [
            _linear(f"{x}{gate}.weight", gate_up, u + (i, slice(None), 0), (d, e.d_expert), 1),
            _linear(f"{x}{up}.weight", gate_up, u + (i, slice(None), 1), (d, e.d_expert), 1),
            _linear(f"{x}{down}.weight", ffn + ("w_down",), u + (i,), (e.d_expert, d), 1),
        ]
    if e.num_shared:
        shared = ("w_shared_gate", "w_shared_up", "w_shared_down")
        out += _mlp_slots(p + "shared_expert.", ffn, u, d, e.shared_width, shared)
    if e.shared_gate:
        sigmoid = ffn + ("w_shared_sigmoid",)
        out.append(_linear(p + "shared_expert_gate.weight", sigmoid, u, (d, 1), 1))
    return out


# ------------------------------------------------------------------------ reading


class SafetensorsDir:
    """The tensors of a Hugging Face checkpoint directory, read one at a time by name.

    Accepts per-expert names also when the files hold transformers 5's fused ones.
    Opening reads only the files' headers (names, dtypes, shapes), which safetensors checks
    against the file sizes.
    """

    _EXPERT = re.compile(
        r"(model\.layers\.\d+\.)(?:block_sparse_moe|mlp)\.experts\.(\d+)\."
        r"(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
    )
    _GATE, _DOWN = ("w1", "gate_proj"), ("w2", "down_proj")

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
        """The stored tensor that holds the tensor `name`: itself or transformers 5's."""
        if name in self.file_of:
            return name
        match = self._EXPERT.match(name)
        if match is not None:
            fused = "down_proj" if match.group(3) in self._DOWN else "gate_up_proj"
            alias = f"{match.group(1)}mlp.experts.{fused}"
        else:
            alias = name.replace("block_sparse_moe.gate.", "mlp.gate.")
        if alias in self.file_of:
            return alias
        nor = f" (nor {alias})" if alias != name else ""
        raise ConfigError(f"checkpoint has no tensor {name}{nor}")

    def get(self, name: str) -> np.ndarray:
        """The tensor `name` (a per-expert name for experts) as float32."""
        stored = self.stored_name(name)
        match = self._EXPERT.match(name)
        if stored == name or match is None:
            return self.file_of[stored].get_tensor(stored).astype(np.float32)
        i, w = int(match.group(2)), match.group(3)
        rows = self.file_of[stored].get_slice(stored)[i].astype(np.float32)  # one expert only
        if w in self._DOWN:
            return rows  # [D, F]
        half = rows.shape[0] // 2  # gate_up rows: gate then up
        return rows[:half] if w in self._GATE else rows[half:]  # [F, D]


def _safetensors_files(src: Path) -> list[str]:
    """The files of src's index (each checked to exist), else every *.safetensors in src."""
    index = src / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index).get("weight_map")
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


def _check_tensors(cfg: Config, family: Family, reader: SafetensorsDir) -> None:
    """ConfigError (one line) for the first stored tensor that is missing, unused, not
    floating point or not of the shape config.json implies, so that a wrong layout of the
    same size (e.g. a transposed projection) is refused, not silently reshaped."""
    stored: dict[str, Slot] = {}  # in checkpoint order
    for slot in slots(cfg, family):
        stored.setdefault(reader.stored_name(slot.hf), slot)
    for name, slot in stored.items():
        shape, dtype = reader.header(name)
        if dtype not in _FLOAT_DTYPES:
            floats = ", ".join(_FLOAT_DTYPES)
            raise ConfigError(f"tensor {name}: dtype {dtype}, expected a float ({floats})")
        expected = _stored_shape(name, slot, cfg)
        if shape != expected:
            raise ConfigError(
                f"tensor {name}: shape {shape} in the checkpoint, expected {expected} "
                "from config.json"
            )
    ignorable = {"lm_head.weight"} if cfg.model.tie_embeddings else set()
    left = sorted(reader.names() - stored.keys() - ignorable)
    left = [n for n in left if not n.endswith("rotary_emb.inv_freq")]  # a buffer, not a weight
    if left:
        raise ConfigError(
            f"tensor {left[0]} has no place in a {family.title} model ({len(left)} unused)"
        )


def _stored_shape(stored: str, slot: Slot, cfg: Config) -> tuple[int, ...]:
    """The shape of the stored tensor holding slot: the slot's own, or that of transformers
    5's experts fused over the layer."""
    e, d = cfg.moe, cfg.model.d_model
    if stored.endswith("mlp.experts.gate_up_proj"):
        return (e.num_experts, 2 * e.d_expert, d)  # gate rows then up rows
    if stored.endswith("mlp.experts.down_proj"):
        return (e.num_experts, d, e.d_expert)
    return slot.shape


# ------------------------------------------------------------------------- import


def import_hf(src: str | Path, workdir: str | Path, log=print) -> Config:
    """Converts a Hugging Face checkpoint directory of a supported family into a workdir
    holding a step-0 checkpoint.

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
    hf_cfg = read_json_object(cfg_path)
    cfg = config_from_hf(hf_cfg, str(cfg_path))
    family = FAMILIES[hf_cfg["model_type"]]
    tokenizer, generation = src / "tokenizer.json", src / "generation_config.json"
    if tokenizer.is_file():
        cfg = cfg.replace({"data.tokenizer": "bpe"})  # train/eval/generate read the copy below
    if generation.is_file():
        read_json_object(generation)  # export-hf writes it back: refuse a broken one now
    refuse_existing(workdir, f"--workdir {workdir}")
    with ExitStack() as stack:
        reader = SafetensorsDir(src, stack)
        _check_tensors(cfg, family, reader)
        with built_beside(workdir, f"--workdir {workdir}") as build:
            if tokenizer.is_file():
                shutil.copyfile(tokenizer, build / "tokenizer.json")
            if generation.is_file():
                shutil.copyfile(generation, build / "hf_generation_config.json")
            (build / "hf_config.json").write_text(json.dumps(hf_cfg, indent=2))  # for export-hf
            memmaps = build / "import-memmaps"
            memmaps.mkdir()
            params = _assemble(cfg, family, reader, memmaps, log)
            ckpt = Checkpointer(build, async_save=False)
            ckpt.save_host_params(0, params, {"step": 0, "seed": 0, "source": str(src)})
            ckpt.close()
            shutil.rmtree(memmaps)
            config_lib.dump(cfg, build / "config.yaml")
    return cfg


def _assemble(cfg: Config, family: Family, reader: SafetensorsDir, memmaps: Path, log):
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
    todo = slots(cfg, family)
    assert {slot.leaf for slot in todo} == arrays.keys(), "a parameter no tensor fills"
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
    model_type: str | None = None,
) -> list[Path]:
    """Writes a Hugging Face directory (config.json, generation_config.json, safetensors)
    that transformers loads, as `model_type`: by default the family the workdir was
    imported from where it can express the model, else the first that can.

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
    source_hf = read_json_object(source) if source.is_file() else {}
    family = export_family(cfg, model_type, source_hf.get("model_type"))
    hf_cfg = config_to_hf(cfg, family, source_hf)
    generation = _generation_config(workdir, hf_cfg)
    refuse_existing(out, f"output {out}")
    ckpt = Checkpointer(workdir, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise CheckpointError(f"--workdir {workdir}: holds no checkpoint yet")
    _check_checkpoint_holds(ckpt, step, cfg)
    _refuse_router_bias(ckpt, step, cfg)

    todo = sorted(slots(cfg, family), key=lambda s: tuple(map(str, s.leaf)))  # leaf by leaf
    fetch = _one_leaf_at_a_time(ckpt, step)
    shapes = {s.hf: s.shape for s in todo}
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
        (build / "generation_config.json").write_text(json.dumps(generation, indent=2))
        names += ["config.json", "generation_config.json"]
        if (workdir / "tokenizer.json").is_file():
            shutil.copyfile(workdir / "tokenizer.json", build / "tokenizer.json")
            names.append("tokenizer.json")
    return [out / name for name in names]


def _generation_config(workdir: Path, hf_cfg: dict[str, Any]) -> dict[str, Any]:
    """The imported model's generation_config.json, else one of config.json's token ids."""
    stored = workdir / "hf_generation_config.json"
    if stored.is_file():
        return read_json_object(stored)
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {key: hf_cfg[key] for key in ids if hf_cfg[key] is not None}


def parse_size(text: str) -> int:
    """Bytes of a size such as '5GB', '500MB', '2GiB' or '1000000', as save_pretrained's
    max_shard_size reads them; ConfigError (one line) otherwise."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in units or float(match.group(1)) * units[unit] < 1:
        raise ConfigError(
            f"--max-shard-size {config_lib.bounded(text)}: expected a size such as 5GB, "
            "500MB or 2GiB"
        )
    return int(float(match.group(1)) * units[unit])


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
                f"export-hf: no Hugging Face family expresses the router bias of moe.bias_rate "
                f"(non-zero in checkpoint step {step})"
            )


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

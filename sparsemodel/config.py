"""Typed, frozen configuration: presets are data files, overrides are `key=value` strings.

Every check that can fail on user input runs here, before JAX compiles anything, and
raises `ConfigError` whose message is one line naming the key and the reason.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import re
import reprlib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

from sparsemodel.files import write_atomic

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A bad configuration value; the message names the key and the reason."""


class _Loader(yaml.SafeLoader):
    """Safe YAML (no Python object tags) that also reads `1e-3` as a float, as YAML 1.2 and
    TOML do (PyYAML's YAML 1.1 resolver would return the string '1e-3'), and refuses a key
    given twice in one mapping, as YAML 1.2 and TOML do (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then a key of base overrides it, as YAML intends
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: the base class refuses it below
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    problem=f"duplicate key {bounded(key)} at line {key_node.start_mark.line + 1}"
                )
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# A few aliases expand to billions of elements ("billion laughs"): repr() of the whole value
# would never finish, so messages show a few elements of a few levels.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 40, 40, 40


def bounded(value: Any) -> str:
    """repr() of a value, cut to a few dozen characters however large the value is."""
    return _REPR.repr(value)


def _bounded_name(name: Any) -> str:
    """A key as written, cut like `bounded` when long."""
    text = str(name)
    return text if len(text) <= 40 else bounded(text)


# JAX's 32-bit keys keep the low 32 bits of a seed (2**32 samples like 0, -1 like 2**32-1)
# and grain's shuffle refuses seeds outside [0, 2**32): seeds outside it would repeat others.
MAX_SEED = 2**32 - 1


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 4
    d_ff: int = 1024  # width of dense SwiGLU MLPs
    vocab_size: int = 256
    share_layers: int = 0  # g > 0: g unique blocks reused cyclically through the depth
    tie_embeddings: bool = False
    head_dim: int = 0  # width of each attention head; 0: d_model // n_heads
    qkv_bias: bool = False  # biases on the q, k and v projections (Qwen2)
    # RMSNorm of q and k before RoPE: "head" over each head's width (Qwen3), "full" over all
    # heads of the projection at once (OLMoE).
    qk_norm: Literal["none", "head", "full"] = "none"
    rope_theta: float = 10000.0
    # "llama3": Llama 3.1's RoPE frequency scaling with the four rope_* settings below.
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def d_head(self) -> int:
        """The width of each attention head."""
        return self.head_dim or self.d_model // self.n_heads


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int = 0  # 0 = dense model
    top_k: int = 2
    d_expert: int = 512  # width of each routed expert
    num_shared: int = 0  # always-on shared experts, fused into one MLP of num_shared*d_shared
    d_shared: int = 0  # width of each shared expert; 0: d_expert
    shared_gate: bool = False  # scale the shared experts' output by sigmoid(x w) (Qwen2-MoE)
    # "layer": each MoE layer owns its experts; "global": one pool of num_experts experts that
    # every MoE layer routes into with its own router (more experts at the same FLOPs).
    pool: Literal["layer", "global"] = "layer"
    every: int = 1  # every n-th layer (after first_dense) is an MoE layer
    first_dense: int = 0  # the first k layers are dense
    router: Literal["topk", "expert_choice"] = "topk"
    dispatch: Literal["dropless", "capacity"] = "dropless"
    grouped_matmul: Literal["auto", "blocks", "batched", "ragged_dot", "tokamax"] = "auto"
    block_size: int = 128  # rows per block of the grouped matmul (CPU: the largest block)
    capacity_factor: float = 1.25
    # Capacity dispatch's group: "sequence" gives each sequence C = ceil(k * train.seq_len / E
    # * capacity_factor) slots per expert, filled in position order (causal, independent of
    # the batch); "batch" shares ceil(k * T / E * capacity_factor) among the T tokens of a
    # device group, token-major (a workdir written before this key existed runs "batch").
    capacity_group: Literal["sequence", "batch"] = "sequence"
    renormalize: bool = True  # renormalise top-k weights to sum 1 (k > 1 only)
    # Router scores: "softmax" over the experts, or "sigmoid": one affinity per expert
    # (DeepSeek-V3), chosen top-k and renormalised over the k as softmax's are.
    score: Literal["softmax", "sigmoid"] = "softmax"
    groups: int = 1  # group-limited routing: experts in G groups of num_experts / G ...
    topk_groups: int = 1  # ... of which each token uses its best topk_groups
    # Auxiliary-loss-free balancing (DeepSeek-V3): a per-layer, per-expert bias added to
    # the scores for choosing experts only, moved by bias_rate * sign(mean load - load)
    # after every step (0 = no bias).
    bias_rate: float = 0.0
    route_scale: float = 1.0  # multiplies the combine weights (DeepSeek-V3's routed scaling)
    # Load-balance loss over the micro-batch's assignments ("batch") or per sequence,
    # averaged over sequences ("sequence", DeepSeek-V3's sequence-wise balance loss).
    lb_scope: Literal["batch", "sequence"] = "batch"
    health_intervals: int = 5  # warn after this many log intervals with dead/flooded experts
    jitter: float = 0.0  # multiplicative router-input noise U(1-eps, 1+eps) in training
    lb_coef: float = 0.01
    z_coef: float = 1e-3

    @property
    def shared_width(self) -> int:
        """The width of the fused shared-expert MLP (0: none)."""
        return self.num_shared * (self.d_shared or self.d_expert)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 16
    seq_len: int = 256
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 0
    dtype: Literal["float32", "bfloat16"] = "float32"
    moment_dtype: Literal["float32", "bfloat16"] = "float32"  # AdamW's two moments, stored
    remat: Literal["none", "full", "dots"] = "none"
    log_every: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    eval_every: int = 200
    eval_batches: int = 8


@dataclass(frozen=True)
class DataConfig:
    source: str = "stdlib"  # "stdlib", a text file, a directory of text files, or .npy/.bin
    val_fraction: float = 0.05  # share of files (by path hash) held out for validation
    # "byte": id = byte value. "bpe": <workdir>/tokenizer.json, trained on the training
    # split (byte-level BPE of model.vocab_size tokens) unless the workdir already has one.
    tokenizer: Literal["byte", "bpe"] = "byte"


@dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1


class LayerPlan(NamedTuple):
    """The layers as the model scans them: `prefix` dense layers (moe.first_dense), then
    `repeats` passes over `unique_units` units of `unit` layers each (with
    model.share_layers, units are reused: fewer parameters, the same FLOPs)."""

    prefix: int
    unit: tuple[str, ...]  # 'dense' or 'moe' for each layer of one unit
    unique_units: int
    repeats: int

    def kinds(self) -> list[str]:
        """'dense' or 'moe' for every layer, in order."""
        return ["dense"] * self.prefix + list(self.unit) * (self.unique_units * self.repeats)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)

    @property
    def is_moe(self) -> bool:
        return self.moe.num_experts > 0

    def layer_plan(self) -> LayerPlan:
        """How the layers stack into the model's scanned units (see model.py)."""
        m, moe_cfg = self.model, self.moe
        prefix = moe_cfg.first_dense if self.is_moe else 0
        unit = ("dense",) * (moe_cfg.every - 1) + ("moe",) if self.is_moe else ("dense",)
        n_units = (m.n_layers - prefix) // len(unit)
        unique = m.share_layers // len(unit) if m.share_layers else n_units
        return LayerPlan(prefix, unit, unique, n_units // unique)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def replace(self, overrides: dict[str, Any]) -> Config:
        return from_dict(_merge(self.to_dict(), _nest(overrides)))


# ---------------------------------------------------------------------------- loading


def load(name_or_path: str | Path = "small", overrides: dict[str, Any] | None = None) -> Config:
    """Loads a preset name (`tiny`, `small`, ...) or a YAML/TOML file, then applies overrides.

    Override values may be typed (`{"moe.num_experts": 4}`) or strings from the command
    line (`"4"`); strings are parsed as YAML scalars and then type-checked.
    """
    data = read_file(_resolve(name_or_path))
    data = _merge(data, _nest(overrides or {}))
    return from_dict(data)


# Keys added after workdirs were first written, with the value that reproduces what a
# config.yaml without them ran: a resumed, evaluated or exported run does not change.
LEGACY_VALUES = {"moe.capacity_group": "batch"}


def load_stored(path: Path, overrides: dict[str, Any] | None = None) -> Config:
    """Loads a workdir's config.yaml (then overrides); keys its file lacks because it was
    written before they existed take their LEGACY_VALUES."""
    data = read_file(path)
    missing = {key: value for key, value in LEGACY_VALUES.items() if not _holds(data, key)}
    return from_dict(_merge(_merge(data, _nest(missing)), _nest(overrides or {})))


def _holds(data: dict[str, Any], key: str) -> bool:
    """Whether file data sets `section.name` (a malformed section counts: from_dict names it)."""
    section, _, name = key.partition(".")
    values = data.get(section)
    return values is not None and (not isinstance(values, dict) or name in values)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """['moe.top_k=1', ...] -> {'moe.top_k': '1'}; the value is type-checked later."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {bounded(pair)}: expected key=value, e.g. moe.top_k=2")
        out[key.strip()] = value
    return out


def read_file(path: Path) -> dict[str, Any]:
    """Parses YAML or TOML as plain data: YAML tags for Python objects are refused."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: cannot read ({e})") from None
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else _yaml(text)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: TOML's, and over-long integers
        reason = str(e).splitlines()[0]
        raise ConfigError(f"config file {path}: not valid YAML/TOML ({reason})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a mapping of sections, got {bounded(data)}"
        )
    return data


def dump(cfg: Config, path: Path) -> None:
    """Writes cfg as YAML, atomically (StorageError when the write fails)."""
    write_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def _resolve(name_or_path: str | Path) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".toml") or path.exists():
        if not path.exists():
            raise ConfigError(f"--config {name_or_path}: no such file")
        if not path.is_file():  # a FIFO or device would block or never end
            raise ConfigError(f"--config {name_or_path}: not a regular file")
        return path
    preset = PRESET_DIR / f"{name_or_path}.yaml"
    if not preset.is_file():
        raise ConfigError(
            f"--config {name_or_path}: not a file and not a preset ({', '.join(preset_names())})"
        )
    return preset


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    """{'moe.top_k': 1} -> {'moe': {'top_k': 1}}."""
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        section, dot, name = key.partition(".")
        if not dot or not name or "." in name:
            raise ConfigError(f"{key}: keys are section.name, e.g. moe.top_k")
        nested.setdefault(section, {})[name] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for section, values in update.items():
        if not isinstance(values, dict):
            raise ConfigError(
                f"{_bounded_name(section)}: expected a section (mapping), got {bounded(values)}"
            )
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"{_bounded_name(section)}: expected a section (mapping)")
        out[section].update(values)
    return out


# ------------------------------------------------------------------ typing and checks


def from_dict(data: dict[str, Any]) -> Config:
    """Builds a validated Config from nested plain data."""
    sections = {}
    for f in dataclasses.fields(Config):
        cls = f.type if isinstance(f.type, type) else _SECTIONS[f.name]
        values = data.get(f.name) or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{f.name}: expected a section (mapping), got {bounded(values)}")
        sections[f.name] = _build_section(f.name, cls, values)
    unknown = set(data) - set(sections)
    if unknown:
        first = sorted(map(str, unknown))[0]
        raise ConfigError(
            f"{_bounded_name(first)}: unknown config section ({', '.join(_SECTIONS)})"
        )
    cfg = Config(**sections)
    validate(cfg)
    return cfg


_SECTIONS = {
    "model": ModelConfig,
    "moe": MoEConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "mesh": MeshConfig,
}


def _build_section(section: str, cls: type, values: dict[str, Any]):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if name not in hints:
            raise ConfigError(f"{section}.{_bounded_name(name)}: unknown key")
        kwargs[name] = _coerce(f"{section}.{name}", value, hints[name])
    return cls(**kwargs)


def _coerce(key: str, value: Any, hint: Any) -> Any:
    """Checks (and for command-line strings, parses) one value against its declared type."""
    if isinstance(value, str) and hint is not str and typing.get_origin(hint) is not Literal:
        with contextlib.suppress(yaml.YAMLError, ValueError):
            value = _yaml(value)
    if typing.get_origin(hint) is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(
                f"{key}: {bounded(value)} is not one of {', '.join(map(str, allowed))}"
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {bounded(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {bounded(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key}: expected a number, got {bounded(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {bounded(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {bounded(value)}")
        return value
    raise TypeError(f"{key}: unsupported field type {hint}")


def _need(ok: bool, key: str, reason: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {reason}")


def validate(cfg: Config) -> None:
    """Cross-field checks; the mesh against the device count is checked in sharding.py."""
    _check_model(cfg.model)
    _check_moe(cfg.moe, cfg.model)
    if cfg.model.share_layers:
        _check_layer_sharing(cfg)
    _check_train(cfg.train)
    _need(bool(cfg.data.source), "data.source", "must not be empty")
    val_fraction = cfg.data.val_fraction
    _need(0 < val_fraction < 1, "data.val_fraction", f"must be in (0, 1), got {val_fraction}")
    _check_vocab_for_tokenizer(cfg.model, cfg.data)
    _check_mesh(cfg)


def _check_model(m: ModelConfig) -> None:
    for key in ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size"):
        _need(getattr(m, key) > 0, f"model.{key}", f"must be positive, got {getattr(m, key)}")
    _need(
        m.head_dim >= 0, "model.head_dim", f"must be >= 0 (0 = d_model / n_heads), got {m.head_dim}"
    )
    if m.head_dim:
        _need(
            m.head_dim % 2 == 0,
            "model.head_dim",
            f"{m.head_dim} must be even for rotary embeddings",
        )
    else:
        _need(
            m.d_model % m.n_heads == 0,
            "model.d_model",
            f"{m.d_model} is not divisible by model.n_heads={m.n_heads}",
        )
        _need(
            m.d_head % 2 == 0,
            "model.d_model",
            f"head size {m.d_head} must be even for rotary embeddings",
        )
    _need(
        m.n_heads % m.n_kv_heads == 0,
        "model.n_heads",
        f"{m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads}",
    )
    _need(m.norm_eps > 0, "model.norm_eps", "must be positive")
    _need(m.init_std > 0, "model.init_std", "must be positive")
    _need(m.rope_theta > 0, "model.rope_theta", "must be positive")
    if m.rope_scaling == "llama3":
        _check_llama3_rope(m)


def _check_llama3_rope(m: ModelConfig) -> None:
    """The settings of Llama 3.1's RoPE scaling (transformers checks the same)."""
    _need(m.rope_factor >= 1, "model.rope_factor", f"must be >= 1, got {m.rope_factor}")
    low, high = m.rope_low_freq_factor, m.rope_high_freq_factor
    _need(low > 0, "model.rope_low_freq_factor", f"must be positive, got {low}")
    _need(
        high > low,
        "model.rope_high_freq_factor",
        f"{high} must exceed model.rope_low_freq_factor={low}",
    )
    _need(
        m.rope_original_max_len > 0,
        "model.rope_original_max_len",
        f"must be positive, got {m.rope_original_max_len}",
    )


def _check_moe(e: MoEConfig, m: ModelConfig) -> None:
    """The experts' settings; a dense model (no experts) has none that mean anything."""
    _need(e.num_experts >= 0, "moe.num_experts", f"must be >= 0 (0 = dense), got {e.num_experts}")
    if e.num_experts == 0:
        return
    _need(e.top_k >= 1, "moe.top_k", f"must be >= 1, got {e.top_k}")
    _need(
        e.top_k <= e.num_experts,
        "moe.top_k",
        f"{e.top_k} exceeds moe.num_experts={e.num_experts}",
    )
    _need(e.d_expert > 0, "moe.d_expert", f"must be positive, got {e.d_expert}")
    _need(e.num_shared >= 0, "moe.num_shared", f"must be >= 0, got {e.num_shared}")
    _need(e.d_shared >= 0, "moe.d_shared", f"must be >= 0 (0 = d_expert), got {e.d_shared}")
    _need(
        e.num_shared > 0 or (e.d_shared == 0 and not e.shared_gate),
        "moe.d_shared" if e.d_shared else "moe.shared_gate",
        "is set but moe.num_shared=0 (no shared experts)",
    )
    _need(e.every >= 1, "moe.every", f"must be >= 1, got {e.every}")
    _need(
        0 <= e.first_dense < m.n_layers,
        "moe.first_dense",
        f"must be in [0, model.n_layers={m.n_layers}), got {e.first_dense}",
    )
    _need(
        (m.n_layers - e.first_dense) % e.every == 0,
        "moe.every",
        f"model.n_layers - moe.first_dense = {m.n_layers - e.first_dense} "
        f"is not a multiple of {e.every}",
    )
    _need(
        e.capacity_factor > 0,
        "moe.capacity_factor",
        f"must be positive, got {e.capacity_factor}",
    )
    _need(e.block_size >= 1, "moe.block_size", f"must be >= 1, got {e.block_size}")
    _need(
        e.grouped_matmul != "tokamax" or importlib.util.find_spec("tokamax") is not None,
        "moe.grouped_matmul",
        "tokamax is not installed (install the tokamax extra: pip install -e '.[tokamax]')",
    )
    _need(0 <= e.jitter < 1, "moe.jitter", f"must be in [0, 1), got {e.jitter}")
    _need(e.lb_coef >= 0, "moe.lb_coef", f"must be >= 0, got {e.lb_coef}")
    _need(e.z_coef >= 0, "moe.z_coef", f"must be >= 0, got {e.z_coef}")
    _check_routing(e)


def _check_routing(e: MoEConfig) -> None:
    """Token choice's routing options (DeepSeek-V3's): groups, bias, scaling, health."""
    n, g = e.num_experts, e.groups
    _need(g >= 1, "moe.groups", f"must be >= 1, got {g}")
    _need(n % g == 0, "moe.groups", f"{g} does not divide moe.num_experts={n}")
    _need(
        1 <= e.topk_groups <= g,
        "moe.topk_groups",
        f"must be in [1, moe.groups={g}], got {e.topk_groups}",
    )
    _need(
        e.top_k <= e.topk_groups * (n // g),
        "moe.top_k",
        f"{e.top_k} exceeds the {e.topk_groups * (n // g)} experts of moe.topk_groups="
        f"{e.topk_groups} groups of {n // g}",
    )
    _need(e.bias_rate >= 0, "moe.bias_rate", f"must be >= 0 (0 = no bias), got {e.bias_rate}")
    _need(e.route_scale > 0, "moe.route_scale", f"must be positive, got {e.route_scale}")
    _need(
        e.health_intervals >= 1,
        "moe.health_intervals",
        f"must be >= 1, got {e.health_intervals}",
    )
    if e.router == "expert_choice":  # experts pick tokens: no per-token choice to shape
        for key, is_set in (
            ("moe.score", e.score != "softmax"),
            ("moe.groups", g > 1),
            ("moe.bias_rate", e.bias_rate > 0),
            ("moe.route_scale", e.route_scale != 1),
            ("moe.lb_scope", e.lb_scope != "batch"),
        ):
            _need(not is_set, key, "applies to moe.router=topk only (not expert_choice)")


def _check_layer_sharing(cfg: Config) -> None:
    """model.share_layers: the scan repeats whole groups of layers, MoE pattern included."""
    m, e = cfg.model, cfg.moe
    g = m.share_layers
    period = e.every if cfg.is_moe else 1
    _need(g > 0, "model.share_layers", f"must be >= 0 (0 = no sharing), got {g}")
    _need(
        m.n_layers % g == 0,
        "model.share_layers",
        f"model.n_layers={m.n_layers} is not a multiple of {g}",
    )
    _need(g % period == 0, "model.share_layers", f"{g} is not a multiple of moe.every={period}")
    _need(
        not cfg.is_moe or e.first_dense == 0,
        "model.share_layers",
        "cannot be combined with moe.first_dense > 0",
    )


def _check_train(t: TrainConfig) -> None:
    for key in (
        "steps",
        "batch_size",
        "grad_accum",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "eval_every",
        "eval_batches",
    ):
        _need(getattr(t, key) > 0, f"train.{key}", f"must be positive, got {getattr(t, key)}")
    _need(t.seq_len >= 2, "train.seq_len", f"must be >= 2, got {t.seq_len}")
    _need(t.lr > 0, "train.lr", f"must be positive, got {t.lr}")
    _need(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", "must be in [0, 1]")
    _need(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _need(0 <= t.seed <= MAX_SEED, "train.seed", f"must be in [0, 2**32 - 1], got {t.seed}")
    _need(t.weight_decay >= 0, "train.weight_decay", "must be >= 0")
    _need(0 <= t.beta1 < 1, "train.beta1", "must be in [0, 1)")
    _need(0 <= t.beta2 < 1, "train.beta2", "must be in [0, 1)")
    _need(t.grad_clip >= 0, "train.grad_clip", "must be >= 0 (0 = no clipping)")
    _need(
        t.batch_size % t.grad_accum == 0,
        "train.batch_size",
        f"{t.batch_size} is not divisible by train.grad_accum={t.grad_accum}",
    )


def _check_mesh(cfg: Config) -> None:
    """Axis sizes, and the axes that split experts and heads dividing what they split."""
    m, e, mesh = cfg.model, cfg.moe, cfg.mesh
    for key in ("data", "fsdp", "expert", "tensor"):
        size = getattr(mesh, key)
        _need(size == -1 or size >= 1, f"mesh.{key}", f"must be >= 1 or -1 (fill), got {size}")
    fills = [k for k in ("data", "fsdp", "expert", "tensor") if getattr(mesh, k) == -1]
    _need(len(fills) <= 1, f"mesh.{fills[-1] if fills else 'data'}", "only one axis may be -1")
    if cfg.is_moe and mesh.expert > 1:
        _need(
            e.num_experts % mesh.expert == 0,
            "mesh.expert",
            f"moe.num_experts={e.num_experts} is not divisible by {mesh.expert}",
        )
    if mesh.tensor > 1:
        _need(
            m.n_kv_heads % mesh.tensor == 0,
            "mesh.tensor",
            f"model.n_kv_heads={m.n_kv_heads} is not divisible by {mesh.tensor}",
        )


def _check_vocab_for_tokenizer(m: ModelConfig, d: DataConfig) -> None:
    """Byte ids need 256 rows (pre-tokenized arrays bring their own ids); BPE needs the 256
    byte symbols plus at least one merge, and ids that fit int32 token storage."""
    v = m.vocab_size
    if d.tokenizer == "bpe":
        _need(
            v >= 257,
            "model.vocab_size",
            f"data.tokenizer=bpe needs >= 257 (256 bytes + merges), got {v}",
        )
        _need(
            v < 2**31,
            "model.vocab_size",
            f"data.tokenizer=bpe needs < 2**31 (int32 token ids), got {v}",
        )
    elif not d.source.endswith((".npy", ".bin")):
        _need(
            v >= 256,
            "model.vocab_size",
            f"data.tokenizer=byte needs >= 256 (one id per byte), got {v}",
        )


# Fields that change parameter shapes: a checkpoint records them (`model_record`), and a
# config that differs from the record in any of them is refused, never restored.
SHAPE_FIELDS = (
    "model.d_model",
    "model.n_layers",
    "model.n_heads",
    "model.n_kv_heads",
    "model.d_ff",
    "model.vocab_size",
    "model.share_layers",
    "model.tie_embeddings",
    "model.head_dim",
    "model.qkv_bias",
    "model.qk_norm",
    "moe.num_experts",
    "moe.d_expert",
    "moe.num_shared",
    "moe.d_shared",
    "moe.shared_gate",
    "moe.pool",
    "moe.every",
    "moe.first_dense",
    "data.tokenizer",  # not a shape, but the ids would mean other text
)


def model_record(cfg: Config) -> dict[str, Any]:
    """The SHAPE_FIELDS of cfg: what a checkpoint records of the model it holds."""
    flat = {f"{s}.{k}": v for s, values in cfg.to_dict().items() for k, v in values.items()}
    return {key: flat[key] for key in SHAPE_FIELDS}


def check_model_record(record: dict[str, Any], cfg: Config, where: str) -> None:
    """Raises ConfigError (one line, naming every key) where cfg's model differs from a
    checkpoint's record of its own; keys the record lacks are not compared."""
    ours = model_record(cfg)
    diffs = [
        f"{key}={ours[key]} (checkpoint: {record[key]})"
        for key in SHAPE_FIELDS
        if key in record and record[key] != ours[key]
    ]
    if diffs:
        raise ConfigError(
            f"{where} holds another model than the config: {', '.join(diffs)} "
            "(use a new --workdir, or the config the checkpoint was trained with)"
        )

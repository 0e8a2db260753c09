"""Configuration: presets, `--set` overrides, config files, validation and the CLI's error path.

Nothing here compiles JAX code; every check runs on plain data, as `sparsemodel train`
does before it builds a model.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import jax
import pytest
import yaml

from sparsemodel import cli, config, train
from sparsemodel.flops import param_counts

PRESETS = ["tiny", "small", "small-dense", "gpu-1b", "gpu-1b-dense"]


# ----------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads(name):
    cfg = config.load(name)
    assert isinstance(cfg, config.Config)
    assert name in config.preset_names()
    assert cfg.moe.capacity_group == "sequence"  # new runs: causal, batch-independent capacity


@pytest.mark.parametrize("moe, dense", [("small", "small-dense"), ("gpu-1b", "gpu-1b-dense")])
def test_moe_presets_match_their_dense_twins_in_active_params_up_to_the_router(moe, dense):
    sparse, dense = config.load(moe), config.load(dense)
    assert sparse.is_moe and not dense.is_moe
    m, e = sparse.model, sparse.moe
    router = m.n_layers * m.d_model * e.num_experts
    active = lambda c: param_counts(c).active_per_token  # noqa: E731
    assert active(sparse) - active(dense) == router


def test_load_defaults_to_small():
    assert config.load() == config.load("small")


# ---------------------------------------------------------------------------- overrides


def test_typed_overrides():
    cfg = config.load(
        "tiny",
        overrides={"moe.top_k": 1, "train.lr": 1e-3, "model.tie_embeddings": True},
    )
    assert cfg.moe.top_k == 1
    assert cfg.train.lr == 1e-3
    assert cfg.model.tie_embeddings is True


def test_int_override_for_a_float_field_becomes_float():
    cfg = config.load("tiny", overrides={"train.lr": 1})
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)


@pytest.mark.parametrize(
    "key, text, expected",
    [
        ("moe.top_k", "1", 1),
        ("train.lr", "0.001", 1e-3),
        ("train.lr", "1.0e-3", 1e-3),
        # The plain scientific notation people type on a command line. PyYAML's YAML 1.1
        # resolver reads "1e-3" (no dot, no sign rule) as a *string*, so this needs the
        # config loader's own number parsing.
        ("train.lr", "1e-3", 1e-3),
        ("train.lr", "3e-4", 3e-4),
        ("model.tie_embeddings", "true", True),
        ("model.tie_embeddings", "false", False),
        ("moe.router", "expert_choice", "expert_choice"),
        ("data.source", "123", "123"),  # a str field keeps the text as typed
    ],
)
def test_string_overrides_are_parsed_and_typed(key, text, expected):
    cfg = config.load("tiny", overrides={key: text})
    section, name = key.split(".")
    value = getattr(getattr(cfg, section), name)
    assert value == expected
    assert type(value) is type(expected)


def test_parse_overrides():
    assert config.parse_overrides(["moe.top_k=1"]) == {"moe.top_k": "1"}
    assert config.parse_overrides(["moe.top_k=1", "train.lr=0.01"]) == {
        "moe.top_k": "1",
        "train.lr": "0.01",
    }
    # Only the first '=' separates key and value.
    assert config.parse_overrides(["data.source=a=b"]) == {"data.source": "a=b"}
    assert config.parse_overrides([]) == {}


@pytest.mark.parametrize("pair", ["moe.top_k", "=1"])
def test_parse_overrides_rejects_a_malformed_pair(pair):
    with pytest.raises(config.ConfigError) as exc:
        config.parse_overrides([pair])
    assert "\n" not in str(exc.value)
    assert "key=value" in str(exc.value)


def test_replace_applies_overrides_and_validates():
    cfg = config.load("tiny")
    assert cfg.replace({"moe.top_k": 1}).moe.top_k == 1
    assert cfg.moe.top_k == 2  # frozen: replace returns a new Config
    with pytest.raises(config.ConfigError, match=r"^moe\.top_k: "):
        cfg.replace({"moe.top_k": 9})


# --------------------------------------------------------------------------- validation

# Every bad input names its key first, then the reason, on one line. Overrides apply to the
# `tiny` preset: d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, num_experts=4, top_k=2.
BAD_INPUTS = [
    # (overrides, key the message starts with, fragment of the reason)
    # -- names
    ({"model.foo": 1}, "model.foo", "unknown key"),
    ({"foo.bar": 1}, "foo", "unknown config section"),
    ({"moe": 1}, "moe", "keys are section.name"),
    ({"moe.top_k.x": 1}, "moe.top_k.x", "keys are section.name"),
    # -- types
    ({"model.d_model": "abc"}, "model.d_model", "expected an integer"),
    ({"model.d_model": 2.5}, "model.d_model", "expected an integer"),
    ({"model.d_model": "2.5"}, "model.d_model", "expected an integer"),
    ({"model.d_model": True}, "model.d_model", "expected an integer"),
    ({"model.d_model": "true"}, "model.d_model", "expected an integer"),
    ({"moe.top_k": ""}, "moe.top_k", "expected an integer"),
    ({"model.tie_embeddings": 1}, "model.tie_embeddings", "expected true or false"),
    ({"train.lr": "fast"}, "train.lr", "expected a number"),
    ({"train.lr": True}, "train.lr", "expected a number"),
    ({"train.lr": ".inf"}, "train.lr", "expected a finite number"),
    ({"data.source": 5}, "data.source", "expected a string"),
    # -- choices
    ({"moe.router": "random"}, "moe.router", "is not one of topk, expert_choice"),
    ({"moe.dispatch": "dense"}, "moe.dispatch", "is not one of dropless, capacity"),
    ({"train.dtype": "float16"}, "train.dtype", "is not one of float32, bfloat16"),
    ({"train.remat": "some"}, "train.remat", "is not one of none, full, dots"),
    ({"moe.pool": "shared"}, "moe.pool", "is not one of layer, global"),
    # -- sizes
    ({"model.d_model": 0}, "model.d_model", "must be positive"),
    ({"model.n_layers": -1}, "model.n_layers", "must be positive"),
    ({"model.n_heads": 0}, "model.n_heads", "must be positive"),
    ({"model.n_kv_heads": 0}, "model.n_kv_heads", "must be positive"),
    ({"model.vocab_size": 0}, "model.vocab_size", "must be positive"),
    ({"train.batch_size": 0}, "train.batch_size", "must be positive"),
    ({"train.steps": -5}, "train.steps", "must be positive"),
    ({"train.grad_accum": 0}, "train.grad_accum", "must be positive"),
    ({"train.seq_len": 1}, "train.seq_len", "must be >= 2"),
    ({"train.lr": 0}, "train.lr", "must be positive"),
    ({"train.seed": -1}, "train.seed", "must be in [0, 2**32 - 1], got -1"),
    ({"train.seed": 2**32}, "train.seed", "must be in [0, 2**32 - 1], got 4294967296"),
    ({"moe.num_experts": -1}, "moe.num_experts", "must be >= 0"),
    ({"moe.d_expert": 0}, "moe.d_expert", "must be positive"),
    ({"moe.top_k": 0}, "moe.top_k", "must be >= 1"),
    ({"moe.capacity_factor": 0}, "moe.capacity_factor", "must be positive"),
    ({"moe.capacity_factor": -1.5}, "moe.capacity_factor", "must be positive"),
    ({"data.val_fraction": 1.0}, "data.val_fraction", "must be in (0, 1)"),
    ({"data.val_fraction": 0}, "data.val_fraction", "must be in (0, 1)"),
    ({"data.source": ""}, "data.source", "must not be empty"),
    ({"mesh.data": 0}, "mesh.data", "must be >= 1 or -1"),
    # -- cross-field
    ({"moe.top_k": 5}, "moe.top_k", "exceeds moe.num_experts=4"),
    ({"model.d_model": 66}, "model.d_model", "not divisible by model.n_heads=4"),
    ({"model.d_model": 12}, "model.d_model", "must be even for rotary embeddings"),
    ({"model.n_kv_heads": 3}, "model.n_heads", "not divisible by model.n_kv_heads=3"),
    ({"model.n_kv_heads": 8}, "model.n_heads", "not divisible by model.n_kv_heads=8"),
    (
        {"train.batch_size": 6, "train.grad_accum": 4},
        "train.batch_size",
        "not divisible by train.grad_accum=4",
    ),
    ({"moe.every": 0}, "moe.every", "must be >= 1"),
    ({"moe.every": 3}, "moe.every", "is not a multiple of 3"),
    ({"moe.first_dense": 2}, "moe.first_dense", "must be in [0, model.n_layers=2)"),
    ({"model.share_layers": 3}, "model.share_layers", "model.n_layers=2 is not a multiple of 3"),
    ({"model.share_layers": -1}, "model.share_layers", "must be >= 0"),
    ({"mesh.fsdp": -1}, "mesh.fsdp", "only one axis may be -1"),
    ({"mesh.expert": 3}, "mesh.expert", "moe.num_experts=4 is not divisible by 3"),
    ({"mesh.tensor": 4}, "mesh.tensor", "model.n_kv_heads=2 is not divisible by 4"),
    # -- the Hugging Face families' features
    ({"model.head_dim": -1}, "model.head_dim", "must be >= 0 (0 = d_model / n_heads)"),
    ({"model.head_dim": 15}, "model.head_dim", "15 must be even for rotary embeddings"),
    ({"model.qk_norm": "layer"}, "model.qk_norm", "is not one of none, head, full"),
    ({"model.qkv_bias": "maybe"}, "model.qkv_bias", "expected true or false"),
    ({"model.rope_scaling": "yarn"}, "model.rope_scaling", "is not one of none, llama3"),
    (
        {"model.rope_scaling": "llama3", "model.rope_factor": 0.5},
        "model.rope_factor",
        "must be >= 1",
    ),
    (
        {"model.rope_scaling": "llama3", "model.rope_high_freq_factor": 1.0},
        "model.rope_high_freq_factor",
        "1.0 must exceed model.rope_low_freq_factor=1.0",
    ),
    (
        {"model.rope_scaling": "llama3", "model.rope_original_max_len": 0},
        "model.rope_original_max_len",
        "must be positive",
    ),
    ({"moe.shared_gate": True}, "moe.shared_gate", "is set but moe.num_shared=0"),
    ({"moe.d_shared": 32}, "moe.d_shared", "is set but moe.num_shared=0"),
    ({"moe.d_shared": -1, "moe.num_shared": 1}, "moe.d_shared", "must be >= 0 (0 = d_expert)"),
]


@pytest.mark.parametrize(
    "overrides, key, reason", BAD_INPUTS, ids=[repr(o)[1:-1] for o, _, _ in BAD_INPUTS]
)
def test_bad_input_names_its_key_on_one_line(overrides, key, reason):
    with pytest.raises(config.ConfigError) as exc:
        config.load("tiny", overrides=overrides)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: "), message
    assert reason in message, message


def test_largest_seed_is_accepted():
    assert config.load("tiny", {"train.seed": 2**32 - 1}).train.seed == 2**32 - 1


def test_integers_beyond_float_or_int_parsing_are_one_line(tmp_path):
    with pytest.raises(config.ConfigError) as exc:
        config.load("tiny", {"train.lr": 10**400})  # float() overflows
    assert (
        str(exc.value) == f"train.lr: expected a finite number, got {'1' + '0' * 17}...{'0' * 19}"
    )
    digits = "1" * 5000  # int() refuses strings of more than 4300 digits
    path = tmp_path / "c.yaml"
    path.write_text(f"model: {{d_model: {digits}}}\n")
    with pytest.raises(config.ConfigError, match=r"^config file .*: not valid YAML/TOML \(Exc"):
        config.load(path)
    with pytest.raises(config.ConfigError) as exc:
        config.load("tiny", {"model.d_model": digits})
    assert str(exc.value) == f"model.d_model: expected an integer, got '{'1' * 17}...{'1' * 18}'"


def test_moe_only_checks_are_skipped_for_a_dense_model():
    # top_k and capacity_factor mean nothing without experts.
    meaningless = {"moe.top_k": 9, "moe.capacity_factor": 0}
    cfg = config.load("tiny", overrides={"moe.num_experts": 0, **meaningless})
    assert (cfg.moe.top_k, cfg.moe.capacity_factor) == (9, 0.0)  # kept as given, unchecked
    with pytest.raises(config.ConfigError, match=r"^moe\.top_k: 9 exceeds"):
        config.load("tiny", overrides=meaningless)  # with experts, the same values are refused


# Token choice's routing options (tiny: 4 experts, top-2), each refused in one line.
ROUTING_BAD_INPUTS = [
    ({"moe.score": "relu"}, "moe.score", "is not one of softmax, sigmoid"),
    ({"moe.lb_scope": "token"}, "moe.lb_scope", "is not one of batch, sequence"),
    ({"moe.groups": 0}, "moe.groups", "must be >= 1"),
    ({"moe.groups": 3}, "moe.groups", "3 does not divide moe.num_experts=4"),
    ({"moe.groups": 2, "moe.topk_groups": 3}, "moe.topk_groups", "must be in [1, moe.groups=2]"),
    ({"moe.topk_groups": 0}, "moe.topk_groups", "must be in [1, moe.groups=1]"),
    (
        {"moe.groups": 4, "moe.topk_groups": 1},
        "moe.top_k",
        "2 exceeds the 1 experts of moe.topk_groups=1 groups of 1",
    ),
    ({"moe.bias_rate": -0.001}, "moe.bias_rate", "must be >= 0 (0 = no bias)"),
    ({"moe.route_scale": 0}, "moe.route_scale", "must be positive"),
    ({"moe.health_intervals": 0}, "moe.health_intervals", "must be >= 1"),
    *[
        ({"moe.router": "expert_choice", key: value}, key, "moe.router=topk only")
        for key, value in (
            ("moe.score", "sigmoid"),
            ("moe.groups", 2),
            ("moe.bias_rate", 0.001),
            ("moe.route_scale", 2.0),
            ("moe.lb_scope", "sequence"),
        )
    ],
]


@pytest.mark.parametrize(
    "overrides, key, reason",
    ROUTING_BAD_INPUTS,
    ids=[repr(o)[1:-1] for o, _, _ in ROUTING_BAD_INPUTS],
)
def test_bad_routing_option_names_its_key_on_one_line(overrides, key, reason):
    with pytest.raises(config.ConfigError) as exc:
        config.load("tiny", overrides=overrides)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{key}: "), message
    assert reason in message, message


def test_routing_options_from_the_command_line():
    cfg = config.load(
        "tiny",
        config.parse_overrides(
            [
                "moe.num_experts=8",
                "moe.score=sigmoid",
                "moe.groups=4",
                "moe.topk_groups=2",
                "moe.top_k=4",  # the 4 experts of the 2 groups
                "moe.bias_rate=1e-3",
                "moe.route_scale=2.5",
                "moe.lb_scope=sequence",
                "moe.health_intervals=3",
            ]
        ),
    )
    e = cfg.moe
    assert (e.score, e.groups, e.topk_groups, e.top_k) == ("sigmoid", 4, 2, 4)
    assert (e.bias_rate, e.route_scale, e.lb_scope, e.health_intervals) == (
        1e-3,
        2.5,
        "sequence",
        3,
    )


def test_a_config_written_before_the_routing_options_routes_as_it_did(tmp_path):
    path = tmp_path / "config.yaml"
    config.dump(config.load("tiny"), path)
    data = yaml.safe_load(path.read_text())
    for key in ("score", "groups", "topk_groups", "bias_rate", "route_scale", "lb_scope"):
        del data["moe"][key]
    path.write_text(yaml.safe_dump(data))
    e = config.load_stored(path).moe
    assert (e.score, e.groups, e.topk_groups, e.bias_rate, e.route_scale, e.lb_scope) == (
        "softmax",
        1,
        1,
        0.0,
        1.0,
        "batch",
    )


# -------------------------------------------------------------------------- layer kinds


def test_layer_plan_kinds_interleaved_after_first_dense():
    cfg = config.load("tiny", overrides={"model.n_layers": 5, "moe.every": 2, "moe.first_dense": 1})
    assert cfg.layer_plan().kinds() == ["dense", "dense", "moe", "dense", "moe"]


def test_layer_plan_kinds_all_moe_by_default():
    assert config.load("tiny").layer_plan().kinds() == ["moe", "moe"]


def test_layer_plan_kinds_dense_model():
    cfg = config.load("tiny", overrides={"moe.num_experts": 0, "model.n_layers": 3})
    assert cfg.layer_plan().kinds() == ["dense", "dense", "dense"]


# ------------------------------------------------------------------------- config files

YAML_TEXT = """\
model: {d_model: 64, n_layers: 2, n_heads: 4, n_kv_heads: 2, d_ff: 128, tie_embeddings: true}
moe:
  num_experts: 4
  top_k: 1
  router: expert_choice
train:
  steps: 7
  lr: 2.5e-3
data:
  source: corpus.txt
"""

TOML_TEXT = """\
[model]
d_model = 64
n_layers = 2
n_heads = 4
n_kv_heads = 2
d_ff = 128
tie_embeddings = true

[moe]
num_experts = 4
top_k = 1
router = "expert_choice"

[train]
steps = 7
lr = 2.5e-3

[data]
source = "corpus.txt"
"""


def test_yaml_and_toml_files_load_to_equal_configs(tmp_path):
    (tmp_path / "c.yaml").write_text(YAML_TEXT)
    (tmp_path / "c.toml").write_text(TOML_TEXT)
    from_yaml = config.load(tmp_path / "c.yaml")
    from_toml = config.load(str(tmp_path / "c.toml"))
    assert from_yaml == from_toml
    assert from_yaml.moe.router == "expert_choice"
    assert from_yaml.train.lr == 2.5e-3
    assert from_yaml.model.tie_embeddings is True
    assert from_yaml.train.batch_size == config.TrainConfig().batch_size  # unset: default


def test_yaml_file_with_exponent_without_dot(tmp_path):
    # `lr: 1e-3` is what people write; TOML reads it as a float, so YAML must too.
    (tmp_path / "c.yaml").write_text("train: {lr: 1e-3}\n")
    (tmp_path / "c.toml").write_text("[train]\nlr = 1e-3\n")
    assert config.load(tmp_path / "c.toml").train.lr == 1e-3
    assert config.load(tmp_path / "c.yaml").train.lr == 1e-3


def test_file_then_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text(YAML_TEXT)
    cfg = config.load(tmp_path / "c.yaml", overrides={"moe.top_k": "2", "train.steps": 9})
    assert (cfg.moe.top_k, cfg.train.steps) == (2, 9)


def test_empty_yaml_file_gives_the_defaults(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert config.load(tmp_path / "empty.yaml") == config.Config()


def test_yaml_python_object_tag_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    with pytest.raises(config.ConfigError) as exc:
        config.load(path)
    assert not marker.exists()
    assert "\n" not in str(exc.value)
    assert str(exc.value).startswith(f"config file {path}: ")


@pytest.mark.parametrize(
    "name, text",
    [
        ("broken.yaml", "model: [unclosed\n"),
        ("broken.toml", "[model\nd_model = 64\n"),
        ("broken.toml", "model: [unclosed\n"),
    ],
)
def test_unparseable_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(path)
    assert "\n" not in str(exc.value)
    assert "not valid YAML/TOML" in str(exc.value)


@pytest.mark.parametrize(
    "text, key",
    [
        ("- a\n- b\n", "config file"),  # not a mapping at all
        ("model: 5\n", "model"),  # a section that is not a mapping
        ("model: {d_model: abc}\n", "model.d_model"),
        ("widgets: {n: 1}\n", "widgets"),
    ],
)
def test_file_with_bad_structure(tmp_path, text, key):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(path)
    assert "\n" not in str(exc.value)
    assert str(exc.value).startswith(key), str(exc.value)


@pytest.mark.parametrize(
    "name, text, reason",
    [
        ("c.yaml", "model: {d_model: 64, d_model: 128}\n", "duplicate key 'd_model' at line 1"),
        (
            "c.yaml",
            "model:\n  d_model: 64\n  n_layers: 2\n  d_model: 128\n",
            "duplicate key 'd_model' at line 4",
        ),
        (
            "c.yaml",
            "model: {d_model: 64}\ntrain: {lr: 1e-3}\nmodel: {n_layers: 2}\n",
            "duplicate key 'model' at line 3",
        ),
        (
            "c.toml",
            "[model]\nd_model = 64\nd_model = 128\n",
            "Cannot overwrite a value (at line 3, column 14)",
        ),
        (
            "c.toml",
            "[model]\nd_model = 64\n[model]\nn_layers = 2\n",
            "Cannot declare ('model',) twice (at line 3, column 7)",
        ),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path, name, text, reason):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(config.ConfigError) as exc:
        config.load(path)
    assert str(exc.value) == f"config file {path}: not valid YAML/TOML ({reason})"


def test_yaml_merge_key_may_be_overridden(tmp_path):
    # `<<` merges a mapping whose keys the section may then set: not a duplicate.
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  <<: {d_model: 128, n_layers: 3}\n  d_model: 64\n")
    assert (config.load(path).model.d_model, config.load(path).model.n_layers) == (64, 3)


def _alias_bomb(value_line: str) -> str:
    """YAML whose last alias expands to 9**9 strings ("billion laughs") in `value_line`."""
    lines = ["a: &a [" + ",".join(['"x"'] * 9) + "]"]
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join([*lines, value_line]) + "\n"


# reprlib's view of a nested list: 4 elements of 2 levels
_LEVEL_2 = "[" + ", ".join(["[...]"] * 4) + ", ...]"
_BOMB_SHOWN = "[" + ", ".join([_LEVEL_2] * 4) + ", ...]"


@pytest.mark.parametrize(
    "value_line, message",
    [
        ("model: {d_model: *i}", f"model.d_model: expected an integer, got {_BOMB_SHOWN}"),
        ("moe: {router: *i}", f"moe.router: {_BOMB_SHOWN} is not one of topk, expert_choice"),
        ("model: *i", f"model: expected a section (mapping), got {_BOMB_SHOWN}"),
    ],
    ids=["int", "choice", "section"],
)
def test_alias_bomb_is_parsed_fast_and_shown_short(tmp_path, value_line, message):
    """repr() of the whole value would run for a minute and print 2 GB: in a process of its
    own, with a deadline, so a regression fails instead of hanging the test session."""
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(value_line))
    code = (
        "import sys\nfrom sparsemodel import config\n"
        "try:\n    config.load(sys.argv[1])\nexcept config.ConfigError as e:\n    print(e)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=20
    )
    assert done.stdout.splitlines() == [message]


@pytest.mark.parametrize("name", ["missing.yaml", "missing.toml", "missing.yml"])
def test_missing_file(tmp_path, name):
    with pytest.raises(config.ConfigError) as exc:
        config.load(tmp_path / name)
    assert "\n" not in str(exc.value)
    assert "no such file" in str(exc.value)


def test_unknown_preset_lists_the_presets():
    with pytest.raises(config.ConfigError) as exc:
        config.load("no-such-preset")
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith("--config no-such-preset: ")
    for name in PRESETS:
        assert name in message


@pytest.mark.parametrize("name", PRESETS)
def test_dump_then_load_round_trips(tmp_path, name):
    cfg = config.load(name, overrides={"train.lr": 1.5e-05, "model.norm_eps": 1e-06})
    path = tmp_path / "config.yaml"
    config.dump(cfg, path)
    assert config.load(path) == cfg
    assert config.load_stored(path) == cfg  # a key the file holds is kept


def test_dump_round_trips_non_default_choices(tmp_path):
    cfg = config.load(
        "tiny",
        overrides={
            "moe.router": "expert_choice",
            "moe.dispatch": "capacity",
            "moe.capacity_group": "batch",
            "train.dtype": "bfloat16",
            "model.tie_embeddings": True,
            "data.source": "true",  # a string that YAML would read as a bool if unquoted
            "mesh.data": 1,
            "mesh.expert": -1,
            "model.head_dim": 24,
            "model.qkv_bias": True,
            "model.qk_norm": "head",
            "model.rope_scaling": "llama3",
            "moe.num_shared": 1,
            "moe.d_shared": 40,
            "moe.shared_gate": True,
        },
    )
    path = tmp_path / "config.yaml"
    config.dump(cfg, path)
    assert config.load(path) == cfg


def test_head_dim_frees_d_model_from_the_head_count():
    """model.head_dim sets each head's width (Qwen3: 32 heads of 128 on d_model 2048), so
    d_model need not divide into the heads."""
    cfg = config.load("tiny", {"model.d_model": 66, "model.head_dim": 16})
    assert cfg.model.d_head == 16
    assert config.load("tiny").model.d_head == 64 // 4


# ------------------------------------------------- workdirs written before a key existed


def write_legacy_config(path, **overrides):
    """A workdir's config.yaml as written before moe.capacity_group existed."""
    config.dump(config.load("tiny", {"moe.dispatch": "capacity", **overrides}), path)
    data = yaml.safe_load(path.read_text())
    del data["moe"]["capacity_group"]
    path.write_text(yaml.safe_dump(data))


def test_stored_config_without_capacity_group_keeps_batch(tmp_path):
    path = tmp_path / "config.yaml"
    write_legacy_config(path)
    stored = config.load_stored(path)
    assert stored.moe.capacity_group == "batch"  # what the workdir was trained with
    assert config.load(path).moe.capacity_group == "sequence"  # as a new config: the default
    assert stored.replace({"moe.capacity_group": "sequence"}) == config.load(path)  # the rest
    resumed = config.load_stored(path, {"moe.capacity_group": "sequence"})
    assert resumed.moe.capacity_group == "sequence"  # an explicit override wins
    (tmp_path / "dense.yaml").write_text("model: {d_model: 64}\n")  # no moe section at all
    assert config.load_stored(tmp_path / "dense.yaml").moe.capacity_group == "batch"


def test_cli_resumes_a_workdir_without_capacity_group_with_batch(tmp_path, monkeypatch):
    workdir = tmp_path / "w"
    workdir.mkdir()
    write_legacy_config(workdir / "config.yaml")
    given = []

    class Stop(Exception):
        pass

    def run(cfg, workdir, stop_after=None):
        given.append(cfg)
        raise Stop

    monkeypatch.setattr(train, "run", run)
    with pytest.raises(Stop):
        cli.main(["train", "--workdir", str(workdir)])
    assert given[0].moe.capacity_group == "batch"
    assert given[0] == config.load_stored(workdir / "config.yaml")


# ------------------------------------------------------------------- checkpoint shapes


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"moe.num_experts": 8}, "moe.num_experts=8 (checkpoint: 4)"),
        ({"model.d_model": 128}, "model.d_model=128 (checkpoint: 64)"),
        ({"model.tie_embeddings": True}, "model.tie_embeddings=True (checkpoint: False)"),
        ({"model.head_dim": 24}, "model.head_dim=24 (checkpoint: 0)"),
        ({"model.qk_norm": "full"}, "model.qk_norm=full (checkpoint: none)"),
        ({"model.qkv_bias": True}, "model.qkv_bias=True (checkpoint: False)"),
        (
            {"moe.num_shared": 1, "moe.d_shared": 8, "moe.shared_gate": True},
            "moe.num_shared=1 (checkpoint: 0), moe.d_shared=8 (checkpoint: 0), "
            "moe.shared_gate=True (checkpoint: False)",
        ),
        ({"moe.pool": "global"}, "moe.pool=global (checkpoint: layer)"),
        (
            {"moe.d_expert": 32, "model.vocab_size": 300},
            "model.vocab_size=300 (checkpoint: 256), moe.d_expert=32 (checkpoint: 64)",
        ),
    ],
)
def test_model_record_check_names_every_differing_key(overrides, named):
    record = config.model_record(config.load("tiny"))
    new = config.load("tiny", overrides=overrides)
    with pytest.raises(config.ConfigError) as exc:
        config.check_model_record(record, new, "checkpoint step 2")
    expected = f"checkpoint step 2 holds another model than the config: {named} ("
    assert str(exc.value).startswith(expected)


def test_model_record_check_allows_training_changes():
    record = config.model_record(config.load("tiny"))
    new = config.load(
        "tiny",
        overrides={
            "train.lr": 1e-4,
            "train.steps": 1000,
            "train.seed": 3,
            "train.batch_size": 4,
            "train.seq_len": 16,
            "train.dtype": "bfloat16",
        },
    )
    assert config.model_record(new) == record  # training keys are not in the record ...
    config.check_model_record(record, new, "step 2")  # ... so the check lets them through
    with pytest.raises(config.ConfigError):  # the same record does catch a shape change
        config.check_model_record(record, new.replace({"model.d_model": 32}), "step 2")


# ----------------------------------------------------------------------- CLI error path


# Every jit lowering, cache hit or not, emits this event: the test below counts them.
LOWERINGS: list[float] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda event, secs, **_: (
        LOWERINGS.append(secs)
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration"
        else None
    )
)


@pytest.mark.parametrize(
    "set_args, prefix",
    [
        (["moe.top_k=9"], "sparsemodel: error: moe.top_k: "),
        (["model.foo=1"], "sparsemodel: error: model.foo: "),
        (["moe.top_k"], "sparsemodel: error: --set 'moe.top_k': "),
        (["model.d_model=abc"], "sparsemodel: error: model.d_model: "),
    ],
)
def test_cli_config_error_is_one_line_and_exit_2(tmp_path, capsys, set_args, prefix):
    workdir = tmp_path / "w"
    argv = ["train", "--config", "tiny", "--workdir", str(workdir), "--set", *set_args]
    lowered = len(LOWERINGS)
    rc = cli.main(argv)
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith(prefix), err
    assert len(LOWERINGS) == lowered, "the error should come before any compilation"
    assert not workdir.exists()


def test_cli_refuses_tokamax_when_it_is_not_installed(tmp_path, capsys, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "tokamax" else find_spec(name, *args),
    )
    workdir = tmp_path / "w"
    argv = ["train", "--config", "tiny", "--workdir", str(workdir)]
    lowered = len(LOWERINGS)
    rc = cli.main([*argv, "--set", "moe.grouped_matmul=tokamax"])
    out, err = capsys.readouterr()
    assert rc == 2
    assert out == ""
    assert err.splitlines() == [
        "sparsemodel: error: moe.grouped_matmul: tokamax is not installed "
        "(install the tokamax extra: pip install -e '.[tokamax]')"
    ]
    assert len(LOWERINGS) == lowered, "the error should come before any compilation"
    assert not workdir.exists()


def test_cli_unknown_preset(tmp_path, capsys):
    rc = cli.main(["train", "--config", "nope", "--workdir", str(tmp_path / "w")])
    out, err = capsys.readouterr()
    assert rc == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("sparsemodel: error: --config nope: ")

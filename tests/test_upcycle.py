"""Upcycling a dense model into an MoE: copy reproduces the dense logits, granular slices
reproduce the dense MLP, drop re-draws the right units, and bad input is one line.

Dense models are the tiny preset without experts (d_model 64, d_ff 128, 2 layers), with
weights drawn large (test_model.make_lm) so that logits differ from token to token.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_model import make_lm, random_tokens

from sparsemodel import cli, config, model, train, upcycle

DENSE = {"moe.num_experts": 0}


def dense_lm(**overrides) -> model.Transformer:
    return make_lm(**DENSE, **overrides)


def host_params(lm) -> dict:
    return jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(lm, nnx.Param)))


def upcycled_lm(dense: model.Transformer, method: str, overrides: dict, **recipe):
    """The MoE model upcycled from `dense` in memory: (model, its config)."""
    cfg = upcycle.upcycled_config(dense.cfg, method, overrides, "the dense model")
    params = upcycle.upcycle_params(
        cfg, host_params(dense), upcycle.make_recipe(cfg, method, **recipe)
    )
    graphdef, state = nnx.split(
        nnx.eval_shape(lambda: model.Transformer.from_config(cfg, rngs=nnx.Rngs(0)))
    )
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state), cfg


@nnx.jit
def forward(lm, tokens):
    return lm(tokens)


# ----------------------------------------------------------------------------- copy


@pytest.mark.parametrize(
    "layers",
    [
        pytest.param({}, id="every_layer"),
        pytest.param({"model.n_layers": 4, "model.share_layers": 2}, id="share_layers"),
        pytest.param({"model.n_layers": 4, "moe.every": 2}, id="every_2", marks=pytest.mark.slow),
        pytest.param(
            {"model.n_layers": 3, "moe.first_dense": 1}, id="first_dense", marks=pytest.mark.slow
        ),
    ],
)
def test_copy_upcycled_logits_equal_the_dense_models(layers):
    dense_overrides = {k: v for k, v in layers.items() if k.startswith("model.")}
    dense = dense_lm(**dense_overrides)
    moe_overrides = {"moe.num_experts": 6, "moe.top_k": 2, **layers}
    # A large router: tokens spread over the experts, with far from equal weights.
    moe, cfg = upcycled_lm(dense, "copy", moe_overrides, drop=None, router_std=1.0, seed=0)
    assert cfg.moe.d_expert == cfg.model.d_ff and cfg.moe.dispatch == "dropless"
    tokens = random_tokens(4, 10)
    want, _ = forward(dense, tokens)
    got, stats = forward(moe, tokens)
    assert float(np.asarray(stats.load).max()) < 0.6  # not one expert for every token
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


def test_copy_keeps_everything_but_the_mlps_and_draws_routers_at_router_std():
    dense = dense_lm()
    moe, cfg = upcycled_lm(dense, "copy", {}, drop=None, router_std=0.3, seed=1)
    assert cfg.moe.num_experts == upcycle.COPIES
    ours = nnx.to_pure_dict(nnx.state(moe, nnx.Param))
    theirs = host_params(dense)
    for name in ("embed", "final_norm", "unembed"):
        jax.tree.map(np.testing.assert_array_equal, ours[name], theirs[name])
    ffn, mlp = ours["units"]["blocks"][0].pop("ffn"), theirs["units"]["blocks"][0].pop("ffn")
    jax.tree.map(np.testing.assert_array_equal, ours["units"], theirs["units"])
    for e in range(cfg.moe.num_experts):
        np.testing.assert_array_equal(ffn["w_gate_up"][:, e, :, 0], mlp["w_gate"])
        np.testing.assert_array_equal(ffn["w_gate_up"][:, e, :, 1], mlp["w_up"])
        np.testing.assert_array_equal(ffn["w_down"][:, e], mlp["w_down"])
    router = np.asarray(ffn["w_router"])
    assert router.shape == (2, 64, upcycle.COPIES)
    assert abs(router.std() - 0.3) < 0.03 and abs(router.mean()) < 0.03


# ------------------------------------------------------------------------- granular


@pytest.mark.parametrize("n_slices, copies", [(4, 2), (2, 3)])
def test_one_copy_of_every_slice_with_equal_weights_is_the_dense_mlp(n_slices, copies):
    rng = np.random.default_rng(0)
    d, f, n = 16, 24, 2
    mlp = {
        "w_gate": rng.normal(size=(n, d, f)),
        "w_up": rng.normal(size=(n, d, f)),
        "w_down": rng.normal(size=(n, f, d)),
    }
    gate_up, down = upcycle.slice_experts(mlp, n_slices, copies)
    assert gate_up.shape == (n, n_slices * copies, d, 2, f // n_slices)
    x = rng.normal(size=(5, d))
    silu = lambda h: h / (1 + np.exp(-h))  # noqa: E731

    def swiglu(w_gate, w_up, w_down):
        return (silu(x @ w_gate.astype(np.float64)) * (x @ w_up)) @ w_down.astype(np.float64)

    for layer in range(n):
        want = swiglu(mlp["w_gate"][layer], mlp["w_up"][layer], mlp["w_down"][layer])
        chosen = rng.integers(0, copies, n_slices) * n_slices + np.arange(n_slices)
        got = sum(
            swiglu(gate_up[layer, e, :, 0], gate_up[layer, e, :, 1], down[layer, e]) / n_slices
            for e in chosen
        )
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_granular_with_a_uniform_router_reproduces_the_dense_logits():
    # A zero router gives every expert the same probability: top-k takes experts 0..G-1,
    # copy 0 of each slice, each with weight 1/G.
    dense = dense_lm()
    moe, cfg = upcycled_lm(
        dense, "granular", {"moe.d_expert": 32}, drop=None, router_std=0.0, seed=0
    )
    assert (cfg.moe.top_k, cfg.moe.num_experts) == (4, 4 * upcycle.COPIES)
    tokens = random_tokens(4, 10)
    want, _ = forward(dense, tokens)
    got, _ = forward(moe, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- drop


def test_drop_redraws_a_fraction_of_each_experts_units_from_the_dense_statistics():
    dense = dense_lm()
    cfg = upcycle.upcycled_config(dense.cfg, "drop", {"moe.num_experts": 6}, "the dense model")
    mlp = host_params(dense)["units"]["blocks"][0]["ffn"]
    recipe = upcycle.make_recipe(cfg, "drop", 0.25, None, 3)
    ffn = upcycle.upcycle_params(cfg, host_params(dense), recipe)["units"]["blocks"][0]["ffn"]
    f = cfg.model.d_ff  # 128: 32 units re-drawn per expert
    drawn_sets = set()
    for layer in range(2):
        for e in range(6):
            gate_up, down = ffn["w_gate_up"][layer, e], ffn["w_down"][layer, e]
            differ = [
                np.flatnonzero((gate_up[:, 0] != mlp["w_gate"][layer]).any(0)),
                np.flatnonzero((gate_up[:, 1] != mlp["w_up"][layer]).any(0)),
                np.flatnonzero((down != mlp["w_down"][layer]).any(1)),
            ]
            assert len(differ[0]) == f // 4
            np.testing.assert_array_equal(differ[1], differ[0])  # whole units: gate, up, down
            np.testing.assert_array_equal(differ[2], differ[0])
            drawn_sets.add(tuple(differ[0]))
            for j, name in ((0, "w_gate"), (1, "w_up")):  # drawn at the dense weight's scale
                drawn, dense_w = gate_up[:, j][:, differ[0]], mlp[name][layer]
                assert abs(drawn.std() / dense_w.std() - 1) < 0.15, name
    assert len(drawn_sets) == 12  # a new draw for every expert of every layer
    again = upcycle.upcycle_params(cfg, host_params(dense), recipe)["units"]["blocks"][0]["ffn"]
    np.testing.assert_array_equal(again["w_gate_up"], ffn["w_gate_up"])  # seeded


# ---------------------------------------------------------------------- the command


def dense_workdir(path, **overrides):
    """A workdir holding a dense config.yaml only (what the refusals read first)."""
    path.mkdir()
    config.dump(config.load("tiny", {**DENSE, **overrides}), path / "config.yaml")
    return path


REFUSALS = [
    # (arguments after --from DENSE --workdir NEW, fragment of the one line)
    ([], "holds no checkpoint yet"),
    (["--method", "granular"], "--method granular: give the slice width"),
    (["--method", "granular", "--set", "moe.d_expert=48"], "48 does not divide model.d_ff=128"),
    (["--method", "granular", "--set", "moe.d_expert=32", "moe.top_k=2"], "moe.top_k: 2, but"),
    (
        ["--method", "granular", "--set", "moe.d_expert=32", "moe.num_experts=6"],
        "moe.num_experts: 6 is not a multiple of the 4 slices",
    ),
    (["--set", "moe.d_expert=64"], "moe.d_expert: 64, but --method copy makes every expert"),
    (["--method", "drop", "--drop", "0"], "--drop: must be in (0, 1], got 0.0"),
    (["--method", "drop", "--drop", "1.5"], "--drop: must be in (0, 1], got 1.5"),
    (["--method", "drop", "--drop", "0.001"], "re-initialises none of the 128"),
    (["--drop", "0.5"], "--drop: only --method drop re-initialises units (not copy)"),
    (["--set", "moe.num_shared=1"], "moe.num_shared: 1, but upcycling makes routed experts"),
    (["--set", "moe.pool=global"], "moe.pool: global, but upcycling makes each layer's"),
    (["--set", "model.d_model=128"], "model.d_model: 128, but upcycling keeps the dense"),
    (["--set", "moe.num_experts=0"], "moe.num_experts: must be >= 1 to upcycle"),
    (["--set", "moe.top_k=9"], "moe.top_k: 9 exceeds moe.num_experts=8"),
    (["--router-std", "-1"], "--router-std: must be finite and >= 0"),
]


@pytest.mark.parametrize("args, message", REFUSALS, ids=[" ".join(a) for a, _ in REFUSALS])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, args, message):
    src = dense_workdir(tmp_path / "dense")
    argv = ["upcycle", "--from", str(src), "--workdir", str(tmp_path / "moe"), *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sparsemodel: error: ") and message in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dense"]


def test_the_source_must_be_a_dense_workdir_and_the_target_new(tmp_path, capsys):
    moe_src = tmp_path / "moe_src"
    moe_src.mkdir()
    config.dump(config.load("tiny"), moe_src / "config.yaml")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    dense = dense_workdir(tmp_path / "dense")
    cases = [
        (tmp_path / "nowhere", tmp_path / "new", "nowhere: not a directory"),
        (moe_src, tmp_path / "new", "holds an MoE model (moe.num_experts=4)"),
        (dense, taken, "already holds files (use a new directory)"),
    ]
    for src, dest, message in cases:
        assert cli.main(["upcycle", "--from", str(src), "--workdir", str(dest)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    assert (taken / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "new").exists()


SHORT = {"train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2}


@pytest.fixture(scope="module")
def trained_dense(tmp_path_factory):
    """A dense tiny workdir trained for two steps (shared by the tests that upcycle it)."""
    workdir = tmp_path_factory.mktemp("upcycle") / "dense"
    train.run(config.load("tiny", {**DENSE, **SHORT}), workdir, log=lambda s: None)
    return workdir


@pytest.mark.slow
@pytest.mark.parametrize("method", ["copy", "granular"])
def test_upcycle_command_reports_both_losses_and_the_workdir_trains(
    trained_dense, tmp_path, capsys, method
):
    extra = ["--set", "moe.d_expert=32"] if method == "granular" else []
    argv = ["upcycle", "--from", str(trained_dense), "--workdir", str(tmp_path / "moe")]
    assert cli.main([*argv, "--method", method, "--max-tokens", "2048", *extra]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "routers N(0, 0.02^2)" in out[0], out
    line = out[-1].split("dense ")[1]  # "X, upcycled Y (difference Z)"
    dense_loss, rest = line.split(", upcycled ")
    upcycled_loss, difference = rest.rstrip(")").split(" (difference ")
    assert float(difference) == pytest.approx(float(upcycled_loss) - float(dense_loss), abs=1e-4)
    if method == "copy":
        assert abs(float(difference)) < 1e-4, out
    else:
        assert 0 < abs(float(difference)) < 0.05, out  # the router's weights are not 1/G

    cfg = config.load_stored(tmp_path / "moe" / "config.yaml")
    assert cfg.is_moe and (cfg.moe.top_k == 4) == (method == "granular")
    result = train.run(cfg.replace(SHORT), tmp_path / "moe", log=lambda s: None)
    lines = (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]  # from step 0, a fresh optimizer
    assert np.isfinite(result.train_loss)

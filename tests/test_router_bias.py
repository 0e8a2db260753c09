"""DeepSeek-V3 routing trained end to end on the tiny preset: the balancing bias moves by
the step's loads, is logged, checkpointed, resumed exactly and restored by eval and
generate; a collapsed router is reported by the routing health check.

Each test trains (tens of seconds on two cores): all are marked slow.
"""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_train import read_scalars

from sparsemodel import cli, config, evaluate, initialize, sharding, train
from sparsemodel.checkpoint import Checkpointer
from sparsemodel.config import ConfigError

pytestmark = pytest.mark.slow

RATE = 0.01
DEEPSEEK = {  # every routing option at once, through the command line's --set
    "moe.num_experts": 8,
    "moe.score": "sigmoid",
    "moe.groups": 4,
    "moe.topk_groups": 2,
    "moe.bias_rate": RATE,
    "moe.route_scale": 2.0,
    "moe.lb_scope": "sequence",
    "train.steps": 6,
    "train.checkpoint_every": 3,
    "train.eval_every": 1000,
    "train.log_every": 2,
}


def records(workdir) -> list[dict]:
    return [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def bias_of(state) -> np.ndarray:
    """The model's router bias [U, E] (the tiny preset's one scanned unit: U = 2 layers)."""
    return np.asarray(state["units"]["blocks"][0]["ffn"]["router_bias"][...])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir trained by `sparsemodel train --config tiny --set <DEEPSEEK>`."""
    workdir = tmp_path_factory.mktemp("deepseek")
    settings = [f"{k}={v}" for k, v in DEEPSEEK.items()]
    assert (
        cli.main(["train", "--config", "tiny", "--workdir", str(workdir), "--set", *settings]) == 0
    )
    return workdir


def test_bias_follows_the_load_every_step(trained):
    lines = records(trained)
    assert [r["step"] for r in lines] == list(range(1, 7))
    previous = np.zeros((2, 8), np.float32)
    for r in lines:
        load, bias = np.asarray(r["load"], np.float32), np.asarray(r["router_bias"], np.float32)
        step = np.float32(RATE) * np.sign(np.float32(1 / 8) - load)  # mean load - load
        np.testing.assert_array_equal(bias, previous + step, err_msg=f"step {r['step']}")
        previous = bias
    assert np.abs(previous).max() > 0
    # The health counts come at the end of each log interval (train.log_every = 2).
    assert [("dead_experts" in r, "overloaded_experts" in r) for r in lines] == [
        (s % 2 == 0, s % 2 == 0) for s in range(1, 7)
    ]

    # TensorBoard: the bias of every layer and expert, and the health counts.
    events = read_scalars(trained)
    for i in range(2):
        for j in range(8):
            bias_tb = events[f"experts/layer{i}/bias_e{j}"]
            assert bias_tb == pytest.approx({r["step"]: r["router_bias"][i][j] for r in lines})
        assert set(events[f"experts/layer{i}/dead"]) == {2, 4, 6}
        assert set(events[f"experts/layer{i}/overloaded"]) == {2, 4, 6}


def test_resumed_run_continues_exactly_with_the_bias(trained, tmp_path):
    cfg = config.load("tiny", DEEPSEEK)
    half = train.run(cfg, tmp_path, stop_after=3, log=lambda s: None)
    assert half.step == 3
    train.run(cfg, tmp_path, log=lambda s: None)
    for whole, resumed in zip(records(trained), records(tmp_path), strict=True):
        for key in ("step", "loss", "lb_loss", "router_bias", "load"):
            assert whole[key] == resumed[key], key  # bit-exact
    a, b = evaluate.restore(trained), evaluate.restore(tmp_path)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_eval_and_generate_route_with_the_restored_bias(trained):
    r = evaluate.restore(trained)
    bias = bias_of(r.params)
    np.testing.assert_array_equal(bias, np.asarray(records(trained)[-1]["router_bias"], np.float32))
    assert np.abs(bias).max() > 0
    np.testing.assert_array_equal(bias_of(nnx.state(r.model())), bias)  # what generate runs

    with_bias = evaluate.evaluate(r, max_tokens=2048)
    unbiased = jax.tree.map(lambda x: x, r.params)
    ffn = unbiased["units"]["blocks"][0]["ffn"]
    ffn["router_bias"] = ffn["router_bias"].replace(jnp.zeros_like(ffn["router_bias"][...]))
    r_unbiased = evaluate.Restored(r.cfg, r.step, r.graphdef, unbiased, r.mesh, r.workdir)
    without = evaluate.evaluate(r_unbiased, max_tokens=2048)
    assert with_bias.loss != without.loss, "the bias must change which experts run"

    text = evaluate.generate(r, "def ", max_new_tokens=8, temperature=0.0)
    assert isinstance(text, str) and text


def test_resume_refuses_to_drop_or_add_the_bias(trained, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    without = config.load("tiny", {**DEEPSEEK, "moe.bias_rate": 0.0})
    with pytest.raises(ConfigError, match="holds a router bias: it was trained with moe.bias"):
        train.run(without, workdir, log=lambda s: None)

    # A step 0 of the model without the bias, then the config with it.
    unbiased = tmp_path / "unbiased"
    unbiased.mkdir()
    _, state = initialize.init_params(without, sharding.make_mesh(without.mesh), 0)
    ckpt = Checkpointer(unbiased, async_save=False)
    ckpt.save(0, state, None, {"step": 0, "model": config.model_record(without)})
    ckpt.close()
    with pytest.raises(ConfigError, match="holds no router bias: it was trained with moe.bias"):
        train.run(config.load("tiny", DEEPSEEK), unbiased, log=lambda s: None)


def test_a_collapsed_router_is_reported(tmp_path, capsys):
    # One byte repeated: every position holds the same vector, so every token makes the same
    # choice and one expert takes all the load (4x balanced) while the other three starve.
    text = tmp_path / "a.txt"
    text.write_text("a" * 20_000)
    cfg = config.load(
        "tiny",
        {
            "data.source": str(text),
            "moe.top_k": 1,
            "moe.health_intervals": 2,
            "train.steps": 4,
            "train.log_every": 1,
            "train.eval_every": 1000,
            "train.checkpoint_every": 1000,
        },
    )
    train.run(cfg, tmp_path / "w", log=lambda s: None)
    lines = records(tmp_path / "w")
    assert [r["dead_experts"] for r in lines] == [[3, 3]] * 4
    assert [r["overloaded_experts"] for r in lines] == [[1, 1]] * 4
    warnings = [x for x in capsys.readouterr().err.splitlines() if x.startswith("warning:")]
    assert [w.split(":")[1].strip() for w in warnings] == ["step 2", "step 4"]
    assert (
        "layer 0: 3 dead, 1 overloaded (2 intervals); layer 1: 3 dead, 1 overloaded" in warnings[0]
    )

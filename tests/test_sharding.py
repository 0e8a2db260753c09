"""Sharded training: the same numbers on any mesh, multi-process, resharding checkpoints.

Each test starts subprocesses (tests/multidevice.py) with fake CPU devices, because JAX
fixes the device count when it starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from cli_commands import train_tiny

from sparsemodel import config, sharding
from sparsemodel.config import ConfigError, MeshConfig

WORKER = Path(__file__).parent / "multidevice.py"
ROOT = Path(__file__).parent.parent


def env_with(devices: int) -> dict:
    """Fake CPU devices, also on a machine with one GPU (which would be the default)."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def worker(command: str, devices: int, **kwargs) -> dict:
    out = subprocess.run(
        [sys.executable, str(WORKER), command, json.dumps(kwargs)],
        env=env_with(devices),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def close(a, b, rtol=1e-4):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=0)


# Routing settings, each trained on one device and on meshes (tiny: 4 experts, top-2).
ROUTING = {
    "dropless": {},
    # Drops assignments; capacity per sequence (the default group) sees the same groups on
    # any mesh, because the batch is split by whole sequences.
    "capacity": {"moe.dispatch": "capacity", "moe.capacity_factor": 1.0},
    # Picks among the tokens of an expert group: those of one device only when mesh.expert
    # covers every batch shard (data = fsdp = 1), as on its mesh below.
    "expert_choice": {"moe.router": "expert_choice"},
    # One pool of 8 experts that both layers route into (moe.pool=global), sharded over
    # `expert` like a layer's own; with capacity, and its layers shared (two passes).
    "pool": {"moe.pool": "global", "moe.num_experts": 8},
    "pool_capacity_shared": {
        "moe.pool": "global",
        "moe.num_experts": 8,
        "moe.dispatch": "capacity",
        "moe.capacity_factor": 1.0,
        "model.n_layers": 4,
        "model.share_layers": 2,
    },
    # DeepSeek-V3's routing: its balancing bias moves by the global batch's loads, so it is
    # the same after every step on any mesh.
    "deepseek": {
        "moe.num_experts": 8,
        "moe.score": "sigmoid",
        "moe.groups": 4,
        "moe.topk_groups": 2,
        "moe.bias_rate": 0.01,
        "moe.route_scale": 2.0,
        "moe.lb_scope": "sequence",
    },
}

MESHES = {  # name: (routing, mesh)
    "data8": ("dropless", {"mesh.data": 8}),
    "data2_expert4": ("dropless", {"mesh.data": 2, "mesh.expert": 4}),
    "fsdp2_expert2_tensor2": (
        "dropless",
        {"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 2, "mesh.tensor": 2},
    ),
    # The GPU grouped matmul, here on fake CPU devices, against the CPU loop on one device.
    "data2_expert4_batched": (
        "dropless",
        {"mesh.data": 2, "mesh.expert": 4, "moe.grouped_matmul": "batched"},
    ),
    # One sequence per device, gathered in pairs by the expert axis.
    "capacity_data2_fsdp2_expert2": (
        "capacity",
        {"mesh.data": 2, "mesh.fsdp": 2, "mesh.expert": 2},
    ),
    "expert_choice_expert4_tensor2": (
        "expert_choice",
        {"mesh.data": 1, "mesh.expert": 4, "mesh.tensor": 2},
    ),
    "pool_data2_expert4": ("pool", {"mesh.data": 2, "mesh.expert": 4}),
    "pool_capacity_shared_fsdp2_expert2_tensor2": (
        "pool_capacity_shared",
        {"mesh.data": 1, "mesh.fsdp": 2, "mesh.expert": 2, "mesh.tensor": 2},
    ),
    "deepseek_data2_expert4": ("deepseek", {"mesh.data": 2, "mesh.expert": 4}),
}


# The meshes in three groups of about equal cost, so that test workers share them out.
MESH_GROUPS = {
    "dropless": ["data8", "data2_expert4", "fsdp2_expert2_tensor2", "data2_expert4_batched"],
    "capacity_and_expert_choice": [
        "capacity_data2_fsdp2_expert2",
        "expert_choice_expert4_tensor2",
    ],
    "pool_and_deepseek": [
        "pool_data2_expert4",
        "pool_capacity_shared_fsdp2_expert2_tensor2",
        "deepseek_data2_expert4",
    ],
}


def test_the_mesh_groups_hold_every_mesh_once():
    assert sorted(m for group in MESH_GROUPS.values() for m in group) == sorted(MESHES)


@pytest.mark.slow
@pytest.mark.parametrize("group", list(MESH_GROUPS))
def test_same_losses_on_every_mesh_and_experts_are_split(group, tmp_path):
    """Dropless and capacity-per-sequence training give the single-device losses on any
    mesh, with each layer's experts or one pool for all; expert choice does where
    mesh.expert covers all batch shards (its mesh here); the router bias of moe.bias_rate
    is the single-device one after every step, exactly."""
    names = MESH_GROUPS[group]
    routings = {MESHES[name][0]: ROUTING[MESHES[name][0]] for name in names}
    single = worker("train_meshes", 1, workdir=str(tmp_path / "single"), meshes=routings)
    meshes = {name: {**ROUTING[MESHES[name][0]], **MESHES[name][1]} for name in names}
    multi = worker("train_meshes", 8, workdir=str(tmp_path), meshes=meshes)
    assert all(len(res["losses"]) == 5 for res in single.values())
    if "capacity" in single:
        assert min(single["capacity"]["dropped"]) > 0, "capacity should drop assignments"
    if "deepseek" in single:
        assert np.abs(single["deepseek"]["router_bias"][-1]).max() > 0, "the bias should move"
    for name, res in multi.items():
        want = single[MESHES[name][0]]
        close(res["losses"], want["losses"])  # float32, 1e-4 relative
        close(res["dropped"], want["dropped"])
        assert res["router_bias"] == want["router_bias"], name  # None without a bias
        held = res["experts_held"]
        assert len(held) == 8
        expert_size = meshes[name].get("mesh.expert", 1)
        n = res["num_experts"]
        for experts in held.values():
            assert len(experts) == n // expert_size, (name, held)
        # Together the devices hold every expert.
        assert sorted({e for ex in held.values() for e in ex}) == list(range(n))


@pytest.mark.slow
def test_cached_decoding_with_capacity_per_sequence_on_an_expert_mesh():
    """The cache's per-expert counts go through the expert group's gather and scatter:
    prefill then one token at a time gives the full forward's logits, with drops."""
    res = worker("decode", 8, mesh={"mesh.data": 2, "mesh.expert": 4})
    assert res["dropped"] > 0, "every MoE layer should drop assignments"
    assert res["max_diff"] < 1e-4, res


@pytest.mark.slow
def test_full_qk_norm_under_tensor_sharding_matches_one_device():
    """model.qk_norm=full normalises over all heads, which `tensor` splits: the sharded
    forward (heads, q_norm scale and the gated shared expert split over tensor) gives the
    single-device logits."""
    overrides = {"model.head_dim": 24, "model.qkv_bias": True, "model.qk_norm": "full"}
    overrides |= {"moe.num_shared": 1, "moe.d_shared": 40, "moe.shared_gate": True}
    overrides |= {"model.init_std": 0.2}  # decisive attention and routing
    mesh = {"mesh.data": 1, "mesh.fsdp": 2, "mesh.tensor": 2}
    res = worker("forward_on_mesh", 4, overrides=overrides, mesh=mesh)
    assert "tensor" in res["q_norm_spec"], res  # the norm's heads really are split
    assert res["scale"] > 1.0, res
    assert res["max_diff"] < 1e-4 * res["scale"], res


def test_cpu_peak_is_one_devices_share_of_the_host_also_under_a_mesh():
    """MFU's CPU peak: the host's matmul speed split among its fake devices. Measured under
    an 8-device mesh it once ran 8 copies of the matmul at once: 8x slower, and low."""
    res = worker("cpu_peak", 8, mesh={"mesh.data": 2, "mesh.expert": 4})
    assert res["source"].endswith("shared by its 8 devices"), res
    ratio = res["per_device"] * 8 / res["alone"]
    assert 0.5 < ratio < 2, res  # the bug gave 0.13


@pytest.mark.slow
def test_checkpoint_reshards_to_other_meshes(tmp_path):
    """Written on (data=2, expert=4): evaluated on 1 device, resumed on (data=4, expert=2)
    and on 1 device, each continuing the uninterrupted curve."""
    mesh_a = {"mesh.data": 2, "mesh.expert": 4, "train.checkpoint_every": 2}
    full = worker("train", 8, workdir=str(tmp_path / "full"), overrides=mesh_a)
    worker("train", 8, workdir=str(tmp_path / "a"), overrides=mesh_a, stop_after=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")

    eval_8 = worker("eval", 8, workdir=str(tmp_path / "a"))
    eval_1 = worker("eval", 1, workdir=str(tmp_path / "a"))
    assert eval_8["devices"] == 8 and eval_1["devices"] == 1
    assert eval_1["param_sum"] == eval_8["param_sum"]
    close(eval_1["loss"], eval_8["loss"], rtol=1e-5)

    mesh_b = {"mesh.data": 4, "mesh.expert": 2, "train.checkpoint_every": 2}
    resumed_b = worker("train", 8, workdir=str(tmp_path / "a"), overrides=mesh_b)
    resumed_1 = worker(
        "train", 1, workdir=str(tmp_path / "b"), overrides={"train.checkpoint_every": 2}
    )
    close(resumed_b["losses"], full["losses"])
    close(resumed_1["losses"], full["losses"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(workdir, process_id, port, overrides):
    cmd = train_tiny(
        workdir,
        "--coordinator-address",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--process-id",
        str(process_id),
        "--set",
        *(f"{k}={v}" for k, v in overrides.items()),
    )
    return subprocess.Popen(
        cmd, env=env_with(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    mesh = {"mesh.data": 2, "mesh.expert": 4}
    overrides = {**mesh, "train.steps": 5, "train.eval_every": 1000, "train.checkpoint_every": 5}
    reference = worker("train", 8, workdir=str(tmp_path / "one"), overrides=mesh)
    port = _free_port()
    procs = [_launch(tmp_path / "two", i, port, overrides) for i in (0, 1)]
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    close([json.loads(x)["loss"] for x in lines], reference["losses"])
    # Both processes wrote one checkpoint together, complete and restorable.
    assert sorted(os.listdir(tmp_path / "two" / "checkpoints")) == ["5"]
    one_proc_eval = worker("eval", 8, workdir=str(tmp_path / "two"))
    assert np.isfinite(one_proc_eval["loss"])


@pytest.mark.slow
def test_survivor_exits_when_a_peer_dies(tmp_path):
    overrides = {
        "mesh.data": 2,
        "mesh.expert": 4,
        "train.steps": 100000,
        "train.eval_every": 100000,
        "train.checkpoint_every": 100000,
        "train.log_every": 1,
    }
    port = _free_port()
    procs = [_launch(tmp_path / "w", i, port, overrides) for i in (0, 1)]
    # Wait until both train (metrics.jsonl grows), then kill process 1 outright.
    deadline = time.time() + 300
    metrics = tmp_path / "w" / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 2:
            break
        assert procs[0].poll() is None, procs[0].communicate()[1][-2000:]
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed_at = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("the surviving process hung after its peer died")
    waited = time.time() - killed_at
    assert procs[0].returncode != 0
    assert waited < 90, waited
    assert "another task died" in err or "heartbeat" in err, err[-2000:]


def test_mesh_must_match_the_devices_present():
    with pytest.raises(
        ConfigError,
        match=r"^mesh: data=2 x fsdp=1 x expert=1 x tensor=1 = 2 "
        r"devices, but 1 are present$",
    ):
        sharding.make_mesh(MeshConfig(data=2))
    assert sharding.mesh_shape(MeshConfig(data=-1, expert=4), 8) == (2, 1, 4, 1)
    assert sharding.mesh_shape(MeshConfig(data=2, expert=-1), 8) == (2, 1, 4, 1)
    with pytest.raises(ConfigError, match="^mesh.expert: -1 cannot fill"):
        sharding.mesh_shape(MeshConfig(data=3, expert=-1), 8)


def test_logical_rules_map_parameter_axes_to_mesh_axes():
    spec = sharding.logical_to_spec(("layers", "exp", "embed", "mlp"))
    assert tuple(spec) == (None, "expert", "fsdp", "tensor")
    assert tuple(sharding.logical_to_spec(("batch", None))) == (("data", "fsdp", "expert"), None)


def test_batch_not_divisible_by_batch_shards_is_one_line(tmp_path, capsys):
    from sparsemodel import cli

    # One device here: a mesh of 1 divides everything, so use the batch/grad_accum rule.
    rc = cli.main(
        [
            "train",
            "--config",
            "tiny",
            "--workdir",
            str(tmp_path / "w"),
            "--set",
            "train.batch_size=6",
            "train.grad_accum=4",
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparsemodel: error: train.batch_size: 6 is not divisible by train.grad_accum=4"]
    assert config.load("tiny").train.batch_size % 8 == 0


def test_batch_not_divisible_by_the_mesh_fails_before_compiling(tmp_path):
    out = subprocess.run(
        train_tiny(tmp_path / "w", "--set", "mesh.data=8", "train.batch_size=4"),
        env=env_with(8),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1] == (
        "sparsemodel: error: train.batch_size: 4 (per micro-batch 4) is not divisible by the "
        "8 batch shards of the mesh (data x fsdp x expert)"
    )

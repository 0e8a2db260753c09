"""Damaged checkpoints: training falls back to the previous good one; eval says what is wrong."""

from __future__ import annotations

import json

import pytest

from sparsemodel import config, evaluate, train
from sparsemodel.checkpoint import CheckpointError


def tiny(**overrides):
    base = {
        "train.steps": 8,
        "train.checkpoint_every": 4,
        "train.eval_every": 100,
        "train.log_every": 4,
    }
    return config.load("tiny", {**base, **overrides})


def losses(workdir):
    return [json.loads(x)["loss"] for x in (workdir / "metrics.jsonl").read_text().splitlines()]


def truncate_all(step_dir):
    for f in step_dir.rglob("*"):
        if f.is_file():
            f.write_bytes(b"")


def remove_params(step_dir):
    for f in (step_dir / "params").rglob("*"):
        if f.is_file():
            f.unlink()


@pytest.mark.slow
@pytest.mark.parametrize("damage", [truncate_all, remove_params])
def test_train_resumes_from_the_previous_good_checkpoint(tmp_path, damage):
    reference = tmp_path / "reference"
    train.run(tiny(), reference, log=lambda s: None)
    run = tmp_path / "run"
    train.run(tiny(), run, stop_after=8, log=lambda s: None)  # checkpoints 4 and 8
    damage(run / "checkpoints" / "8")

    with pytest.raises(CheckpointError, match="^checkpoint step 8 is damaged or incomplete"):
        evaluate.restore(run, step=8)

    messages = []
    train.run(tiny(), run, log=messages.append)
    assert any("checkpoint step 8 is damaged" in m for m in messages), messages
    assert any("resumed from" in m and m.endswith("/4") for m in messages), messages
    assert losses(run) == losses(reference)  # steps 5..8 recomputed exactly
    assert (run / "checkpoints" / "8.damaged").is_dir()  # kept aside, not deleted
    assert (run / "checkpoints" / "4").is_dir()

"""TensorBoard event files for the training metrics, written beside metrics.jsonl.

    tensorboard --logdir runs/small

Scalars: train/* (losses, lr, grad and parameter norms, tokens/s, MFU, ...) and, for MoE
models, experts/layer<i>/load_e<j> (load x E, 1 = balanced) and experts/layer<i>/dropped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class EventLog:
    def __init__(self, logdir: Path, first_step: int):
        from tensorboardX import SummaryWriter

        # purge_step: a resumed run hides events a killed run logged past its checkpoint.
        self.writer = SummaryWriter(logdir=str(logdir), purge_step=first_step, flush_secs=10)

    def write(self, step: int, record: dict) -> None:
        for key, value in record.items():
            if key in ("step", "load", "layer_dropped") or value is None:
                continue
            self.writer.add_scalar(f"train/{key}", float(value), step)
        if "load" in record:
            load = np.asarray(record["load"])  # [moe layers, E]
            for i, row in enumerate(load):
                for j, frac in enumerate(row):
                    self.writer.add_scalar(f"experts/layer{i}/load_e{j}", frac * len(row), step)
        for i, dropped in enumerate(record.get("layer_dropped", [])):
            self.writer.add_scalar(f"experts/layer{i}/dropped", dropped, step)

    def close(self) -> None:
        self.writer.close()

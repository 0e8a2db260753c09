"""TensorBoard event files for the training metrics, written beside metrics.jsonl.

    tensorboard --logdir runs/small

Scalars: train/* (losses, lr, grad and parameter norms, tokens/s, MFU, ...) and, for MoE
models, experts/layer<i>/load_e<j> (load x E, 1 = balanced), experts/layer<i>/dropped, the
router bias experts/layer<i>/bias_e<j> (moe.bias_rate > 0; i counts the unique MoE layers)
and, at the end of each log interval, experts/layer<i>/dead and experts/layer<i>/overloaded
(health.py).

Events are written and flushed on the training thread, once per step. tensorboardX's
SummaryWriter writes from a background thread instead: when the disk filled up, that thread
died, its queue filled and the next put blocked training forever (SIGTERM included).
"""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from pathlib import Path

import numpy as np
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.summary import scalar

from sparsemodel.files import storage_error

# Record keys holding one value per MoE layer, or one per layer and expert: their tags.
PER_LAYER = {
    "layer_dropped": "dropped",
    "dead_experts": "dead",
    "overloaded_experts": "overloaded",
}
PER_EXPERT = {"load": "load_e", "router_bias": "bias_e"}


class EventLog:
    def __init__(self, logdir: Path, first_step: int):
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}"
        self.path = Path(logdir) / name
        try:
            self._file = self.path.open("ab")
        except OSError as e:
            raise storage_error(self.path, e) from None
        self._write(
            [
                Event(wall_time=time.time(), file_version="brain.Event:2"),
                # A START event at first_step hides the events a killed run logged past
                # its checkpoint (TensorBoard's purge), as SummaryWriter's purge_step does.
                Event(step=first_step, session_log=SessionLog(status=SessionLog.START)),
            ]
        )

    def write(self, step: int, record: dict) -> None:
        values = []
        for key, value in record.items():
            if key == "step" or key in PER_LAYER or key in PER_EXPERT or value is None:
                continue
            values.append((f"train/{key}", float(value)))
        for key, tag in PER_EXPERT.items():
            for i, row in enumerate(np.asarray(record.get(key, []))):  # [layers, E]
                scale = len(row) if key == "load" else 1  # load x E: 1 = balanced
                values += [(f"experts/layer{i}/{tag}{j}", v * scale) for j, v in enumerate(row)]
        for key, tag in PER_LAYER.items():
            for i, value in enumerate(record.get(key, [])):
                values.append((f"experts/layer{i}/{tag}", float(value)))
        now = time.time()
        self._write([Event(wall_time=now, step=step, summary=scalar(t, v)) for t, v in values])

    def _write(self, events: list[Event]) -> None:
        """Appends TFRecords (length, its crc, the Event proto, its crc) and flushes."""
        try:
            for event in events:
                data = event.SerializeToString()
                header = struct.pack("<Q", len(data))
                record = header + struct.pack("<I", masked_crc32c(header))
                self._file.write(record + data + struct.pack("<I", masked_crc32c(data)))
            self._file.flush()
        except OSError as e:
            raise storage_error(self.path, e) from None

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a failed write already stopped the run
            self._file.close()

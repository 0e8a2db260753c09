"""Progress for long work: a one-line bar on a terminal, plain log lines otherwise."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, start: int = 0, stream=None, every: int = 1):
        self.total, self.start = total, start
        self.stream = stream or sys.stderr
        self.every = every
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()

    def update(self, step: int, fields: dict[str, float | str]) -> None:
        """Shows step/total and the fields; off a terminal, one line every `every` steps."""
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in fields.items())
        if self.tty:
            done = (step - self.start) / max(1, self.total - self.start)
            bar = "#" * int(24 * done) + "-" * (24 - int(24 * done))
            eta = (time.perf_counter() - self.t0) / max(done, 1e-9) * (1 - done)
            self.stream.write(f"\r[{bar}] {step}/{self.total}  {text}  eta {eta:4.0f}s ")
            self.stream.flush()
        elif step % self.every == 0 or step == self.total:
            self.stream.write(f"step {step}/{self.total}  {text}\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """A line that stays (e.g. a validation result), without breaking the bar."""
        self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)

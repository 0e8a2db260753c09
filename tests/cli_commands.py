"""The `sparsemodel` command as tests start it: a subprocess on this interpreter."""

from __future__ import annotations

import sys

SPARSEMODEL = [sys.executable, "-m", "sparsemodel.cli"]


def train_tiny(workdir, *args: str) -> list[str]:
    """`sparsemodel train --config tiny --workdir WORKDIR ARGS...` as an argv list."""
    return [*SPARSEMODEL, "train", "--config", "tiny", "--workdir", str(workdir), *args]

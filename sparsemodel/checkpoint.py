"""Checkpoints on disk with Orbax: the only module that imports orbax.

Layout: <workdir>/checkpoints/<step>/{params, opt_state, meta}. `meta` is JSON (the step,
the data iterator's position and the seed the step keys derive from), so nothing in a
checkpoint is pickled. Orbax writes each step to a temporary directory and renames it
when complete, so a half-written step is never listed or restored. Saves are async:
training continues while the previous step is written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the step and the reason."""


class Checkpointer:
    def __init__(self, workdir: Path, keep: int = 3, async_save: bool = True):
        self.directory = (Path(workdir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("params", "opt_state", "meta")
        )

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Starts writing step (returns before the write is done when async)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=True,
        )

    def restore(self, step: int, abstract_params, abstract_opt_state=None):
        """Restores onto the shardings carried by the abstract targets' ShapeDtypeStructs,
        whatever mesh wrote the checkpoint. Without abstract_opt_state, params only."""
        if step not in self.manager.all_steps():
            have = ", ".join(map(str, self.steps())) or "none"
            raise CheckpointError(f"--step {step}: no such checkpoint (have: {have})")
        items = {
            "params": ocp.args.StandardRestore(abstract_params),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_opt_state is not None:
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds on bad files
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint step {step} is damaged or incomplete: {reason}"
            ) from e
        return out["params"], out.get("opt_state"), out["meta"]

    def restore_newest_good(self, abstract_params, abstract_opt_state, warn):
        """(step, params, opt_state, meta) of the newest checkpoint that restores, or None.

        A damaged newer step is renamed to `<step>.damaged` (kept for inspection, out of
        Orbax's way) and the previous one is tried; nothing is deleted.
        """
        for step in reversed(self.steps()):
            try:
                return (step, *self.restore(step, abstract_params, abstract_opt_state))
            except CheckpointError as e:
                warn(f"warning: {e}; resuming from the previous checkpoint instead")
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.exists():
                src.rename(self.directory / f"{step}.damaged")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()

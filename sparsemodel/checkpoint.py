"""Checkpoints on disk with Orbax: the only module that imports orbax.

Layout: <workdir>/checkpoints/<step>/{params, opt_state, meta}. `meta` is JSON (the step,
the data iterator's position and the seed the step keys derive from), so nothing in a
checkpoint is pickled. Orbax writes each step to a temporary directory and renames it
when complete, so a half-written step is never listed or restored. Saves are async:
training continues while the previous step is written. A step without opt_state (e.g.
imported from Hugging Face) holds parameters only; training from it starts a fresh optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sparsemodel.host_heap import return_freed_heap


def _skip_tensorstore_io_metrics() -> None:
    """Orbax asks TensorStore for its global I/O metrics before and after every array
    write, only to log a throughput line, and each collection leaves memory behind:
    measured over 400 saves of tiny, resident memory grew 0.08 MiB per save without end,
    and levelled off with this. A None reading makes Orbax skip that log line (every
    caller checks for None). A newer Orbax without the function is left as it is."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    if hasattr(tensorstore_utils, "get_tensorstore_raw_bytes"):
        tensorstore_utils.get_tensorstore_raw_bytes = lambda *args, **kwargs: None


_skip_tensorstore_io_metrics()


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
        # On CPU the state's buffers are host memory: a device copy costs what Orbax's own
        # host copy would, and lets all of Orbax's per-save work (tens of ms of Python)
        # run off the training thread. On accelerators that copy would double the state's
        # device memory, so Orbax's async save (a device-to-host copy, then writes in the
        # background) runs as it is.
        self._background = async_save and jax.default_backend() == "cpu"
        self._saving: threading.Thread | None = None
        self._save_error: BaseException | None = None

    def steps(self) -> list[int]:
        self._join()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        self._join()
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Starts writing step; returns before the write is done when async. opt_state None
        writes parameters only (meta records it): training from such a step starts a fresh
        optimizer."""
        self._join()  # one save at a time; raises if the previous one failed
        meta = {**meta, "params_only": opt_state is None}
        if not self._background:
            self._save_now(step, params, opt_state, meta)
            return
        params, opt_state = _device_copy((params, opt_state))  # the next step donates these
        self._saving = threading.Thread(
            target=self._save_catching,
            args=(step, params, opt_state, meta),
            name=f"checkpoint-{step}",
            daemon=True,
        )
        self._saving.start()

    def _save_now(self, step, params, opt_state, meta) -> None:
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def _save_catching(self, *args) -> None:
        try:
            self._save_now(*args)
            self.manager.wait_until_finished()  # then its buffers are freed: trim them
            return_freed_heap()
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            self._save_error = e

    def _join(self) -> None:
        if self._saving is not None:
            self._saving.join()
            self._saving = None
        if self._save_error is not None:
            error, self._save_error = self._save_error, None
            raise error

    def save_host_params(self, step: int, params, meta: dict[str, Any]) -> None:
        """Writes a params-only step from host numpy arrays (e.g. memmaps of a converted
        checkpoint) and waits for it, with memory bounded whatever the checkpoint's size.

        Three defaults of orbax would each hold the whole checkpoint in memory: the deep
        copy of numpy leaves before writing, OCDBT (which buffers every array's encoded
        chunks until it commits; measured: peak RSS = checkpoint size) and unbounded
        concurrency. Here the copy is off (nothing modifies the arrays meanwhile), arrays
        are plain zarr written in 64 MiB chunks, and ~1 GB of arrays is in flight at a time.
        Restore reads either format.
        """
        default = ocp.type_handlers.get_type_handler(np.ndarray)
        try:
            no_copy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
        except TypeError:  # an Orbax without the option: its default behaviour
            no_copy = ocp.type_handlers.NumpyHandler()
        chunked = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=64 << 20), params)
        with _quiet_absl():
            ocp.type_handlers.register_type_handler(np.ndarray, no_copy, override=True)
            manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False),
                item_handlers={
                    "params": ocp.StandardCheckpointHandler(save_concurrent_gb=1, use_ocdbt=False),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )
            try:
                manager.save(
                    step,
                    args=ocp.args.Composite(
                        params=ocp.args.StandardSave(params, save_args=chunked),
                        meta=ocp.args.JsonSave({**meta, "params_only": True}),
                    ),
                    force=True,
                )
                manager.wait_until_finished()
            finally:
                manager.close()
                ocp.type_handlers.register_type_handler(np.ndarray, default, override=True)
        self.manager.reload()

    def restore_leaf(self, step: int, path: tuple) -> np.ndarray:
        """One parameter of a step as a host numpy array, e.g. ('units', 'blocks', 0, 'attn',
        'wq'): lets export stream a checkpoint one parameter at a time."""
        keys = tuple(map(str, path)) + ("value",)  # nnx.Param's leaf; list indices as strings
        item, args = 0, ocp.RestoreArgs(restore_type=np.ndarray)
        for key in reversed(keys):
            item, args = {key: item}, {key: args}
        try:
            with ocp.PyTreeCheckpointer() as c:
                out = c.restore(
                    self.directory / str(step) / "params",
                    args=ocp.args.PyTreeRestore(item=item, restore_args=args, partial_restore=True),
                )
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds on bad files
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(f"checkpoint step {step}: cannot read {path}: {reason}") from e
        for key in keys:
            out = out[key]
        return out

    def restore(self, step: int, abstract_params, abstract_opt_state=None):
        """Restores onto the shardings carried by the abstract targets' ShapeDtypeStructs,
        whatever mesh wrote the checkpoint. Without abstract_opt_state, params only; opt_state is
        None also for a step saved without one (meta says so: a step that lost its
        optimizer state is damaged, not params-only)."""
        if step not in self.steps():
            have = ", ".join(map(str, self.steps())) or "none"
            raise CheckpointError(f"--step {step}: no such checkpoint (have: {have})")
        try:
            meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            items = {"params": ocp.args.StandardRestore(abstract_params)}
            if abstract_opt_state is not None and not meta["meta"].get("params_only"):
                items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds on bad files
            reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint step {step} is damaged or incomplete: {reason}"
            ) from e
        return out["params"], out.get("opt_state"), meta["meta"]

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
        self._join()
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()


@jax.jit
def _device_copy(tree):
    return jax.tree.map(jnp.copy, tree)


@contextlib.contextmanager
def _quiet_absl():
    """Silences absl's warnings (orbax's, about the handler override and the OCDBT merge it
    skips for a non-OCDBT save) for the duration."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        absl_logger.setLevel(level)

"""Checkpoints on disk with Orbax: the only module that imports orbax.

Layout: <workdir>/checkpoints/<step>/{params, opt_state, meta}. `meta` is JSON, so nothing
in a checkpoint is pickled: the step, the data iterator's position, the seed the step keys
derive from, and the checkpoint's own record of what it holds:
  format     the layout version (FORMAT); older checkpoints are upgraded on restore
  model      the config's shape fields (config.model_record): a config whose model differs
             is refused in one line naming the keys, and the checkpoint is left alone
  shapes     every array's shape, by path
  checksums  every array's checksum (checksum.py), verified on restore: damaged bytes are
             a damaged checkpoint, never a model that loads with wrong weights
Orbax writes each step to a temporary directory and renames it when complete, so a
half-written step is never listed or restored. Saves are async: training continues while
the previous step is written. A step without opt_state (e.g. imported from Hugging Face)
holds parameters only; training from it starts a fresh optimizer.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from sparsemodel import checksum, layouts
from sparsemodel.config import ConfigError, check_model_record
from sparsemodel.files import StorageError, free_name, storage_error
from sparsemodel.host_heap import return_freed_heap

FORMAT = layouts.FORMAT  # the format every save writes (layouts.py lists them all)


def _skip_tensorstore_io_metrics() -> None:
    """Orbax asks TensorStore for its global I/O metrics before and after every array
    write, only to log a throughput line, and each collection leaves memory behind, so a
    long run's resident memory would grow with every save. A None reading makes Orbax skip
    that log line (every caller checks for None). A newer Orbax without the function is
    left as it is."""
    from orbax.checkpoint._src.serialization import tensorstore_utils

    if hasattr(tensorstore_utils, "get_tensorstore_raw_bytes"):
        tensorstore_utils.get_tensorstore_raw_bytes = lambda *args, **kwargs: None


_skip_tensorstore_io_metrics()


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


def _replica_parallel_for_large_arrays_only() -> None:
    """Orbax splits the write of a replicated array among its replicas, taking each slice
    with its own compiled program: for small arrays those compiles are most of a
    checkpoint's first save, and the split saves nothing. Slices under 1 MiB are written
    whole by one replica."""
    from orbax.checkpoint._src.metadata import array_metadata_store

    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=array_metadata_store.Store(),  # as Orbax's default handler
        min_slice_bytes_for_replica_parallel=1 << 20,
    )
    with _quiet_absl():
        ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


_replica_parallel_for_large_arrays_only()


class _DropOrbaxErrors(logging.Filter):
    """Orbax logs every failure of a background save, with its traceback, from each of its
    threads (hundreds of lines for one full disk), and asyncio logs its failed write tasks
    again at exit; Checkpointer raises the failure as one line, so the copies are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        from_orbax = "/orbax/" in record.pathname or "orbax" in record.getMessage()
        return not (record.levelno >= logging.ERROR and from_orbax)


for _name in ("absl", "asyncio"):
    logging.getLogger(_name).addFilter(_DropOrbaxErrors())


def _drop_closed_loop_callbacks(previous=sys.unraisablehook):
    """After a failed save, TensorStore completes the writes Orbax abandoned and calls back
    into Orbax's closed event loop, printing a traceback per write: those are dropped."""

    def hook(unraisable):
        closed = isinstance(unraisable.exc_value, RuntimeError) and (
            str(unraisable.exc_value) == "Event loop is closed"
        )
        if not closed:
            previous(unraisable)

    sys.unraisablehook = hook


_drop_closed_loop_callbacks()


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the step and the reason."""


def leaf_path(path) -> str:
    """A tree path as 'units/blocks/0/attn/wq': keys, attributes and indices, without the
    trailing `value` of an nnx Variable (Orbax's own metadata spells it as a key)."""
    names = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
    return "/".join(names[:-1] if names and names[-1] == "value" else names)


def shapes_of(tree) -> dict[str, list[int]]:
    return {leaf_path(p): list(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _record(params, opt_state) -> dict[str, Any]:
    """The format, shapes and checksums that go into every checkpoint's meta."""
    trees = {"params": params, "opt_state": opt_state}
    return {
        "format": FORMAT,
        "shapes": shapes_of(params),
        "checksums": checksum.checksums(trees, name=leaf_path),
    }


def _reason(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0][:200] if text else type(e).__name__


class Checkpointer:
    def __init__(self, workdir: Path, keep: int = 3, async_save: bool = True):
        self.directory = (Path(workdir) / "checkpoints").absolute()
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self.manager = _listing(
            lambda: ocp.CheckpointManager(
                self.directory, options=options, item_names=("params", "opt_state", "meta")
            )
        )
        # On CPU the state's buffers are host memory: a device copy costs what Orbax's own
        # host copy would, and lets all of Orbax's per-save work (tens of ms of Python)
        # run off the training thread. On accelerators that copy would double the state's
        # device memory, so Orbax's async save (a device-to-host copy, then writes in the
        # background) runs as it is.
        self._background = async_save and jax.default_backend() == "cpu"
        self._saving: threading.Thread | None = None
        self._save_error: BaseException | None = None
        self._saving_step: int | None = None

    def steps(self) -> list[int]:
        self._join()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        self._join()
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict[str, Any]) -> None:
        """Starts writing step; returns before the write is done when async. opt_state None
        writes parameters only (meta records it): training from such a step starts a fresh
        optimizer. meta should hold `model` (config.model_record) for the restore check."""
        self._join()  # one save at a time; raises if the previous one failed
        if self._background:
            params, opt_state = _device_copy((params, opt_state))  # the next step donates these
        meta = {**meta, "params_only": opt_state is None, **_record(params, opt_state)}
        if not self._background:
            self._save_now(step, params, opt_state, meta)
            return
        self._saving_step = step
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
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), force=True)
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds
            raise self._save_failure(step, e) from None

    def _save_catching(self, step, *args) -> None:
        try:
            self._save_now(step, *args)
            self.manager.wait_until_finished()  # then its buffers are freed: trim them
            return_freed_heap()
        except BaseException as e:  # noqa: BLE001 - re-raised on the training thread
            self._save_error = self._save_failure(step, e)

    def _save_failure(self, step: int, e: BaseException) -> BaseException:
        """A failed write as one line: a StorageError naming the directory and the space left
        when the cause is the file system, else a CheckpointError."""
        if isinstance(e, StorageError | CheckpointError):
            return e
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, OSError):
            cause = cause.__cause__ or cause.__context__
        text = str(e)
        if cause is None and ("No space left" in text or "Disk quota" in text):
            cause = OSError(28, "No space left on device")
        where = self.directory / str(step)
        if cause is not None:
            error = storage_error(where, cause)
            return StorageError(f"{error} (checkpoint step {step} was not saved)")
        return CheckpointError(f"checkpoint step {step}: saving failed: {_reason(e)}")

    def check_saved(self) -> None:
        """Raises the error of a background save that already failed (without waiting for
        one in progress): the loop calls it every step, so a full disk stops it promptly."""
        if self._saving is not None and not self._saving.is_alive():
            self._join()

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
        chunks until it commits) and unbounded concurrency. Here the copy is off (nothing
        modifies the arrays meanwhile), arrays are plain zarr written in 64 MiB chunks,
        and ~1 GB of arrays is in flight at a time.
        Restore reads either format.
        """
        default = ocp.type_handlers.get_type_handler(np.ndarray)
        try:
            no_copy = ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)
        except TypeError:  # an Orbax without the option: its default behaviour
            no_copy = ocp.type_handlers.NumpyHandler()
        chunked = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=64 << 20), params)
        sums = {
            "params/" + leaf_path(p): checksum.hex_of(checksum.numpy_checksum(x))
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
        }
        record = {"format": FORMAT, "shapes": shapes_of(params), "checksums": sums}
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
                        meta=ocp.args.JsonSave({**meta, "params_only": True, **record}),
                    ),
                    force=True,
                )
                manager.wait_until_finished()
            finally:
                manager.close()
                ocp.type_handlers.register_type_handler(np.ndarray, default, override=True)
        self.manager.reload()

    # ----------------------------------------------------------------------- reading

    def _require(self, step: int) -> None:
        if step not in self.steps():
            have = ", ".join(map(str, self.steps())) or "none"
            raise CheckpointError(f"--step {step}: no such checkpoint (have: {have})")

    def meta(self, step: int) -> dict[str, Any]:
        """The step's meta, upgraded to FORMAT; CheckpointError when it cannot be read."""
        self._require(step)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
            meta = dict(out["meta"])
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds on bad files
            raise CheckpointError(
                f"checkpoint step {step} is damaged or incomplete: {_reason(e)}"
            ) from e
        return self._upgrade(step, meta)

    def _upgrade(self, step: int, meta: dict[str, Any]) -> dict[str, Any]:
        """Completes an older checkpoint's record (its arrays keep their stored layout:
        see layouts.py). Format 1 had none: its shapes come from Orbax's own metadata, and
        it has no model record or checksums to check."""
        version = meta.get("format", 1)
        if version > FORMAT:
            raise CheckpointError(
                f"checkpoint step {step} has format {version}, newer than this sparsemodel "
                f"reads ({FORMAT}): upgrade sparsemodel"
            )
        if version == 1:
            with ocp.PyTreeCheckpointer() as c:
                tree = c.metadata(self.directory / str(step) / "params").item_metadata.tree
            meta = {**meta, "format": 2, "shapes": shapes_of(tree), "checksums": {}}
        return meta

    def check_model(self, step: int, meta, abstract_params, model: dict | None) -> None:
        """ConfigError unless the step holds the model asked for: first by the config's
        shape fields (naming the keys), then array by array."""
        where = f"checkpoint step {step} in {self.directory}"
        if model is not None and meta.get("model"):
            check_model_record(meta["model"], model, where)
        want, have = shapes_of(abstract_params), meta["shapes"]
        for path in sorted(set(want) | set(have)):
            if path.endswith("/router_bias") and (path in want) != (path in have):
                trained = "moe.bias_rate > 0" if path in have else "moe.bias_rate=0"
                raise ConfigError(
                    f"{where} holds {'a' if path in have else 'no'} router bias: it was "
                    f"trained with {trained}, and so must the config be"
                )
            if want.get(path) != have.get(path):
                raise ConfigError(
                    f"{where} holds another model than the config: parameter {path} has "
                    f"shape {have.get(path)} there, {want.get(path)} in the config "
                    "(use a new --workdir, or the config the checkpoint was trained with)"
                )

    def restore(self, step: int, abstract_params, abstract_opt_state=None, model=None):
        """Restores onto the shardings carried by the abstract targets' ShapeDtypeStructs,
        whatever mesh wrote the checkpoint. Without abstract_opt_state, params only; opt_state is
        None also for a step saved without one (meta says so: a step that lost its
        optimizer state is damaged, not params-only).

        model: the Config asked for; a checkpoint of another model raises ConfigError (it
        is not damaged). Damage, including any array whose bytes fail their checksum,
        raises CheckpointError."""
        meta = self.meta(step)
        version = meta["format"]
        stored_params = layouts.stored(version, abstract_params)  # the layout on disk
        self.check_model(step, meta, stored_params, model)
        items = {"params": ocp.args.StandardRestore(stored_params)}
        if abstract_opt_state is not None and not meta.get("params_only"):
            items["opt_state"] = ocp.args.StandardRestore(
                layouts.stored(version, abstract_opt_state)
            )
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # noqa: BLE001 - orbax/tensorstore raise many kinds on bad files
            raise CheckpointError(
                f"checkpoint step {step} is damaged or incomplete: {_reason(e)}"
            ) from e
        params, opt_state = out["params"], out.get("opt_state")
        self._verify(step, meta, {"params": params, "opt_state": opt_state})
        return layouts.upgrade(version, params), layouts.upgrade(version, opt_state), meta

    def _verify(self, step: int, meta, trees: dict) -> None:
        expected = meta.get("checksums") or {}
        if not expected:
            return  # format 1: written before checksums
        for path, value in checksum.checksums(trees, name=leaf_path).items():
            if expected.get(path) != value:
                raise CheckpointError(
                    f"checkpoint step {step} is damaged: {path} fails its checksum"
                )

    def restore_leaf(self, step: int, path: tuple) -> np.ndarray:
        """One parameter of a step, in today's layout, as a host numpy array, e.g. ('units',
        'blocks', 0, 'attn', 'wq'), each stored array checked against its checksum: lets
        export stream a checkpoint one parameter at a time."""
        meta = self.meta(step)
        version = meta["format"]
        arrays = []
        for stored_path in layouts.stored_leaves(version, tuple(map(str, path))):
            array = self._read_leaf(step, stored_path)
            name = "params/" + "/".join(stored_path)
            expected = meta.get("checksums", {}).get(name)
            if expected is not None and expected != checksum.hex_of(checksum.numpy_checksum(array)):
                raise CheckpointError(
                    f"checkpoint step {step} is damaged: {name} fails its checksum"
                )
            arrays.append(array)
        return layouts.combine_leaves(version, tuple(map(str, path)), arrays)

    def _read_leaf(self, step: int, path: tuple) -> np.ndarray:
        keys = path + ("value",)  # nnx.Param's leaf; list indices as strings
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
            raise CheckpointError(
                f"checkpoint step {step}: cannot read {'/'.join(path)}: {_reason(e)}"
            ) from e
        for key in keys:
            out = out[key]
        return out

    def read(self, step: int | None, abstract_params, model=None):
        """(step, params, meta) for a reader (eval, generate, profile) that may run beside a
        `train` saving into the same workdir. step None: the newest, and when the running
        train saves a newer one and deletes this one mid-read (it keeps only its newest
        few), the new newest."""
        for _ in range(_READ_ATTEMPTS):
            want = self.latest_step() if step is None else step
            if want is None:
                raise CheckpointError(f"{self.directory.parent}: holds no checkpoint yet")
            self._require(want)
            try:
                params, _, meta = self.restore(want, abstract_params, model=model)
                return want, params, meta
            except CheckpointError:
                _listing(self.manager.reload)
                gone = want not in self.steps()
                if not gone and (step is not None or self.manager.latest_step() == want):
                    raise  # still there, and still the one asked for: damaged
                if step is not None:
                    raise CheckpointError(
                        f"checkpoint step {want} was deleted while being read (a running "
                        "train keeps only its newest train.keep_checkpoints)"
                    ) from None
        raise CheckpointError(f"{self.directory}: checkpoints kept changing while being read")

    def restore_newest_good(self, abstract_params, abstract_opt_state, warn, model=None):
        """(step, params, opt_state, meta) of the newest checkpoint that restores, or None.

        A damaged newer step is renamed to `<step>.damaged` (or `.damaged-2`, ... when that
        name is taken: kept for inspection, out of Orbax's way) and the previous one is
        tried; nothing is deleted. A checkpoint of another model is not damage: the
        ConfigError goes to the caller and nothing is renamed.
        """
        for step in reversed(self.steps()):
            try:
                return (step, *self.restore(step, abstract_params, abstract_opt_state, model))
            except CheckpointError as e:
                warn(f"warning: {e}; resuming from the previous checkpoint instead")
                self._set_aside(step)
        return None

    def _set_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.exists():
                src.rename(free_name(self.directory / f"{step}.damaged"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self.manager.reload()

    def wait(self) -> None:
        self._join()
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def close_quietly(self) -> None:
        """Closes after an error has already stopped the run: a save that failed too is
        not raised again over it (it was raised, or will be, as its own line)."""
        with contextlib.suppress(Exception):
            self.close()


_READ_ATTEMPTS = 5


def _listing(fn):
    """fn() (an Orbax listing of the steps), again when a step vanished while it was being
    listed: a `train` in the same workdir deletes old steps as it saves new ones."""
    for attempt in range(_READ_ATTEMPTS):
        try:
            return fn()
        except FileNotFoundError:
            if attempt == _READ_ATTEMPTS - 1:
                raise


@jax.jit
def _device_copy(tree):
    return jax.tree.map(jnp.copy, tree)

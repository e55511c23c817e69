"""``CkptCheckpointIO``: Lightning's checkpoints saved asynchronously into a ckpt store.

A save hands Lightning's checkpoint dict to one :class:`ckpt.Checkpointer`. The dict holds
the live tensors (``model.state_dict()`` and ``optimizer.state_dict()`` alias parameters
and optimizer state), so nothing is cloned on the caller's thread: each entry of
``optimizer_states`` that is the state of an optimizer this process stepped is replaced by
that optimizer, which makes the Checkpointer guard it. Its tensors and the parameters are
copied in the background, and the next ``optimizer.step()`` waits until they are, after
running Lightning's closure (see :mod:`ckpt_lightning.optimizers`); everything else
(buffers, RNG states, small values) is copied before the call returns. Encoding,
deduplication against the previous checkpoint and writing run in the background.

Paths map to steps as :mod:`ckpt_lightning.paths` describes. ``remove_checkpoint`` (what
``save_top_k`` calls) forgets a path; a step no live path names any more is deleted with
ckpt's retention (its manifest, then every object no kept checkpoint needs) after the
commit of the save in flight, on the commit thread, so the save that deduplicated against
it never loses a chunk. The store's latest checkpoint is always kept.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

import ckpt
from ckpt_lightning import optimizers
from ckpt_lightning import paths as pathmod
from ckpt_lightning import rng as rngmod
from ckpt_lightning.paths import PathTable

log = logging.getLogger("ckpt.lightning")

#: the key of the plugin's own entries in a stored checkpoint (the RNG states)
RESERVED_KEY = "ckpt_lightning"


class CkptCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` writing into the ckpt store at ``url``.

    ``Trainer(plugins=[CkptCheckpointIO("s3://bucket/run")], callbacks=[ModelCheckpoint(...)])``;
    resume with ``trainer.fit(model, ckpt_path="last")`` (the store's latest checkpoint) or an
    explicit path: one ``ModelCheckpoint`` generated, or :meth:`path` of a step.

    :param url: the store (any fsspec URL).
    :param storage_options: fsspec options for the store.
    :param restore_rng: put the process RNGs back on load (needed for a bit-exact resume).
    :param max_host_memory: bound on the background staging buffers, in bytes.
    :param on_error: ``"raise"`` (a failed background save raises from the next save or
        from teardown) or ``"warn"`` (logged; training goes on).
    """

    def __init__(
        self,
        url: str,
        storage_options: dict[str, Any] | None = None,
        *,
        restore_rng: bool = True,
        max_host_memory: int | None = None,
        on_error: str = "raise",
    ) -> None:
        super().__init__()
        if on_error not in ("raise", "warn"):
            raise ckpt.CheckpointError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        self.url = os.fspath(url)
        self.storage_options = storage_options
        self.restore_rng = restore_rng
        self.max_host_memory = max_host_memory
        self.on_error = on_error
        self._root = pathmod.normalize(self.url)
        self._lock = threading.RLock()
        # The writer lives in a box a finalizer can close: an instance dropped without
        # teardown() must not keep the store's writer lease for the life of the process.
        self._box = _WriterBox()
        weakref.finalize(self, self._box.close)
        #: the step load_checkpoint read, continued by the next save
        self._resumed: int | None = None
        self._table: PathTable | None = None
        #: the latest save of this writer
        self._last: _Saved | None = None
        #: steps whose paths were all removed, deleted after the next commit
        self._doomed: set[int] = set()
        #: directories that get the marker after the next commit, and those that have it
        self._marker_dirs: set[str] = set()
        self._marked: set[str] = set()
        self._rng = rngmod.DeferredRNG()
        optimizers.watch()
        from ckpt_lightning import _register

        _register(self)

    def __repr__(self) -> str:
        return f"CkptCheckpointIO({self.url!r})"

    @property
    def _ck(self) -> ckpt.Checkpointer | None:
        return self._box.ck

    @_ck.setter
    def _ck(self, ck: ckpt.Checkpointer | None) -> None:
        self._box.ck = ck

    def path(self, step: int) -> str:
        """The path that names checkpoint ``step`` of this store (for ``ckpt_path=``)."""
        return pathmod.step_path(self.url, step)

    # -- plumbing ------------------------------------------------------------------------
    def _checkpointer(self) -> ckpt.Checkpointer:
        """The writer, opened by the first save (or deletion): it takes the store's writer lease,
        which loading alone (``trainer.test(ckpt_path=...)``) never does."""
        with self._lock:
            if self._ck is None:
                self._ck = self._open()
            return self._ck

    def _open(self) -> ckpt.Checkpointer:
        ck = ckpt.Checkpointer(
            self.url,
            storage_options=self.storage_options,
            max_host_memory=self.max_host_memory,
            on_error=self.on_error,
        )
        resumed, self._resumed = self._resumed, None
        if resumed is not None:
            try:  # lineage: the next save continues the loaded checkpoint (and deduplicates against it)
                ck.restore({}, step=resumed)
            except ckpt.CheckpointError as exc:
                log.warning("saves to %s continue from its latest, not the loaded step %d: %s", self.url, resumed, exc)
        return ck

    def _paths(self) -> PathTable:
        if self._table is None:
            self._table = PathTable.from_store(self.url, self.storage_options)
        return self._table

    def _idle(self) -> bool:
        return self._last is None or self._last.handle.done()

    # -- save ----------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Snapshot ``checkpoint`` as step ``checkpoint["global_step"]`` and write it in the background."""
        if storage_options is not None:
            raise ckpt.CheckpointError(
                f"save_checkpoint({path!r}, storage_options=...) is not supported: pass the store's "
                "options to CkptCheckpointIO(url, storage_options=...)"
            )
        step = checkpoint.get("global_step")
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ckpt.CheckpointError(f"Lightning checkpoint {path!r} has no global_step to store it as: {step!r}")
        if RESERVED_KEY in checkpoint:
            raise ckpt.CheckpointError(f"Lightning checkpoint {path!r} has a key {RESERVED_KEY!r}, which ckpt reserves")
        key = pathmod.normalize(path)
        ck = self._checkpointer()
        signature = _signature(checkpoint)
        with self._lock:
            table = self._paths()
            self._flush_markers_if_idle()
            # ModelCheckpoint saves top-k and "last" back to back at one step: the same tensors,
            # unchanged; a weights-only save of a step holds less than its full checkpoint. Such a
            # save names the checkpoint of that step instead of replacing it.
            if self._covered(step, signature, set(checkpoint)):
                self._overwrote(table.add(key, step))
                self._note_dir(key)
                return
            previous = table.paths.get(key)
            self._overwrote(table.add(key, step))
            meta = table.to_meta()
        state = dict(checkpoint)
        live = optimizers.live(checkpoint.get("optimizer_states"))
        if "optimizer_states" in state:  # absent from save_checkpoint(weights_only=True)
            state["optimizer_states"] = live
        state[RESERVED_KEY] = {"rng": ckpt.RNG()}
        try:
            handle = ck.save(state, step=step, meta=meta)
        except ckpt.UnsupportedValueError as exc:
            with self._lock:
                self._unsave(table, key, previous)
            raise ckpt.UnsupportedValueError(
                f"Lightning checkpoint {path!r} (step {step}) holds a value ckpt cannot store without pickle: {exc}. "
                "Keep hyper-parameters JSON values (save_hyperparameters(ignore=[...]) for objects)"
            ) from None
        except BaseException:
            with self._lock:
                self._unsave(table, key, previous)
            raise
        optimizers.guarding(live if isinstance(live, list) else [], handle)
        with self._lock:
            self._last = _Saved(step, signature, frozenset(checkpoint), handle)
            self._note_dir(key)

    def _covered(self, step: int, signature: tuple, keys: set[str]) -> bool:
        """Whether this writer's latest checkpoint, of the same step, already holds what this save
        would: the same tensors, unchanged since; for a save of fewer keys (``weights_only``), the
        same model weights."""
        last = self._last
        if last is None or last.step != step or not keys <= last.keys:
            return False
        mine = set(signature) if keys == last.keys else {e for e in signature if e[0].startswith("/state_dict/")}
        if not mine <= set(last.signature):
            return False
        if last.handle.done():
            last.handle.wait()  # a failed save raises here, not silently named
        return True

    def _overwrote(self, step: int | None) -> None:
        if step is not None:
            self._doomed.add(step)

    def _unsave(self, table: PathTable, key: str, previous: int | None) -> None:
        """Undo the table entry of a save that failed to start."""
        table.pop(key)
        if previous is not None:
            table.add(key, previous)
            self._doomed.discard(previous)

    def _note_dir(self, key: str) -> None:
        directory = key.rsplit("/", 1)[0] if "://" in key else os.path.dirname(key)
        if directory not in self._marked and not pathmod.is_under(directory, self._root):
            self._marker_dirs.add(directory)

    # -- remove --------------------------------------------------------------------------
    def remove_checkpoint(self, path: Any) -> None:
        """Forget ``path``; its step is deleted (after the save in flight commits) once no path names it."""
        key = pathmod.normalize(path)
        with self._lock:
            table = self._paths()
            step = table.pop(key)
            if step is None:
                log.debug("remove_checkpoint(%s): no checkpoint of %s has this path", path, self.url)
                return
            if step not in table.referenced():
                self._doomed.add(step)
            idle = self._idle()
        if idle:
            ck = self._checkpointer()
            self._prune(ck)

    def _prune(self, ck: ckpt.Checkpointer) -> None:
        """Delete the doomed steps no path names. Only while no save of ``ck`` is in flight:
        after its commit (the hook), at teardown, or when idle."""
        with self._lock:
            self._doomed -= self._paths().referenced()
            doomed = set(self._doomed)
        if not doomed:
            return
        stored = set(ckpt.steps(self.url, self.storage_options))
        targets = doomed & stored
        removed: set[int] = set()
        if targets:
            from ckpt.storage import retention

            # No save of this writer is in flight, so no grace period: what only the deleted
            # checkpoints referenced goes now, except objects GC must leave to a live writer
            # (this one's lease included: those younger than CKPT_CLOCK_SKEW_SECONDS).
            result = retention.prune(ck.store, keep_last=1, protect=stored - targets, grace_seconds=0)
            removed = set(result.removed_steps)
            log.debug(
                "%s: deleted steps %s of %s (kept %s)", self.url, sorted(removed), sorted(targets), result.kept_steps
            )
        with self._lock:
            # A step held elsewhere (the writer's parent, a lease) stays doomed for the next prune.
            self._doomed -= removed | (doomed - stored)

    # -- after a commit (ckpt_after_commit, on the commit thread) -----------------------
    def _after_commit(self, info: ckpt.CheckpointInfo) -> None:
        ck, last = self._ck, self._last
        if ck is None or last is None or last.step != info.step or pathmod.normalize(info.url) != self._root:
            return
        try:
            self._write_markers()
            self._prune(ck)
        except Exception as exc:  # noqa: BLE001 - housekeeping: the commit stands
            log.warning("after committing step %d to %s: %s", info.step, self.url, exc)

    def _write_markers(self) -> None:
        with self._lock:
            pending = sorted(self._marker_dirs)
            self._marker_dirs.clear()
        if pending:
            pathmod.write_markers(pending, self.url)
            with self._lock:
                self._marked.update(pending)

    def _flush_markers_if_idle(self) -> None:
        # Without the plugin's hook (CKPT_DISABLE_PLUGINS) markers are written here instead.
        if self._marker_dirs and self._last is not None and self._last.handle.done():
            try:
                self._last.handle.wait()
            except ckpt.CheckpointError:
                return
            self._write_markers()

    # -- load ----------------------------------------------------------------------------
    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint ``path`` names, as the dict Lightning saved (tensors on ``map_location``).

        Nothing is unpickled whatever ``weights_only`` says; reading takes no writer lease. The
        process RNGs are restored (``restore_rng``) and the next save continues from this checkpoint.
        """
        if self._ck is not None:
            self._ck.wait()  # "latest" includes the save in flight
        step = self._resolve(path)
        tree = ckpt.load(self.url, step=step, storage_options=self.storage_options)
        extra = tree.pop(RESERVED_KEY, None)
        if self._ck is None:
            self._resumed = step
        else:
            self._ck.restore({}, step=step)
        if self.restore_rng:
            self._restore_rng(tree, extra, path)
        return _to_device(tree, map_location)

    def _resolve(self, path: Any) -> int:
        key = pathmod.normalize(path)
        with self._lock:
            step = self._paths().get(key)
        if step is not None:
            return step
        step = pathmod.step_in_store_path(key, self._root)
        if step is not None:
            return step
        if pathmod.names_last(key):
            if os.path.basename(key) == pathmod.MARKER_NAME:
                pathmod.check_marker(os.fspath(path), self.url)
            latest = ckpt.latest_step(self.url, self.storage_options)
            if latest is None:
                raise ckpt.NoCheckpointError(f"{path!r} names the latest checkpoint of {self.url}, which holds none")
            return latest
        step = pathmod.step_in_name(key)
        if step is not None and step in ckpt.steps(self.url, self.storage_options):
            return step
        raise ckpt.CheckpointError(
            f"{path!r} names no checkpoint of the ckpt store {self.url}: not a path this store recorded, "
            f"nor {self.path(0)!r}-style, nor a 'last' checkpoint"
        )

    def _restore_rng(self, tree: Mapping[str, Any], extra: Any, path: Any) -> None:
        states = extra.get("rng") if isinstance(extra, Mapping) else None
        if not isinstance(states, Mapping):
            log.warning("checkpoint %s holds no RNG states: the resumed run will not be bit-exact", path)
            return
        previous = rngmod.capture(states)
        try:
            rngmod.apply(states)
        except ckpt.CheckpointError:
            rngmod.apply(previous)  # states that do not fit change none of the RNGs
            raise
        # kept until training resumes: a resume Lightning refuses gets them back (teardown)
        self._rng.arm(states, previous, reapply=not _saved_at_epoch_end(tree))

    # -- lifecycle -----------------------------------------------------------------------
    def teardown(self) -> None:
        """Wait for the save in flight, finish pending deletions and markers, close the writer.

        Lightning calls it at the end of every run, and while handling the exception of a
        failed one: a run that failed before training resumed from the checkpoint loaded
        (Lightning refused it) gets back the process RNG states the load replaced."""
        self._rng.undo(_failing())
        self._resumed = None
        ck = self._ck
        if ck is None:
            return
        try:
            ck.wait()
            self._write_markers()
            self._prune(ck)
        finally:
            with self._lock:
                # The table stays: it names what this writer saved, aliases included, which only
                # the manifest of a later save would record.
                self._ck = None
            ck.close()


@dataclass(frozen=True)
class _Saved:
    """A save of this writer: its step, tensor signature, top-level keys and handle."""

    step: int
    signature: tuple
    keys: frozenset[str]
    handle: ckpt.SaveHandle


class _WriterBox:
    """Holds the Checkpointer of one CkptCheckpointIO."""

    def __init__(self) -> None:
        self.ck: ckpt.Checkpointer | None = None

    def close(self) -> None:
        ck, self.ck = self.ck, None
        if ck is not None:
            try:
                ck.close(raise_errors=False)
            except Exception as exc:  # noqa: BLE001 - at interpreter exit or collection: nothing to raise to
                log.debug("closing the writer of %s: %s", ck.url, exc)


#: CPU tensors up to this size are told apart by content: Lightning builds some anew for
#: every dict (a loader's generator state, a callback's score), equal but not the same tensor
_BY_CONTENT = 1 << 16


def _signature(checkpoint: Mapping[str, Any]) -> tuple:
    """What identifies the tensor contents of a checkpoint dict without reading the large ones:
    a tensor's storage, layout and version counter (bumped by every in-place change), or for a
    small CPU tensor its bytes."""
    out: list[tuple] = []

    def walk(value: Any, path: str) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu" and value.nbytes <= _BY_CONTENT:
                data = value.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                out.append((path, tuple(value.shape), value.dtype, data))
            else:
                out.append((path, value.data_ptr(), tuple(value.shape), value.stride(), value.dtype, value._version))
        elif isinstance(value, Mapping):
            for k, v in value.items():
                walk(v, f"{path}/{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{path}/{i}")

    walk(checkpoint, "")
    return tuple(out)


def _failing() -> BaseException | None:
    """The exception the run is failing with, when Lightning tears it down while handling one.

    Lightning's tuner ends a ``fit`` it ran with ``_TunerExitException`` right after restoring
    its own checkpoint: that run did not fail."""
    exc = sys.exc_info()[1]
    if exc is None or any(c.__name__ == "_TunerExitException" for c in type(exc).__mro__):
        return None
    return exc


def _saved_at_epoch_end(tree: Mapping[str, Any]) -> bool:
    try:
        return bool(tree["loops"]["fit_loop"]["epoch_loop.batch_progress"]["is_last_batch"])
    except (KeyError, TypeError):
        return True  # not a fit checkpoint: the states applied at load are all there is


def _to_device(tree: Any, map_location: Any) -> Any:
    """Tensors (loaded on the CPU) moved as ``torch.load``'s ``map_location`` would."""
    if map_location is None or (isinstance(map_location, (str, torch.device)) and str(map_location) == "cpu"):
        return tree
    move: Callable[[torch.Tensor], torch.Tensor]
    if isinstance(map_location, (str, torch.device)):
        device = torch.device(map_location)
        move = lambda t: t.to(device)  # noqa: E731
    elif isinstance(map_location, Mapping):
        target = map_location.get("cpu", "cpu")
        move = lambda t: t.to(target)  # noqa: E731
    elif callable(map_location):
        fn = map_location
        move = lambda t: fn(t, "cpu")  # noqa: E731
    else:
        raise ckpt.CheckpointError(f"map_location {map_location!r} is not a device, mapping or function")

    def walk(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return move(value)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, tuple):
            return tuple(walk(v) for v in value)
        return value

    return walk(tree)

"""``ckpt.Checkpointer`` under an initialized default group of several ranks.

``ckpt.Checkpointer(url, ...)`` returns a :class:`DistributedCheckpointer` there; every rank
constructs it (collectively, in the same order as its other collectives) with the same
arguments. :meth:`~DistributedCheckpointer.save` stages locally on each rank: the tree is
captured and encoded, tensors hashed and copied to host memory (DTensors as their local
shard), and the call returns. One background thread per rank then runs the commit protocol
of :mod:`ckpt.distributed.coordinator` over a gloo group created for this Checkpointer at
construction (``dist.new_group``), never the training's group: training collectives
(all_reduce, FSDP's all-gathers) run concurrently without any ordering between the two.

Saves commit in order; a save requested while one is in flight waits for it (``if_busy``
is always "wait": skipping on one rank only would desynchronize the ranks, so "skip" is
refused). The store's writer lease is taken by rank 0 for each commit; with ``keep_last``
/ ``keep_every`` rank 0 prunes (:func:`ckpt.storage.retention.prune`, with that lease) after
each commit, keeping the restored step as well. A failure on any rank is raised on every
rank by the next ``save``/``step``/``wait``/``close`` (or logged with ``on_error="warn"``).

:meth:`~DistributedCheckpointer.resume` restores collectively and handles preemption
signals on every rank (:mod:`ckpt.distributed.preempt`). Not supported with several ranks
yet, refused at construction with a CheckpointError: ``max_host_memory`` (every tensor is
staged in host memory at once) and ``if_busy="skip"``.

With ``local=`` (``persist_every``, ``local_keep_last``, ``local_storage_options``) every
save commits to each rank's own local tier and steps divisible by ``persist_every`` go on
to ``url`` as global collective checkpoints in the background
(:mod:`ckpt.distributed.tier_run`); ``restore``/``resume`` take the newest checkpoint
across the tiers (:mod:`ckpt.distributed.tier_restore`). ``keep_last``/``keep_every``
then apply to the durable tier, ``local_keep_last`` to each rank's local tier. With
``encryption`` too, every rank's local tier and the durable tier share one encryption
descriptor, agreed collectively at construction (:mod:`ckpt.distributed.tier_crypto`).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Mapping, MutableMapping
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from ckpt import config
from ckpt.errors import CheckpointError, NoCheckpointError
from ckpt.hooks.manager import get_plugins
from ckpt.security.keys import Encryption
from ckpt.state.dataloader import track_all
from ckpt.storage import retention
from ckpt.storage.manifest import check_step
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo

from . import interrupts
from .coordinator import capture_local, commit_collective
from .exchange import Failed
from .preempt import Preemption
from .tier_run import TierRun, check_args

log = logging.getLogger("ckpt")


class DistributedCheckpointer:
    """Asynchronous collective checkpoints (see the module docstring).

    Takes the arguments of :class:`ckpt.Checkpointer`; those not supported with several
    ranks yet raise a CheckpointError (see the module docstring), none is ignored.
    """

    def __init__(
        self,
        url: str,
        *,
        every: int | None = None,
        storage_options: dict[str, Any] | None = None,
        on_error: str = "raise",
        state: MutableMapping[str, Any] | None = None,
        encryption: Encryption | None = None,
        keep_last: int | None = None,
        keep_every: int | None = None,
        take_over: bool | None = None,
        preempt_exit_code: int = 0,
        preempt_deadline: float | None = None,
        local: str | None = None,
        persist_every: int | None = None,
        local_keep_last: int | None = 2,
        local_storage_options: dict[str, Any] | None = None,
        local_compress: bool = False,
        **unsupported: Any,
    ) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise CheckpointError(f"every must be a positive int, got {every!r}")
        if on_error not in ("raise", "warn"):
            raise CheckpointError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        _refuse(unsupported)
        check_args(local, persist_every, local_keep_last, local_storage_options)
        self.store = Store(url, storage_options)
        self._encryption = encryption  # each commit opens the store with it (rank 0 first)
        self.url = self.store.url
        self.every = every
        self.on_error = on_error
        self._state = state
        self._plugins = get_plugins()
        # collective: every rank constructs its Checkpointer at the same point
        self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=config.dist_timeout_seconds()))
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ckpt-dist-commit")
        self._inflight: Future[CheckpointInfo] | None = None
        self._pending: CheckpointError | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.keep_last, self.keep_every, self.take_over = keep_last, keep_every, take_over
        self._restored_step: int | None = None
        self._last_step: int | None = None
        self._last_saved_step: int | None = None
        deadline = config.preempt_deadline_seconds() if preempt_deadline is None else preempt_deadline
        # collective too: the per-step preemption check must not interleave with commits
        self._preempt = Preemption(
            dist.new_group(backend="gloo", timeout=timedelta(seconds=config.dist_timeout_seconds())),
            deadline,
            preempt_exit_code,
            lambda: f"step {self._last_step} of {self.url}",
        )
        self._in_resume = False
        #: the local tiers (``local=``; :mod:`ckpt.distributed.tier_run`), None without
        self.tiers: TierRun | None = None
        if local is not None:
            self.tiers = TierRun(
                local,
                self.store,
                self._group,
                self._plugins,
                persist_every=persist_every,
                keep_last=local_keep_last,
                storage_options=local_storage_options,
                compress=local_compress,
                take_over=take_over,
                on_done=self._done,
                prune=self._prune,
                encryption=encryption,
            )

    def __enter__(self) -> DistributedCheckpointer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(raise_errors=exc[0] is None)

    def save(self, state: Mapping[str, Any] | None = None, *, step: int, **_: Any) -> Future[CheckpointInfo]:
        """Stage ``state`` as ``step`` on this rank and commit it in the background; returns a future."""
        if self._closed:
            raise CheckpointError(f"Checkpointer of {self.url} is closed")
        check_step(step)
        if _.get("meta") is not None:
            raise CheckpointError("Checkpointer.save(meta=...) is not supported with several ranks yet")
        state = self._state if state is None else state
        if state is None:
            raise CheckpointError("Checkpointer.save() needs a state")
        err: BaseException | None = None
        interrupted: BaseException | None = None
        part: Any = None
        local: dict[str, torch.Tensor] = {}
        try:
            self._wait_inflight()
        except BaseException as exc:  # noqa: BLE001 - a KeyboardInterrupt while the last commit runs
            interrupted = exc
        if interrupted is None:
            self._raise_pending()  # the same on every rank: their commits' outcomes are agreed
            try:
                part, local = capture_local(state, self._plugins)
                # local staging: the training may change its tensors as soon as this returns
                local = {p: t.detach().to("cpu", copy=True) for p, t in local.items()}
            except BaseException as exc:  # noqa: BLE001 - reported to every rank by the background commit
                err, part = exc, Failed(dist.get_rank(), exc)
                if not isinstance(exc, Exception):
                    interrupted = exc
        if interrupted is not None:  # the other ranks learn of it from this step's commit, queued all the same
            part = Failed(dist.get_rank(), interrupted)
            err = CheckpointError(f"step {step}: {type(interrupted).__name__} on this rank")
        self._last_saved_step = step
        if self.tiers is not None:
            protect = {self._restored_step} if self._restored_step is not None else set()
            fut = self._thread.submit(self.tiers.commit, step, part, local, err, self.tiers.next_save(), protect)
        else:
            fut = self._thread.submit(
                commit_collective,
                self.store,
                self._plugins,
                self._group,
                step=step,
                part=part,
                local=local,
                err=err,
                encryption=self._encryption,
                take_over=self.take_over,
                after=self._prune,
            )
        fut.add_done_callback(self._done)
        self._inflight = fut
        if interrupted is not None:  # the background commit tells the other ranks; this one stops
            raise interrupted
        return fut

    def wait_persisted(self) -> None:
        """Wait for the save in flight and the background persist to the durable tier (with
        ``local=``); raise a failure of either on any rank."""
        self._wait_inflight()
        if self.tiers is not None:
            self.tiers.wait()
        self._raise_pending()

    def _prune(self, lease: WriterLease, info: CheckpointInfo) -> None:
        """On the coordinator after each commit, with its writer lease: retention."""
        if self.keep_last is None and self.keep_every is None:
            return
        protect = {s for s in (self._restored_step, info.step) if s is not None}
        retention.prune(self.store, keep_last=self.keep_last, keep_every=self.keep_every, protect=protect, writer=lease)

    def _done(self, fut: Future[CheckpointInfo]) -> None:
        exc = fut.exception()
        if exc is None:
            return
        error = exc if isinstance(exc, CheckpointError) else CheckpointError(f"{type(exc).__name__}: {exc}")
        if self.on_error == "warn":
            log.warning("background collective save to %s failed: %s", self.url, error)
            return
        with self._lock:
            self._pending = self._pending or error

    def _wait_inflight(self) -> None:
        fut = self._inflight
        if fut is not None:
            fut.exception()  # waits

    def _raise_pending(self) -> None:
        with self._lock:
            error, self._pending = self._pending, None
        if error is not None:
            raise error

    def step(self, step: int) -> None:
        """Save when ``step`` is a multiple of ``every`` (with the state given at construction).

        Inside :meth:`resume`: after SIGTERM/SIGUSR1 on any rank, every rank saves this step,
        waits for the commit and exits with ``preempt_exit_code`` (one small all-reduce per
        call, :mod:`ckpt.distributed.preempt`).
        """
        self._last_step = step
        if self._in_resume and self._preempt.agreed(step):
            log.warning("%s: saving step %d to %s on every rank and exiting", self._preempt.signal, step, self.url)
            if self._last_saved_step != step:
                self.save(step=step)
            self.close()
            self._preempt.committed = True
            raise SystemExit(self._preempt.exit_code)
        if self.every is not None and step % self.every == 0:
            self.save(step=step)
        else:
            self._raise_pending()

    def wait(self) -> CheckpointInfo | None:
        """Wait for the save in flight; raise a failure of any rank."""
        fut = self._inflight
        self._wait_inflight()
        self._raise_pending()
        return None if fut is None or fut.exception() is not None else fut.result()

    @interrupts.deferred()  # a Ctrl-C in the restore's last exchange is raised after this rank's bookkeeping
    def restore(self, state: MutableMapping[str, Any] | None = None, step: int | None = None) -> CheckpointInfo:
        """Collective restore (after the save in flight), as ``ckpt.restore``."""
        from .exchange import ckpt_group, entering
        from .restore import restore

        # (left at a second Ctrl-C while it waits, the restore's first gather still tells the others)
        entering(ckpt_group(), f"restore of {self.url}")
        self.wait()
        state = self._state if state is None else state
        if state is None:
            raise CheckpointError("Checkpointer.restore() needs a state")
        if self.tiers is None:
            info = restore(self.url, state, step=step, encryption=self._encryption)
            self._restored_step = info.step
            return info
        from .tier_restore import restore_tiers

        self.wait_persisted()
        done = restore_tiers(self.tiers.tier, self.store, self._plugins, ckpt_group(), state, step=step)
        c = done.candidate
        self._restored_step = c.step
        self.tiers.restored(c.step, c.save, durable=c.durable, local_manifest=done.local_manifest)
        return done.info

    def resume(self, state: MutableMapping[str, Any] | None = None, /, **objects: Any) -> Callable:
        """Decorator, as :meth:`ckpt.Checkpointer.resume`, on every rank: restore the newest
        checkpoint collectively (start 0 on an empty store), call ``fn(start_step)``, then
        save the last step and wait; preemption signals stop every rank at the same step."""
        merged: dict[str, Any] = dict(state or {})
        merged.update(objects)
        if not merged:
            raise CheckpointError("resume() needs the objects to checkpoint, e.g. resume(model=model, optim=opt)")

        def decorate(fn: Callable) -> Callable:
            @functools.wraps(fn)
            def run(*args: Any, **kwargs: Any) -> Any:
                self._state = merged
                track_all(merged)
                try:
                    try:
                        start = self.restore(merged).step
                    except NoCheckpointError:  # on every rank
                        if self.store.steps():  # a store holding checkpoints never starts over
                            raise
                        start = 0
                    self._last_saved_step = start if start else None
                    self._preempt.install()
                    self._in_resume = True
                except BaseException:  # a resume that cannot start leaves nothing running
                    self.close(raise_errors=False)
                    raise
                try:
                    result = fn(start, *args, **kwargs)
                except BaseException:  # incl. the SystemExit of a preemption
                    self.close(raise_errors=False)
                    raise
                finally:
                    self._in_resume = False
                    self._preempt.uninstall()
                if self._last_step is not None and self._last_saved_step != self._last_step:
                    self.save(step=self._last_step)
                self.close()
                self._preempt.committed = self._preempt.signal is not None
                return result

            return run

        return decorate

    def latest_step(self) -> int | None:
        return self.store.latest_step()

    def close(self, *, raise_errors: bool = True) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._wait_inflight()
        finally:
            self._thread.shutdown(wait=True)
            if self.tiers is not None:
                err = self.tiers.close(persist=raise_errors)  # logged there
                if self.on_error == "raise":
                    with self._lock:
                        self._pending = self._pending or err
        if raise_errors:
            self._raise_pending()


#: arguments of ckpt.Checkpointer not supported with several ranks yet (refused, never ignored)
_UNSUPPORTED = {
    "max_host_memory": (None,),
    "if_busy": ("wait",),
}


def _refuse(args: Mapping[str, Any]) -> None:
    unknown = sorted(set(args) - set(_UNSUPPORTED))
    if unknown:
        raise TypeError(f"Checkpointer() got unexpected keyword arguments {', '.join(unknown)}")
    bad = [f"{k}={v!r}" for k, v in args.items() if v not in _UNSUPPORTED[k]]
    if bad:
        raise CheckpointError(
            f"Checkpointer: {', '.join(bad)} not supported with several ranks yet (see ckpt.distributed.checkpointer)"
        )

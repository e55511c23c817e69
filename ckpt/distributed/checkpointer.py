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
staged in host memory at once), ``if_busy="skip"``, and ``encryption`` together with a
local tier.

With ``local=`` (``persist_every``, ``local_keep_last``, ``local_storage_options``) every
save commits, on the commit thread, each rank's part to its own local tier
(:mod:`ckpt.distributed.tiers`; the outcomes are gathered, so a failure on any rank raises
on every rank); a step divisible by ``persist_every`` is then committed as the global
collective checkpoint to ``url`` from the same staged host copy, on a second background
thread over a second gloo group (skipped on every rank, logged, while the previous persist
still runs on any rank). ``close()`` (the end of ``resume``, a preemption) persists the
newest local checkpoint, read back from the local tier, unless the durable tier holds it;
``close(raise_errors=False)`` (an error path, where the ranks may be out of step) persists
nothing. ``restore``/``resume`` use :func:`ckpt.distributed.tier_restore.restore_tiers`.
``keep_last``/``keep_every`` then apply to the durable tier, ``local_keep_last`` to each
rank's local tier.
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
from ckpt.storage.commit import new_run_id
from ckpt.storage.manifest import check_step
from ckpt.storage.store import Store
from ckpt.storage.writer_lease import WriterLease
from ckpt.types import CheckpointInfo

from .coordinator import _Failed, capture_local, check_parts, commit_collective, gather_all
from .preempt import Preemption
from .tiers import META as TIER_META
from .tiers import RankTier, part_from_local

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
        **unsupported: Any,
    ) -> None:
        if every is not None and (not isinstance(every, int) or every < 1):
            raise CheckpointError(f"every must be a positive int, got {every!r}")
        if on_error not in ("raise", "warn"):
            raise CheckpointError(f"on_error must be 'raise' or 'warn', got {on_error!r}")
        _refuse(unsupported)
        _check_tier(local, persist_every, local_keep_last, local_storage_options, encryption)
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
        #: this rank's local tier (``local=``; :mod:`ckpt.distributed.tiers`), None without one
        self.tier: RankTier | None = None
        self.persist_every = persist_every
        if local is not None:
            self._init_tier(local, persist_every, local_keep_last, local_storage_options, encryption)

    def _init_tier(
        self,
        local: str,
        persist_every: int | None,
        keep_last: int | None,
        storage_options: dict[str, Any] | None,
        encryption: Encryption | None,
    ) -> None:
        # collective, like the groups above: the save ids of this run, shared by every rank
        run = [new_run_id()]
        dist.broadcast_object_list(run, src=0, group=self._group)
        self._run, self._saves = str(run[0]), 0
        self._persist_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=config.dist_timeout_seconds()))
        self._persist_pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-dist-persist")
        self._persisting: Future[CheckpointInfo] | None = None
        #: (step, save id) of the newest local checkpoint and of the newest one persisted
        self._newest: tuple[int, str] | None = None
        self._persisted: tuple[int, str] | None = None
        #: the save id this run restored from (recorded by its saves: newer than it, whatever the clocks)
        self._base: str | None = None
        err: BaseException | None = None
        try:
            self.tier = RankTier(
                local,
                self.store,
                rank=dist.get_rank(),
                world=dist.get_world_size(),
                keep_last=keep_last,
                storage_options=storage_options,
                take_over=self.take_over,
            )
            out: Any = True
        except Exception as exc:  # noqa: BLE001 - refused on every rank
            err, out = exc, _Failed(dist.get_rank(), exc)
        what = f"opening the local tiers of {self.url}"
        outs = gather_all(self._group, out, what)
        if err is None and any(isinstance(o, _Failed) for o in outs) and self.tier is not None:
            self.tier.close()
        check_parts(outs, err, what)

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
        self._wait_inflight()
        self._raise_pending()
        err: BaseException | None = None
        part: Any
        local: dict[str, torch.Tensor] = {}
        try:
            part, local = capture_local(state, self._plugins)
            # local staging: the training may change its tensors as soon as this returns
            local = {p: t.detach().to("cpu", copy=True) for p, t in local.items()}
        except Exception as exc:  # noqa: BLE001 - reported to every rank by the background commit
            err, part = exc, _Failed(dist.get_rank(), exc)
        self._last_saved_step = step
        if self.tier is not None:
            self._saves += 1
            fut = self._thread.submit(self._commit_local, step, part, local, err, f"{self._run}-{self._saves}")
            fut.add_done_callback(self._done)
            self._inflight = fut
            return fut
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
        return fut

    # -- the local tier ------------------------------------------------------------------------
    def _commit_local(
        self, step: int, part: Any, local: dict[str, torch.Tensor], err: BaseException | None, save: str
    ) -> CheckpointInfo:
        """On the commit thread: every rank commits its part to its local tier (the outcomes are
        gathered: a failure on any rank raises on every rank), then persists when due, unless
        a persist is still running on some rank: then every rank skips this one (logged), as
        the one-process tiers replace a waiting request, so training never waits on the durable tier."""
        assert self.tier is not None
        rank = dist.get_rank()
        info: Any = None
        busy = self._persisting is not None and not self._persisting.done()
        out: Any = part if err is not None else busy
        if err is None:
            try:
                protect = {self._restored_step} if self._restored_step is not None else set()
                info = self.tier.commit(
                    self._plugins, step=step, part=part, tensors=local, save=save, base=self._base, protect=protect
                )
            except Exception as exc:  # noqa: BLE001 - reported to every rank
                err, out = exc, _Failed(rank, exc)
        what = f"saving step {step} to the local tiers of {self.url}"
        outs = gather_all(self._group, out, what)
        check_parts(outs, err, what)
        self._newest = (step, save)
        if self.persist_every is not None and step % self.persist_every == 0:
            if any(outs):
                log.warning(
                    "persisting step %d to %s skipped: the durable tier is still busy with the one before",
                    step,
                    self.url,
                )
                return info
            prev = self._persisting
            if prev is not None:  # done on every rank (its error is pending already)
                prev.exception()
            fut = self._persist_pool.submit(self._persist, step, part, local, save)
            fut.add_done_callback(self._done)
            self._persisting = fut
        return info

    def wait_persisted(self) -> None:
        """Wait for the save in flight and the background persist to the durable tier (with
        ``local=``); raise a failure of either on any rank."""
        self._wait_inflight()
        fut = self._persisting if self.tier is not None else None
        if fut is not None:
            fut.exception()
        self._raise_pending()

    def _persist(
        self, step: int, part: Any, local: Mapping[str, torch.Tensor], save: str, err: BaseException | None = None
    ) -> CheckpointInfo:
        """The global collective checkpoint of save ``save`` to the durable tier (its own group)."""
        info = commit_collective(
            self.store,
            self._plugins,
            self._persist_group,
            step=step,
            part=part,
            local=local,
            err=err,
            take_over=self.take_over,
            after=self._prune,
            meta={TIER_META: {"save": save, "base": self._base}},
        )
        self._persisted = (step, save)
        log.info("persisted step %d to the durable tier %s", step, self.url)
        return info

    def _close_tier(self, persist: bool) -> None:
        """Finish the persists, persist the newest local checkpoint (read back from the local
        tier), release the local tier."""
        assert self.tier is not None
        try:
            if self._persisting is not None:
                self._persisting.exception()
            newest = self._newest
            if newest is None or newest == self._persisted:
                return
            if not persist:
                log.warning(
                    "closing after an error: step %d of the local tiers is not persisted to %s", newest[0], self.url
                )
                return
            err: BaseException | None = None
            part: Any
            tensors: dict[str, torch.Tensor] = {}
            try:
                part, tensors = part_from_local(self.tier.store, self._plugins, self.tier.load(newest[0]))
            except Exception as exc:  # noqa: BLE001 - reported to every rank
                err, part = exc, _Failed(dist.get_rank(), exc)
            try:
                self._persist_pool.submit(self._persist, newest[0], part, tensors, newest[1], err).result()
            except CheckpointError as exc:  # the local checkpoint stands
                log.error("persisting the newest local checkpoint (step %d) to %s failed: %s", newest[0], self.url, exc)
                with self._lock:
                    self._pending = self._pending or exc
        finally:
            self._persist_pool.shutdown(wait=True)
            self.tier.close()

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

    def restore(self, state: MutableMapping[str, Any] | None = None, step: int | None = None) -> CheckpointInfo:
        """Collective restore (after the save in flight), as ``ckpt.restore``."""
        from .restore import restore

        self.wait()
        state = self._state if state is None else state
        if state is None:
            raise CheckpointError("Checkpointer.restore() needs a state")
        if self.tier is None:
            info = restore(self.url, state, step=step, encryption=self._encryption)
            self._restored_step = info.step
            return info
        from .coordinator import ckpt_group
        from .tier_restore import restore_tiers

        if self._persisting is not None:
            self._persisting.exception()
        self._raise_pending()
        done = restore_tiers(self.tier, self.store, self._plugins, ckpt_group(), state, step=step)
        c = done.candidate
        self._restored_step = c.step
        self.tier.restored(done.local_manifest)
        self._base = c.save
        if c.save is not None:
            self._newest = (c.step, c.save)  # persisted at close unless the durable tier holds it
            if c.durable:
                self._persisted = self._newest
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
            if self.tier is not None:
                self._close_tier(persist=raise_errors)
        if raise_errors:
            self._raise_pending()


#: arguments of ckpt.Checkpointer not supported with several ranks yet (refused, never ignored)
_UNSUPPORTED = {
    "max_host_memory": (None,),
    "if_busy": ("wait",),
}


def _check_tier(
    local: str | None, persist_every: Any, keep_last: Any, options: Any, encryption: Encryption | None
) -> None:
    if local is None:
        given = [
            name
            for name, value, default in (
                ("persist_every", persist_every, None),
                ("local_keep_last", keep_last, 2),
                ("local_storage_options", options, None),
            )
            if value != default
        ]
        if given:
            raise CheckpointError(f"Checkpointer: {', '.join(given)} needs a local tier (local=...), none is given")
        return
    if encryption is not None:
        raise CheckpointError(
            "Checkpointer: encryption with a local tier is not supported with several ranks yet "
            "(see ckpt.distributed.checkpointer)"
        )
    if persist_every is not None and (
        isinstance(persist_every, bool) or not isinstance(persist_every, int) or persist_every < 1
    ):
        raise CheckpointError(f"persist_every must be a positive int, got {persist_every!r}")


def _refuse(args: Mapping[str, Any]) -> None:
    unknown = sorted(set(args) - set(_UNSUPPORTED))
    if unknown:
        raise TypeError(f"Checkpointer() got unexpected keyword arguments {', '.join(unknown)}")
    bad = [f"{k}={v!r}" for k, v in args.items() if v not in _UNSUPPORTED[k]]
    if bad:
        raise CheckpointError(
            f"Checkpointer: {', '.join(bad)} not supported with several ranks yet (see ckpt.distributed.checkpointer)"
        )

"""The writer lease: one live writer per store, and what it holds from garbage collection.

A live writer (a :class:`~ckpt.Checkpointer` while open, a plain ``ckpt.save`` for the
duration of the call, ``ckpt import``; in a distributed run, its coordinator) holds
``leases/writer.json`` (a :class:`ckpt.storage.leases.LeaseRecord`) and rewrites it every
heartbeat (``CKPT_WRITER_LEASE_SECONDS`` / 10, at most 1 s) from a thread of its own. A
second writer gets a :class:`CheckpointError` naming the holder (host, pid, since), except:

- the holder is a dead process on this host (same host name, boot id and pid namespace;
  pid gone, a zombie, or a pid reused by a younger process): taken over at once, so a job
  restarted after a kill resumes immediately;
- the holder is on another host and its heartbeat does not move for
  ``CKPT_WRITER_LEASE_SECONDS`` (10) of this process's own clock: taken over then. A
  heartbeat already older than that by the wall clock (plus ``CKPT_CLOCK_SKEW_SECONDS``)
  is confirmed dead by two quiet heartbeat periods instead. A heartbeat that moves while
  watched means a live writer: refused at once;
- the operator said so: ``take_over=True``, ``CKPT_WRITER_TAKE_OVER=1`` or ``ckpt unlock``.

Taking is race-free enough on object stores without a conditional write: read, write our
record, wait a moment (four times as long as that write took, within 20 ms..1 s), read it
back and compare the writer id; of two writers taking the lease at once the last write
wins and the other is refused. The residual window is a taker stalled for longer than
that moment between its read and its write. On a local disk a free lease is created
atomically instead (a hard link never replaces an existing name), with no wait. The heartbeat reads before it writes, so a holder whose lease was taken over
(it stalled past the staleness bound, or an operator unlocked it) notices at its next
heartbeat, and :meth:`WriterLease.check` (in every :meth:`~WriterLease.protect`, so
before each save and after each commit) refuses to go on: a writer that lost its lease
saves and prunes nothing more.

What the lease holds: before each save the writer names the checkpoint it continues from
(whose objects it reuses) and the step in flight (:meth:`WriterLease.saving`); after the
commit, the step just committed (:meth:`WriterLease.committed`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ckpt import config
from ckpt.errors import CheckpointError
from ckpt.storage.leases import WRITER, LeaseRecord, local_state, read_lease, this_process
from ckpt.storage.manifest import Manifest, check_step
from ckpt.storage.store import Store

log = logging.getLogger("ckpt")

#: bounds of the wait between writing a taken lease and reading it back (see the module docstring)
SETTLE_SECONDS = (0.02, 1.0)


def writer_lease_path(store: Store) -> str:
    return store.path("leases", "writer.json")


def heartbeat_seconds() -> float:
    """How often a writer rewrites its lease: a tenth of the staleness bound, within 0.05..1 s."""
    return min(1.0, max(0.05, config.writer_lease_seconds() / 10))


@dataclass
class _State:
    protect: tuple[int, ...] = ()
    in_flight: int | None = None
    in_flight_since: float | None = None
    lost: str | None = None
    released: bool = False


class WriterLease:
    """The store's one live writer: taken on construction, heartbeated until :meth:`release`.

    :param take_over: take the lease whoever holds it (operators only: a live holder then
        fails at its next save). Default: ``CKPT_WRITER_TAKE_OVER``.
    :param what: who writes, for messages ("Checkpointer", "ckpt.save", "ckpt import").
    :raises CheckpointError: another live writer holds the lease (named in the message).

    A writer names what it needs kept: :meth:`saving` before each save (the parent it
    reuses objects of, and the step in flight), :meth:`protect` otherwise.
    """

    def __init__(self, store: Store | str, *, take_over: bool | None = None, what: str = "writer") -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.id = uuid.uuid4().hex
        self.what = what
        self.since = time.time()
        self._lock = threading.Lock()
        self._state = _State()
        self._stop = threading.Event()
        self._acquire(config.writer_take_over() if take_over is None else bool(take_over))
        self._thread = threading.Thread(target=self._beat_loop, name="ckpt-lease-heartbeat", daemon=True)
        self._thread.start()

    @property
    def path(self) -> str:
        return writer_lease_path(self.store)

    def __repr__(self) -> str:
        return f"WriterLease({self.store.url!r}, id={self.id}, protect={self._state.protect})"

    def __enter__(self) -> WriterLease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # -- taking ---------------------------------------------------------------------------
    def _read(self) -> LeaseRecord | None:
        try:
            return read_lease(self.store, self.path)
        except ValueError as exc:
            log.warning("the writer lease of %s is unreadable (%s): treating it as free", self.store.url, exc)
            return None

    def _refused(self, holder: LeaseRecord, why: str) -> CheckpointError:
        me = " (this process)" if holder.holder == this_process() else ""
        return CheckpointError(
            f"{self.store.url} already has a live writer: {holder.describe()}{me}; {why}. One writer per "
            f"store: close it first, or take over (take_over=True, CKPT_WRITER_TAKE_OVER=1, or `ckpt unlock "
            f"{self.store.url}`) if it is really gone"
        )

    def _acquire(self, take_over: bool) -> None:
        stale = config.writer_lease_seconds()
        beat = heartbeat_seconds()
        watched: tuple[tuple[str, float], float] | None = None  # (id, heartbeat) seen, and when first
        while True:
            try:
                current = read_lease(self.store, self.path)
            except ValueError as exc:
                # Not "free": creating ours beside it fails as long as it is there. A newer
                # ckpt's live writer may hold it (its format unknown here): one writer per store.
                if not take_over:
                    raise CheckpointError(
                        f"the writer lease {self.path} of {self.store.url} is unreadable ({exc}): a newer ckpt's "
                        f"writer may hold it, or it is damaged. One writer per store: `ckpt unlock {self.store.url}` "
                        "removes it, take_over=True (CKPT_WRITER_TAKE_OVER=1) takes it over"
                    ) from None
                log.warning("%s takes over the unreadable writer lease of %s (%s)", self.what, self.store.url, exc)
                break
            if current is None:
                created = self._create_local() if self.store.local else None
                if created is None:
                    break
                if created:
                    log.debug("%s holds the writer lease of %s", self.what, self.store.url)
                    return
                continue  # another writer created it meanwhile: judge that one
            if take_over:
                log.warning(
                    "%s takes over the writer lease of %s from %s", self.what, self.store.url, current.describe()
                )
                break
            alive = local_state(current.holder)
            if alive is False:
                log.warning(
                    "taking over the writer lease of %s from a dead process: %s", self.store.url, current.describe()
                )
                break
            if alive:
                raise self._refused(current, "it runs on this host")
            # Another host: judge its heartbeat by this clock, watching whether it moves.
            seen = (current.id, current.heartbeat)
            now = time.monotonic()
            if watched is None:
                watched = (seen, now)
            elif watched[0] != seen:
                raise self._refused(current, "its heartbeat moves")
            quiet = now - watched[1]
            old = time.time() - current.heartbeat >= stale + config.clock_skew_seconds()
            if quiet >= stale or (old and quiet >= 2 * beat):
                log.warning(
                    "taking over the writer lease of %s: its heartbeat stopped (%s; CKPT_WRITER_LEASE_SECONDS=%g)",
                    self.store.url,
                    current.describe(),
                    stale,
                )
                break
            time.sleep(min(beat, stale - quiet) if not old else beat)
        began = time.monotonic()
        self._write()
        try:
            low, high = SETTLE_SECONDS
            time.sleep(min(high, max(low, 4 * (time.monotonic() - began))))
            back = self._read()
        except BaseException:
            # our file is on the store and nobody would release it: this live process
            # would then refuse every later writer
            self._delete_if_ours()
            raise
        if back is None or back.id != self.id:
            raise CheckpointError(
                f"another writer took the writer lease of {self.store.url} at the same moment"
                + (f": {back.describe()}" if back is not None else "")
            )
        log.debug("%s holds the writer lease of %s", self.what, self.store.url)

    def _delete_if_ours(self) -> None:
        try:
            current = self._read()
            if current is not None and current.id == self.id:
                self.store.delete(self.path)
        except Exception as exc:  # noqa: BLE001 - already failing: the first error is the one to raise
            log.warning("could not remove the writer lease of %s after a failed take-over: %s", self.store.url, exc)

    def _record(self) -> LeaseRecord:
        s = self._state
        return LeaseRecord(
            path=self.path,
            kind=WRITER,
            id=self.id,
            holder=this_process(),
            since=self.since,
            heartbeat=time.time(),
            protect=s.protect,
            in_flight=s.in_flight,
            in_flight_since=s.in_flight_since,
        )

    def _body(self) -> bytes:
        doc = self._record().to_json()
        doc["what"] = self.what
        return json.dumps(doc).encode()

    def _write(self) -> None:
        self.store.write(self.path, self._body())

    def _create_local(self) -> bool | None:
        """Create the lease file where there is none, atomically: True when created, False when
        another writer's exists, None where the file system has no hard links."""
        tmp = f"{self.path}.new-{self.id}"  # not *.json: never listed as a lease
        self.store.write(tmp, self._body())
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:
            return None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    # -- holding ----------------------------------------------------------------------------
    def _confirm(self) -> None:
        """Raise unless the lease file is still ours (lock held)."""
        s = self._state
        if s.released:
            raise CheckpointError(f"the writer lease of {self.store.url} was released")
        if s.lost is None:
            current = self._read()
            if current is None:
                s.lost = "its lease file was removed (ckpt unlock?)"
            elif current.id != self.id:
                s.lost = f"it was taken over by {current.describe()}"
        if s.lost is not None:
            raise CheckpointError(f"{self.what} is no longer the writer of {self.store.url}: {s.lost}; nothing saved")

    def check(self) -> None:
        """Raise a CheckpointError unless this is still the store's writer (one read)."""
        with self._lock:
            self._confirm()

    def protect(self, steps: Iterable[int], *, in_flight: int | None = None) -> None:
        """Hold ``steps`` from now on (replacing what was held); ``in_flight``: a save of that step
        starts now. Written at once, after checking that the lease is still ours."""
        held = tuple(sorted({check_step(s, "protected step") for s in steps}))
        with self._lock:
            self._confirm()
            self._state.protect = held
            self._state.in_flight = in_flight
            self._state.in_flight_since = time.time() if in_flight is not None else None
            self._write()

    def saving(self, step: int, parent: Manifest | None, *, keep: Iterable[int] = ()) -> None:
        """Before saving ``step`` on top of ``parent``: hold the parent (whose objects the save
        reuses) and the steps in ``keep``, and mark ``step`` in flight.

        The save must then confirm that the parent's manifest and the objects it reuses are
        still there (:func:`ckpt.io.writer.write_objects` does): a GC that read the leases
        before this call may have removed them already, never after.
        """
        held = [*keep] + ([parent.step] if parent is not None else [])
        self.protect(held, in_flight=step)

    def committed(self, step: int, *, keep: Iterable[int] = ()) -> None:
        """After committing ``step``: hold it (the next save's parent) and ``keep``; nothing in flight."""
        self.protect([step, *keep])

    @property
    def protected(self) -> tuple[int, ...]:
        return self._state.protect

    @property
    def lost(self) -> str | None:
        """Why this writer lost the lease (None: it holds it, as far as the last heartbeat knows)."""
        return self._state.lost

    def _beat_loop(self) -> None:
        while not self._stop.wait(heartbeat_seconds()):
            with self._lock:
                s = self._state
                if s.released or s.lost is not None:
                    return
                try:
                    self._confirm()
                    self._write()
                except CheckpointError as exc:
                    if s.lost is not None:
                        log.error("%s", exc)
                        return
                    log.warning("heartbeat of the writer lease of %s failed (retrying): %s", self.store.url, exc)

    def release(self) -> None:
        """Stop the heartbeat and remove the lease file if it is still ours (idempotent)."""
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join()
        with self._lock:
            s = self._state
            if s.released:
                return
            s.released = True
            if s.lost is not None:
                return
            current = self._read()
            if current is not None and current.id == self.id:
                self.store.delete(self.path)
                self.store.sync_dirs()

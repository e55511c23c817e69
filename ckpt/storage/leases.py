"""Leases: what live processes hold in a store, and what every garbage collection honours.

One mechanism, one file format, two kinds, in ``leases/``::

    leases/writer.json     the store's one live writer (ckpt.storage.writer_lease.WriterLease)
    leases/<uuid>.json     a claim on one checkpoint, with a time to live (Lease)

Every lease file is a small JSON document (:class:`LeaseRecord`): ``kind``, ``id``, the
holder (``host``, ``pid``, and where the OS tells them ``boot_id``, ``pidns`` and
``proc_start``: enough to tell a dead process on this host from a reused pid), ``since``,
``heartbeat``, ``protect`` (steps whose checkpoints, and so every object they reference,
GC keeps), and for a writer ``in_flight`` / ``in_flight_since`` (a save under way: GC
sweeps none of the objects written since it began). A lease is live
(:meth:`LeaseRecord.honoured`) until it expires (a step lease) or while its holder may
run (a writer lease: see :mod:`ckpt.storage.writer_lease`). How GC uses leases, and why
that keeps every committed checkpoint whole, is in :mod:`ckpt.storage.retention`.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ckpt import config
from ckpt.errors import CheckpointError, CorruptCheckpointError
from ckpt.storage.manifest import check_step
from ckpt.storage.store import Store

log = logging.getLogger("ckpt")

WRITER, STEP = "writer", "step"
#: a lease file is a few hundred bytes: anything much longer is not one
_MAX_LEASE_BYTES = 64 * 1024
#: at most this many steps in ``protect`` (a hostile file must not make GC read a million manifests)
_MAX_PROTECT = 1024


# -- who holds a lease ---------------------------------------------------------------------


@dataclass(frozen=True)
class Holder:
    """A process, identified well enough to tell whether it still runs (on this host)."""

    host: str
    pid: int
    #: ``/proc/sys/kernel/random/boot_id``: a pid from another boot is another process
    boot_id: str | None = None
    #: the pid namespace: pids of two containers on one kernel are not comparable
    pidns: str | None = None
    #: start time of the process (clock ticks since boot): a reused pid starts later
    proc_start: str | None = None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def _proc_stat(pid: int) -> tuple[str, str] | None:
    """``(state, start time)`` of ``pid`` from ``/proc``; ``("X", "")`` when it is gone; None without ``/proc``."""
    raw = _read_text(f"/proc/{pid}/stat")
    if raw is None:
        return ("X", "") if os.path.isdir("/proc/self") else None
    # the command name (field 2) may hold spaces and parentheses: fields after the last ")"
    rest = raw[raw.rfind(")") + 2 :].split()
    return (rest[0], rest[19]) if len(rest) > 19 else None


_ME: dict[int, Holder] = {}


def this_process() -> Holder:
    """This process as a lease holder (recomputed after a fork)."""
    pid = os.getpid()
    if pid not in _ME:
        stat = _proc_stat(pid)
        try:
            pidns: str | None = os.readlink("/proc/self/ns/pid")
        except OSError:
            pidns = None
        _ME[pid] = Holder(
            host=socket.gethostname(),
            pid=pid,
            boot_id=_read_text("/proc/sys/kernel/random/boot_id"),
            pidns=pidns,
            proc_start=stat[1] if stat else None,
        )
    return _ME[pid]


def local_state(holder: Holder) -> bool | None:
    """Whether ``holder`` runs: True or False when it is on this host, None when that cannot be told.

    "This host" needs the same host name and, where both are known, the same boot id and pid
    namespace: two machines (or containers) may share a name, and a reboot or another
    container makes the pid meaningless; those count as another host.
    """
    me = this_process()
    if holder.host != me.host:
        return None
    if holder.boot_id and me.boot_id and holder.boot_id != me.boot_id:
        return None
    if holder.pidns and me.pidns and holder.pidns != me.pidns:
        return None
    stat = _proc_stat(holder.pid)
    if stat is None:  # no /proc (macOS): signal 0 says whether the pid exists
        try:
            os.kill(holder.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state, start = stat
    if state in ("X", "Z"):  # gone, or a zombie its parent has not reaped yet
        return False
    return not (holder.proc_start and start and holder.proc_start != start)


# -- lease files ------------------------------------------------------------------------------


#: the latest time a lease may name (the end of year 9999, what a datetime can show): a
#: lease is untrusted input, and a time past it is no clock's
_MAX_TIME = 253402300799.0


def _iso(t: float) -> str:
    try:
        return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):  # (a parsed lease's times are in range)
        return f"{t!r} (not a time)"


@dataclass(frozen=True)
class LeaseRecord:
    """One lease file, parsed (untrusted: every field is checked)."""

    path: str
    kind: str
    id: str
    holder: Holder
    since: float
    heartbeat: float
    #: steps held: GC keeps them and everything they reference
    protect: tuple[int, ...] = ()
    #: step leases: Unix time after which the lease is void
    expires: float | None = None
    #: writer leases: the step being saved (its manifest may not exist yet) and since when
    in_flight: int | None = None
    in_flight_since: float | None = None

    def describe(self, now: float | None = None) -> str:
        """Who holds it, as a refused writer is told: host, pid, since, last heartbeat."""
        age = (time.time() if now is None else now) - self.heartbeat
        return (
            f"host {self.holder.host} pid {self.holder.pid} since {_iso(self.since)} (last heartbeat {age:.1f} s ago)"
        )

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "kind": self.kind,
            "id": self.id,
            "host": self.holder.host,
            "pid": self.holder.pid,
            "boot_id": self.holder.boot_id,
            "pidns": self.holder.pidns,
            "proc_start": self.holder.proc_start,
            "since": self.since,
            "heartbeat": self.heartbeat,
            "protect": list(self.protect),
        }
        if self.kind == STEP:
            doc["step"] = self.protect[0]  # what readers of the first lease format look for
            doc["expires"] = self.expires
        else:
            doc["in_flight"] = self.in_flight
            doc["in_flight_since"] = self.in_flight_since
        return doc

    @classmethod
    def parse(cls, path: str, raw: bytes) -> LeaseRecord:
        """A lease file's record; ValueError when it is not one."""
        try:
            doc = json.loads(raw)
        except RecursionError:
            raise ValueError("nested too deeply to parse") from None
        except UnicodeDecodeError as exc:  # (a ValueError too, said plainly)
            raise ValueError(f"not UTF-8 text ({exc.reason})") from None
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")

        def num(name: str, default: float | None = None) -> float:
            v = doc.get(name, default)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= _MAX_TIME:
                # (NaN fails the comparison; a huge int fails it before float() would overflow)
                raise ValueError(f"{name} is not a time (seconds since 1970, up to year 9999)")
            return float(v)

        def text(name: str, default: str | None = None) -> str | None:
            v = doc.get(name, default)
            if v is not None and (not isinstance(v, str) or len(v) > 256):
                raise ValueError(f"{name} is not a short string")
            return v

        def step(v: Any) -> int:
            try:
                return check_step(v, "lease step")
            except CheckpointError as exc:
                raise ValueError(str(exc)) from None

        kind = text("kind", STEP)
        if kind not in (WRITER, STEP):
            raise ValueError(f"unknown lease kind {kind!r}")
        protect = doc.get("protect", [doc["step"]] if "step" in doc else [])
        if not isinstance(protect, list) or len(protect) > _MAX_PROTECT:
            raise ValueError("protect is not a short list")
        pid = doc.get("pid")
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise ValueError("pid is not an int")
        in_flight = doc.get("in_flight")
        heartbeat = num("heartbeat", 0.0)
        return cls(
            path=path,
            kind=kind,
            id=text("id") or path.rsplit("/", 1)[-1].removesuffix(".json"),
            holder=Holder(
                host=text("host") or "",
                pid=pid,
                boot_id=text("boot_id"),
                pidns=text("pidns"),
                proc_start=text("proc_start"),
            ),
            since=num("since", heartbeat),
            heartbeat=heartbeat,
            protect=tuple(step(s) for s in protect),
            expires=num("expires") if kind == STEP else None,
            in_flight=step(in_flight) if in_flight is not None else None,
            in_flight_since=num("in_flight_since") if in_flight is not None else None,
        )

    def honoured(self, now: float, grace: float) -> bool:
        """Whether GC must honour this lease at ``now`` (``grace``: GC's grace period).

        A step lease until it expires. A writer lease while its holder may run: always when
        it runs on this host, never when it is dead here, and from another host while its
        heartbeat is younger than the staleness bound or the grace period, whichever is
        longer (a writer stalled that long is treated as gone, as an object older than the
        grace is treated as no save's).
        """
        if self.kind == STEP:
            return self.expires is not None and self.expires > now
        alive = local_state(self.holder)
        if alive is not None:
            return alive
        bound = max(grace, config.writer_lease_seconds()) + config.clock_skew_seconds()
        return now - self.heartbeat <= bound


def lease_files(store: Store) -> list[str]:
    """Paths of every ``*.json`` under ``leases/``."""
    base = store.path("leases")
    try:
        if store.local:
            names = os.listdir(base) if os.path.isdir(base) else []
        else:
            store.fs.invalidate_cache(base)  # another process writes leases: never a cached listing
            names = [p.rstrip("/").rsplit("/", 1)[-1] for p in store.fs.ls(base, detail=False)]
    except FileNotFoundError:
        return []
    except Exception as exc:
        raise store._wrap(exc, "listing leases") from exc
    return [store.path("leases", n) for n in sorted(names) if n.endswith(".json")]


def read_lease(store: Store, path: str) -> LeaseRecord | None:
    """The lease at ``path``; None when it is not there. ValueError when it is not a lease."""
    try:
        raw = store.read(path, limit=_MAX_LEASE_BYTES + 1)
    except FileNotFoundError:
        return None
    if len(raw) > _MAX_LEASE_BYTES:
        raise ValueError(f"longer than {_MAX_LEASE_BYTES} bytes")
    return LeaseRecord.parse(path, raw)


def read_leases(store: Store) -> list[LeaseRecord]:
    """Every lease of ``store``. One that cannot be read (damaged, or written by a newer ckpt)
    is a CorruptCheckpointError: what it protects is unknown, and garbage collection, which
    reads them, must not delete what a lease it cannot read may hold."""
    out = []
    for path in lease_files(store):
        try:
            record = read_lease(store, path)
        except ValueError as exc:
            raise CorruptCheckpointError(
                f"lease {path} of {store.url} is unreadable ({exc}): what it protects is unknown, so garbage "
                "collection stops here and deletes nothing more. A newer ckpt's lease: collect with that "
                "version. A damaged one: `ckpt unlock` removes a writer lease, any other can be deleted"
            ) from None
        if record is not None:  # released meanwhile
            out.append(record)
    return out


def live_leases(store: Store, *, now: float | None = None, grace: float | None = None) -> list[LeaseRecord]:
    """The leases of ``store`` that GC honours now (see :meth:`LeaseRecord.honoured`); an
    unreadable one stops it (:func:`read_leases`)."""
    now = time.time() if now is None else now
    grace = config.gc_grace_seconds() if grace is None else grace
    return [r for r in read_leases(store) if r.honoured(now, grace)]


def delete_if_expired(store: Store, path: str, now: float) -> None:
    """Delete the step lease at ``path`` when it has expired (writer leases and unreadable files stay)."""
    try:
        record = read_lease(store, path)
    except ValueError:
        return  # not ours to judge
    if record is not None and record.kind == STEP and record.expires is not None and record.expires <= now:
        store.delete(path)


# -- step leases ------------------------------------------------------------------------------


class Lease:
    """A claim on checkpoint ``step``: GC keeps every step named by an unexpired lease.

    Written to ``leases/<uuid>.json``. A process that dies leaves its lease to expire after
    ``ttl_seconds``; a live one calls :meth:`renew` (at least) once per ``ttl_seconds``::

        with Lease(store, step=200) as lease:   # e.g. an evaluation reading step 200
            ...
            lease.renew(300)                    # move it on, push the expiry back
    """

    def __init__(self, store: Store | str, step: int, *, ttl_seconds: float = 3600.0) -> None:
        if not ttl_seconds > 0:
            raise CheckpointError(f"lease ttl_seconds must be positive, got {ttl_seconds!r}")
        self.store = store if isinstance(store, Store) else Store(store)
        self.id = uuid.uuid4().hex
        self.ttl_seconds = float(ttl_seconds)
        self.step = check_step(step, "lease step")
        self.since = time.time()
        self.released = False
        self._write()

    @property
    def path(self) -> str:
        return self.store.path("leases", f"{self.id}.json")

    def _write(self) -> None:
        now = time.time()
        record = LeaseRecord(
            path=self.path,
            kind=STEP,
            id=self.id,
            holder=this_process(),
            since=self.since,
            heartbeat=now,
            protect=(self.step,),
            expires=now + self.ttl_seconds,
        )
        self.store.write(self.path, json.dumps(record.to_json()).encode())
        self.store.sync_dirs()

    def renew(self, step: int | None = None) -> None:
        """Push the expiry back by ``ttl_seconds``; with ``step``, hold that step instead."""
        if self.released:
            raise CheckpointError(f"lease {self.id} on {self.store.url} was released")
        if step is not None:
            self.step = check_step(step, "lease step")
        self._write()

    def release(self) -> None:
        """Give the step up (idempotent)."""
        if not self.released:
            self.released = True
            self.store.delete(self.path)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Lease({self.store.url!r}, step={self.step}, id={self.id})"

"""Leases: a live run's claim on a checkpoint, which every garbage collection honours.

::

    with Lease(store, step=resumed_step) as lease:   # leases/<uuid>.json
        ...
        lease.renew(new_step)                         # move it on, push the expiry back
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from typing import Any

from ckpt.errors import CheckpointError
from ckpt.storage.manifest import check_step
from ckpt.storage.store import Store

log = logging.getLogger("ckpt")


class Lease:
    """A live run's claim on checkpoint ``step``: GC keeps every step named by an unexpired lease.

    Written to ``leases/<uuid>.json`` as ``{"step", "pid", "host", "expires"}`` (``expires``
    in Unix seconds). A run that dies leaves its lease to expire after ``ttl_seconds``;
    a live run calls :meth:`renew` (at least) once per ``ttl_seconds``.
    """

    def __init__(self, store: Store | str, step: int, *, ttl_seconds: float = 3600.0) -> None:
        if ttl_seconds <= 0:
            raise CheckpointError(f"lease ttl_seconds must be positive, got {ttl_seconds!r}")
        self.store = store if isinstance(store, Store) else Store(store)
        self.id = uuid.uuid4().hex
        self.ttl_seconds = float(ttl_seconds)
        self.step = check_step(step, "lease step")
        self.released = False
        self._write()

    @property
    def path(self) -> str:
        return self.store.path("leases", f"{self.id}.json")

    def _write(self) -> None:
        body = {
            "step": self.step,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "expires": time.time() + self.ttl_seconds,
        }
        self.store.write(self.path, json.dumps(body).encode())
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


def lease_files(store: Store) -> list[str]:
    base = store.path("leases")
    try:
        if store.local:
            names = os.listdir(base) if os.path.isdir(base) else []
        else:
            names = [p.rsplit("/", 1)[-1] for p in store.fs.ls(base, detail=False)]
    except FileNotFoundError:
        return []
    except Exception as exc:
        raise store._wrap(exc, "listing leases") from exc
    return [store.path("leases", n) for n in names if n.endswith(".json")]


def live_leases(store: Store, *, now: float | None = None) -> dict[str, int]:
    """Path -> step of every unexpired lease in ``store``."""
    now = time.time() if now is None else now
    out: dict[str, int] = {}
    for path in lease_files(store):
        try:
            doc = json.loads(store.read(path))
            step, expires = int(doc["step"]), float(doc["expires"])
        except FileNotFoundError:
            continue  # released meanwhile
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable lease %s in %s: %s", path, store.url, exc)
            continue
        if expires > now:
            out[path] = step
    return out


def delete_if_expired(store: Store, path: str, now: float) -> None:
    """Delete the lease file at ``path`` when it has expired (unreadable files are left alone)."""
    try:
        doc = json.loads(store.read(path))
        expired = float(doc["expires"]) <= now
    except FileNotFoundError:
        return
    except (ValueError, KeyError, TypeError):
        return  # not ours to judge: leave unreadable files alone
    if expired:
        store.delete(path)

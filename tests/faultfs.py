"""An fsspec filesystem that wraps another and misbehaves on purpose, for the fault suite.

``faulty://<path>`` forwards every call ckpt's store makes to a target filesystem
(``memory``, ``s3``, ``az``, ...) and, per call:

- fails a fraction ``fail_rate`` of them with the transient errors real services give
  (connection reset, timeout, 503 SlowDown, 500 InternalError); a failed write happens
  *before* the request half of the time and *after* it otherwise (the answer was lost);
- sleeps up to ``delay`` seconds first;
- with ``truncate_rate``, writes only the first half of a file and reports success (a torn
  write), on paths containing ``truncate_match``.

Counters (``calls``, ``failures``, ``truncated``, ``max_in_flight``) let tests check that
faults really happened. Instances are cached like any fsspec filesystem, so the
``Store`` that ``ckpt.save`` opens and ``fsspec.filesystem("faulty", **options)`` in the
test are the same object; give each test its own ``seed`` (or any extra option) to get a
fresh one.
"""

from __future__ import annotations

import errno
import random
import threading
import time
from collections import Counter
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem

WRITE_OPS = frozenset({"pipe_file", "rm_file"})


def _transient(rng: random.Random, op: str, path: str) -> Exception:
    kind = rng.randrange(4)
    if kind == 0:
        return ConnectionResetError(errno.ECONNRESET, f"injected: connection reset by peer during {op} {path}")
    if kind == 1:
        return TimeoutError(f"injected: read timed out during {op} {path}")
    if kind == 2:
        return OSError(errno.EBUSY, f"injected: 503 SlowDown during {op} {path}")
    return OSError(getattr(errno, "EREMOTEIO", errno.EIO), f"injected: 500 InternalError during {op} {path}")


class FaultyFileSystem(AbstractFileSystem):
    protocol = "faulty"

    def __init__(
        self,
        target_protocol: str = "memory",
        target_options: dict[str, Any] | None = None,
        fail_rate: float = 0.0,
        delay: float = 0.0,
        truncate_rate: float = 0.0,
        truncate_match: str = "",
        ops: list[str] | tuple[str, ...] | None = None,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.target = fsspec.filesystem(target_protocol, **(target_options or {}))
        self.fail_rate = float(fail_rate)
        self.delay = float(delay)
        self.truncate_rate = float(truncate_rate)
        self.truncate_match = truncate_match
        self.ops = frozenset(ops) if ops is not None else None  # None: every operation may fail
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.calls: Counter[str] = Counter()
        self.failures: Counter[str] = Counter()
        self.truncated: list[str] = []
        self.in_flight = 0
        self.max_in_flight = 0

    @classmethod
    def _strip_protocol(cls, path: str) -> str:
        path = path[len("faulty://") :] if path.startswith("faulty://") else path
        return path.rstrip("/") or "/"

    # -- the misbehaviour ---------------------------------------------------------------
    def _call(self, op: str, path: str, fn: Any) -> Any:
        with self._lock:
            self.calls[op] += 1
            pause = self._rng.uniform(0, self.delay) if self.delay else 0.0
            fail = (self.ops is None or op in self.ops) and self._rng.random() < self.fail_rate
            after = fail and op in WRITE_OPS and self._rng.random() < 0.5
            error = _transient(self._rng, op, path) if fail else None
            if fail:
                self.failures[op] += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if pause:
                time.sleep(pause)
            if error is not None and not after:
                raise error
            result = fn()
            if error is not None:
                raise error
            return result
        finally:
            with self._lock:
                self.in_flight -= 1

    # -- what ckpt's Store uses, forwarded --------------------------------------------------
    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        path = self._strip_protocol(path)
        with self._lock:
            torn = self.truncate_match in path and self._rng.random() < self.truncate_rate
            if torn:
                self.truncated.append(path)
        body = value[: len(value) // 2] if torn else value
        self._call("pipe_file", path, lambda: self.target.pipe_file(path, body, **kwargs))

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        path = self._strip_protocol(path)
        return self._call("cat_file", path, lambda: self.target.cat_file(path, start=start, end=end, **kwargs))

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        return self._call("info", path, lambda: self.target.info(path, **kwargs))

    def exists(self, path: str, **kwargs: Any) -> bool:
        path = self._strip_protocol(path)
        return self._call("exists", path, lambda: self.target.exists(path, **kwargs))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        path = self._strip_protocol(path)
        return self._call("ls", path, lambda: self.target.ls(path, detail=detail, **kwargs))

    def find(
        self, path: str, maxdepth: int | None = None, withdirs: bool = False, detail: bool = False, **kwargs: Any
    ) -> Any:
        path = self._strip_protocol(path)
        return self._call(
            "find", path, lambda: self.target.find(path, maxdepth=maxdepth, withdirs=withdirs, detail=detail, **kwargs)
        )

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        self._call("rm_file", path, lambda: self.target.rm_file(path))

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        self.target.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def invalidate_cache(self, path: str | None = None) -> None:
        self.target.invalidate_cache(self._strip_protocol(path) if path else None)


def register() -> None:
    fsspec.register_implementation("faulty", FaultyFileSystem, clobber=True)


register()

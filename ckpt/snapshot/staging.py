"""Staging: consistent point-in-time copies of live tensors into a reused host buffer pool.

What is guaranteed (the contract of :meth:`ckpt.Checkpointer.save`):

* **Guarded tensors** are the parameters of every optimizer in the state and those
  optimizers' state tensors (Adam moments, step counts...). They only change inside
  ``optimizer.step()``, so they are copied in the background after ``save()`` returns;
  a step pre-hook registered for *every* optimizer makes the next ``optimizer.step()``
  wait until the copy is done (on CUDA the wait is an event on the GPU stream, the CPU
  does not block). The checkpoint therefore holds their values at the ``save()`` call.
* **Every other tensor** (BatchNorm buffers, RNG states, tensors a scheduler, scaler or
  loader holds, plain tensors in the state) is copied before ``save()`` returns.
* A guarded tensor that **you mutate by hand** (``param.data.mul_(...)``, weight
  averaging outside an optimizer) between ``save()`` and the end of staging may be
  captured half old, half new. Call ``handle.wait_staged()`` before such a mutation, or
  pass ``guard=False`` to ``save()`` to copy everything before it returns.

Buffers come from :class:`HostPool`, keyed by size and reused across saves (pinned host
memory for CUDA tensors); with ``max_bytes`` set, staging waits for buffers of tensors
already persisted, so memory stays under the budget while the save streams through.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ckpt.errors import CheckpointError


class HostPool:
    """Host buffers reused across saves, bounded by ``max_bytes`` (None: unbounded)."""

    def __init__(self, max_bytes: int | None = None) -> None:
        self.max_bytes = max_bytes
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = defaultdict(list)
        self._allocated = 0
        self._cond = threading.Condition()

    @property
    def allocated_bytes(self) -> int:
        return self._allocated

    @property
    def free_bytes(self) -> int:
        """Bytes of allocated buffers waiting in the pool for reuse."""
        with self._cond:
            return sum(nbytes * len(free) for (nbytes, _), free in self._free.items())

    def acquire(self, nbytes: int, *, pinned: bool = False, what: str = "") -> torch.Tensor:
        """A uint8 buffer of exactly ``nbytes``; waits while the budget is exhausted."""
        if self.max_bytes is not None and nbytes > self.max_bytes:
            raise CheckpointError(
                f"tensor {what!r} needs {nbytes} bytes of staging, more than max_host_memory={self.max_bytes}; "
                "raise max_host_memory to at least the largest tensor"
            )
        key = (nbytes, pinned)
        with self._cond:
            while True:
                free = self._free.get(key)
                if free:
                    return free.pop()
                if self.max_bytes is None or self._allocated + nbytes <= self.max_bytes:
                    break
                if self._evict_one(exclude=key):
                    continue
                self._cond.wait()
            self._allocated += nbytes
        try:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        except BaseException:
            with self._cond:
                self._allocated -= nbytes
                self._cond.notify_all()
            raise

    def _evict_one(self, exclude: tuple[int, bool]) -> bool:
        # Free a cached buffer of another size to make room (called with the lock held).
        for key, free in self._free.items():
            if key != exclude and free:
                free.pop()
                self._allocated -= key[0]
                return True
        return False

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._free[(buf.numel(), buf.is_pinned())].append(buf)
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            for (nbytes, _), free in self._free.items():
                self._allocated -= nbytes * len(free)
            self._free.clear()


def guarded_storages(optimizers: list[torch.optim.Optimizer]) -> set[int]:
    """Storage addresses of every tensor that only changes inside these optimizers' ``step()``."""
    ptrs: set[int] = set()
    for opt in optimizers:
        for group in opt.param_groups:
            for p in group["params"]:
                ptrs.add(p.untyped_storage().data_ptr())
        for state in opt.state.values():
            for v in state.values():
                if isinstance(v, torch.Tensor):
                    ptrs.add(v.untyped_storage().data_ptr())
    ptrs.discard(0)
    return ptrs


@dataclass
class _Staged:
    path: str
    buf: torch.Tensor  # pool buffer (uint8)
    host: torch.Tensor  # view of buf with the tensor's dtype and shape
    event: Any = None  # CUDA event recorded after the device-to-host copy


@dataclass
class Snapshot:
    """One save's staging: eager copies done at once, guarded ones copied by :meth:`stage`."""

    pool: HostPool
    eager: list[_Staged] = field(default_factory=list)
    pending: list[tuple[str, torch.Tensor]] = field(default_factory=list)
    staged: threading.Event = field(default_factory=threading.Event)
    by_path: dict[str, _Staged] = field(default_factory=dict)
    _events: list[Any] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def take(
        cls, tensors: Mapping[str, torch.Tensor], pool: HostPool, guarded: set[int], *, side_stream: Any = None
    ) -> Snapshot:
        """Copy every unguarded tensor now; leave guarded ones for :meth:`stage`."""
        snap = cls(pool=pool)
        for path, t in tensors.items():
            if t.layout != torch.strided:
                from ckpt.errors import UnsupportedValueError

                raise UnsupportedValueError(f"tensor {path!r}: layout {t.layout} is not supported; convert it to dense")
            if t.untyped_storage().data_ptr() in guarded and t.numel():
                snap.pending.append((path, t))
            else:
                snap.eager.append(snap._copy(path, t, side_stream))
        if not snap.pending:
            snap.staged.set()
        return snap

    def _copy(self, path: str, t: torch.Tensor, side_stream: Any) -> _Staged:
        t = t.detach()
        buf = self.pool.acquire(t.nbytes, pinned=t.is_cuda, what=path)
        host = buf.view(t.dtype).view(t.shape) if t.nbytes else torch.empty(t.shape, dtype=t.dtype)
        event = None
        if t.is_cuda:
            stream = side_stream or torch.cuda.current_stream(t.device)
            # The copy must see every kernel queued so far, and later kernels that write
            # `t` must not overtake it: the side stream waits for the current one, and the
            # caller makes the current stream wait for `event` before mutating.
            stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(stream):
                host.copy_(t, non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
            t.record_stream(stream)
            with self._lock:
                self._events.append(event)
        else:
            host.copy_(t)
        staged = _Staged(path=path, buf=buf, host=host, event=event)
        self.by_path[path] = staged
        return staged

    def copy_all(self, *, side_stream: Any = None) -> bool:
        """Copy every guarded tensor now, when the pool's budget holds them all at once.

        Releases the next optimizer step after one plain copy, before any store I/O or
        encoding starts; :meth:`stage` then only yields. Returns False (nothing copied)
        when the budget is too small: :meth:`stage` then streams the guarded tensors
        through the pool as the writer frees buffers.
        """
        need = sum(t.nbytes for _, t in self.pending)
        budget = self.pool.max_bytes
        if budget is not None and self.pool.allocated_bytes - self.pool.free_bytes + need > budget:
            return False
        try:
            self.eager.extend(self._copy(path, t, side_stream) for path, t in self.pending)
            self.pending = []
        finally:
            self.staged.set()
        return True

    def stage(self, *, side_stream: Any = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(path, host tensor)`` for every tensor, copying the guarded ones.

        Runs on the persistence thread; sets :attr:`staged` once every guarded tensor has
        been copied (or its copy queued on the side stream), releasing optimizer steps.
        """
        try:
            for s in self.eager:
                yield s.path, self._ready(s)
            for path, t in self.pending:
                yield path, self._ready(self._copy(path, t, side_stream))
        finally:
            self.staged.set()

    def _ready(self, s: _Staged) -> torch.Tensor:
        if s.event is not None:
            s.event.synchronize()
        return s.host

    def gpu_wait(self) -> None:
        """Make the current CUDA stream wait for the staging copies (no CPU block)."""
        with self._lock:
            events = list(self._events)
        for ev in events:
            torch.cuda.current_stream().wait_event(ev)

    def release(self, path: str) -> None:
        s = self.by_path.pop(path, None)
        if s is not None and s.host.numel():
            self.pool.release(s.buf)

    def release_all(self) -> None:
        for path in list(self.by_path):
            self.release(path)

"""DataLoader position: resume mid-epoch with exactly the batch that would have come next.

A plain ``torch.utils.data.DataLoader`` keeps no position, so ckpt *tracks* it: the
loader's class is swapped for a subclass (same behaviour) that records, at the start of
each epoch, the state of every generator that decides the order (the loader's and the
sampler's generator, or torch's global RNG when the sampler has none) and counts the
batches handed out. Saving records that; restoring makes the next ``iter(loader)``
replay the epoch's order and skip the consumed batches *in the sampler* (no data is
loaded for them), with any number of workers, persistent or not.

The rules that make a resumed epoch bit-identical to the original one:

- Every ``iter()`` of the index sampler within an epoch starts from the generator states
  recorded at the epoch's start, so the order, and the generators' states after the
  epoch, do not depend on how many iterators torch builds (a fresh multiprocessing
  iterator builds two, a persistent one reused for the next epoch builds one).
- Randomness drawn *inside worker processes* (augmentation) is seeded per batch: before a
  worker loads a batch, torch's, Python's and NumPy's global RNGs are seeded from the
  epoch's recorded generator states, the epoch number and the batch's position in the
  epoch. A batch's random values therefore depend only on its position, never on which
  worker loads it or what that worker loaded before (workers live across epochs with
  ``persistent_workers``, and a resumed epoch starts at a later batch). Without workers
  the dataset draws from the main process's RNG, which ``ckpt.RNG()`` captures. Index
  batches must be lists (any batch sampler torch ships) for the per-batch seed to apply.
- Workers of a tracked loader leave SIGTERM and SIGINT to the main process: a preemption
  (Slurm's ``scancel`` and Kubernetes signal the whole process group) is the main
  process's to handle, which finishes its step, saves and exits. On SIGTERM a worker
  goes on loading the batches asked of it and exits once idle for
  ``WORKER_IDLE_EXIT_SECONDS``; SIGINT it ignores.

Tracking must start before the epoch does: ``Checkpointer.resume`` tracks every
DataLoader in its state, or call :func:`track` yourself.

``torchdata``'s ``StatefulDataLoader`` has its own ``state_dict()``; its adapter uses it.
Restoring one also keeps the first iterator built afterwards from drawing its base seed
from torch's global RNG (the original iterator drew it before the save, and the restored
RNG state already includes that draw), so training's RNG stream is not shifted.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import hashlib
import os
import random
import signal
import sys
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from ckpt.errors import CheckpointError, StateMismatchError


@dataclass
class _Position:
    epoch: int = -1
    batches: int = 0
    start_states: dict[str, torch.Tensor] = field(default_factory=dict)
    resume: dict[str, Any] | None = None
    #: batches the current epoch's sampler skips (a resumed epoch's consumed batches)
    skip: int = 0
    #: the generators recorded in ``start_states`` (None: torch's global RNG)
    gens: dict[str, torch.Generator | None] = field(default_factory=dict)
    #: seeds the batches' worker-side randomness; None when the loader has no workers
    epoch_seed: bytes | None = None


def _generators(loader: DataLoader) -> dict[str, torch.Generator | None]:
    """Generators whose state decides an epoch's order; None stands for torch's global RNG."""
    gens: dict[str, torch.Generator | None] = {}
    if loader.generator is not None:
        gens["loader"] = loader.generator
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    for i, sampler in enumerate(samplers):
        if sampler is None or not hasattr(sampler, "generator"):
            continue
        gen = sampler.generator
        if gen is None:
            if isinstance(sampler, torch.utils.data.RandomSampler):
                gens["global"] = None
        elif all(gen is not g for g in gens.values()):
            gens[f"sampler{i}"] = gen
    if loader.generator is None and loader.num_workers > 0:
        gens["global"] = None  # worker base seed comes from the global RNG
    return gens


def _get(gen: torch.Generator | None) -> torch.Tensor:
    return torch.get_rng_state() if gen is None else gen.get_state()


def _set(gen: torch.Generator | None, state: torch.Tensor) -> None:
    if gen is None:
        torch.set_rng_state(state)
    else:
        gen.set_state(state)


def _epoch_seed(pos: _Position) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    h.update(pos.epoch.to_bytes(8, "little", signed=True))
    for name in sorted(pos.start_states):
        h.update(name.encode())
        h.update(pos.start_states[name].numpy().tobytes())
    return h.digest()


def _batch_seed(epoch_seed: bytes, position: int) -> int:
    digest = hashlib.blake2b(epoch_seed + position.to_bytes(8, "little"), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # torch.manual_seed takes a non-negative int64


class _SeededBatch(list):
    """A batch of indices carrying the seed its worker applies before loading it."""

    def __init__(self, indices: list[Any], seed: int) -> None:
        super().__init__(indices)
        self.ckpt_seed = seed

    def __reduce__(self) -> Any:  # pickled to the worker with its seed
        return (_SeededBatch, (list(self), self.ckpt_seed))


class _SkipSampler:
    """The loader's index sampler: the epoch's order drawn from the recorded generator states,
    ``position.skip`` batches skipped, and (with workers) each batch tagged with its seed.

    The first batch is pulled when the epoch's iterator is built, in the original and the
    resumed run alike, so the order is drawn while the generators are in the recorded
    state. Skipping is lazy: a multiprocessing iterator builds (and throws away) one
    index iterator before the one it uses, and the throw-away one must make exactly the
    same draws in both runs. The skip is read at each ``iter()``: a persistent-workers
    iterator keeps this object for every later epoch.
    """

    def __init__(self, sampler: Any, position: _Position) -> None:
        self.sampler = sampler
        self.position = position

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        pos = self.position
        for name, gen in pos.gens.items():
            _set(gen, pos.start_states[name])
        it = iter(self.sampler)
        return _skipping(next(it, _END), it, pos.skip, pos.epoch_seed)


def _skipping(first: Any, rest: Iterator[Any], skip: int, epoch_seed: bytes | None) -> Iterator[Any]:
    if first is _END:
        return
    if skip == 0:
        batches: Iterator[Any] = _chain_first(first, rest)
    else:
        for _ in range(skip - 1):  # `first` is the first one skipped
            if next(rest, _END) is _END:
                return
        batches = rest
    if epoch_seed is None:
        yield from batches
        return
    for position, batch in enumerate(batches, start=skip):
        yield _SeededBatch(batch, _batch_seed(epoch_seed, position)) if type(batch) is list else batch


def _chain_first(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


_END = object()


# -- worker processes ------------------------------------------------------------------
def _worker_init(user_fn: Callable[[int], None] | None, worker_id: int) -> None:
    """A tracked loader's ``worker_init_fn``: runs in each worker, then the user's own."""
    signal.signal(signal.SIGTERM, _worker_sigterm)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process raises KeyboardInterrupt
    _seed_batches_in_this_worker()
    if user_fn is not None:
        user_fn(worker_id)


#: seconds a worker keeps serving after SIGTERM once it has no batch to load
WORKER_IDLE_EXIT_SECONDS = 2.0
_worker_busy = 0
_worker_last_active = 0.0


def _worker_sigterm(signum: int, frame: Any) -> None:
    # A group-wide SIGTERM (a preemption) must not kill the worker under the main process,
    # which would raise instead of finishing its step and saving. But SIGTERM is also how
    # torch and multiprocessing end workers at exit (then joining them), so the worker does
    # not ignore it: it finishes the batches already asked of it and exits (status 0) once
    # idle for WORKER_IDLE_EXIT_SECONDS. The preempted main process needs no more batches
    # than those before its next ``Checkpointer.step()``.
    global _worker_last_active
    _worker_last_active = time.monotonic()
    threading.Thread(target=_exit_when_idle, daemon=True).start()


def _exit_when_idle() -> None:
    while _worker_busy or time.monotonic() - _worker_last_active < WORKER_IDLE_EXIT_SECONDS:
        time.sleep(0.05)
    os._exit(0)


def _seed_batches_in_this_worker() -> None:
    # This process is one loader's worker: its fetcher is created right after the init
    # function returns, and the only hook before each batch is the fetcher's ``fetch``.
    from torch.utils.data._utils import fetch

    cls = fetch._MapDatasetFetcher
    if getattr(cls.fetch, "_ckpt_seeded", False):
        return
    original = cls.fetch

    def seeded_fetch(self: Any, possibly_batched_index: Any) -> Any:
        global _worker_busy, _worker_last_active
        seed = getattr(possibly_batched_index, "ckpt_seed", None)
        if seed is not None:
            _seed_all(seed)
        _worker_busy += 1
        try:
            return original(self, possibly_batched_index)
        finally:
            _worker_busy -= 1
            _worker_last_active = time.monotonic()

    seeded_fetch._ckpt_seeded = True  # type: ignore[attr-defined]
    cls.fetch = seeded_fetch  # type: ignore[method-assign]


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np = sys.modules.get("numpy")  # seeded only where the dataset uses it
    if np is not None:
        np.random.seed([seed & 0xFFFFFFFF, seed >> 32])


#: live multiprocessing iterators of tracked loaders, shut down at exit
_live_iterators: weakref.WeakSet[Any] = weakref.WeakSet()
_atexit_registered = False


def _register_workers(iterator: Any) -> None:
    global _atexit_registered
    if not hasattr(iterator, "_shutdown_workers"):
        return
    _live_iterators.add(iterator)
    if not _atexit_registered:
        # Registered after torch and multiprocessing, so it runs before them: torch's turns
        # its own shutdown off, and multiprocessing's ends workers with SIGTERM, which ours
        # answer only once idle (WORKER_IDLE_EXIT_SECONDS later), then joins them.
        atexit.register(_shutdown_workers)
        _atexit_registered = True


def _shutdown_workers() -> None:
    for iterator in list(_live_iterators):
        try:
            iterator._shutdown_workers()
        except (OSError, RuntimeError, ValueError):  # exiting anyway; workers also watch their parent
            pass


# -- tracking ------------------------------------------------------------------------------
def _tracked_class(cls: type) -> type:
    """A subclass of ``cls`` that records its position (single inheritance, so an instance's
    ``__class__`` can be swapped in place)."""

    class Tracked(cls):
        _ckpt_tracked = True

        @property
        def _index_sampler(self) -> Any:  # read by DataLoader iterators when built
            return _SkipSampler(super()._index_sampler, self._ckpt_position)

        @property
        def worker_init_fn(self) -> Any:  # read by multiprocessing iterators when built
            return functools.partial(_worker_init, self.__dict__.get("worker_init_fn"))

        @worker_init_fn.setter
        def worker_init_fn(self, fn: Any) -> None:
            self.__dict__["worker_init_fn"] = fn

        def __iter__(self) -> Iterator[Any]:
            return _tracked_iter(self, super().__iter__)

    Tracked.__name__ = Tracked.__qualname__ = f"Tracked{cls.__name__}"
    return Tracked


def _is_tracked(obj: Any) -> bool:
    return getattr(type(obj), "_ckpt_tracked", False)


def _tracked_iter(loader: Any, start_iterator: Any) -> Iterator[Any]:
    pos: _Position = loader._ckpt_position
    pos.gens = _generators(loader)
    resume, pos.resume = pos.resume, None
    current_global = torch.get_rng_state() if resume is not None and "global" in pos.gens else None
    if resume is not None:
        pos.start_states = {k: resume["start"].get(k, _get(g)) for k, g in pos.gens.items()}
        pos.epoch, pos.batches, pos.skip = int(resume["epoch"]), int(resume["batches"]), int(resume["batches"])
    else:
        pos.start_states = {k: _get(g) for k, g in pos.gens.items()}
        pos.epoch, pos.batches, pos.skip = pos.epoch + 1, 0, 0
    pos.epoch_seed = _epoch_seed(pos) if loader.num_workers > 0 else None
    try:
        inner = start_iterator()
    finally:
        pos.skip = 0
        if current_global is not None:
            # The replay re-draws exactly the epoch's own draws from the loader's generators
            # (including the one a RandomSampler makes when exhausted, which may come later
            # than the save), so those continue from the replay. torch's global RNG is
            # shared with training: it goes back to where the restore put it.
            _set(None, current_global)
    _register_workers(inner)
    return _count(inner, pos)


def _count(inner: Iterator[Any], pos: _Position) -> Iterator[Any]:
    for batch in inner:
        pos.batches += 1
        yield batch


def _restoring_class(cls: type) -> type:
    """A subclass of a stateful loader class whose first ``iter()`` after a restore leaves
    torch's global RNG as it found it."""

    class Restoring(cls):
        _ckpt_restoring = True

        def __iter__(self) -> Iterator[Any]:
            if not self.__dict__.pop("_ckpt_keep_global_rng", False):
                return super().__iter__()
            state = torch.get_rng_state()
            try:
                return super().__iter__()
            finally:
                torch.set_rng_state(state)

    Restoring.__name__ = Restoring.__qualname__ = cls.__name__
    return Restoring


_tracked_classes: dict[type, type] = {}


def _swap_class(obj: Any, make: Callable[[type], type]) -> None:
    cls = type(obj)
    sub = _tracked_classes.get(cls)
    if sub is None:
        sub = _tracked_classes[cls] = make(cls)
    obj.__class__ = sub


def track(loader: DataLoader) -> DataLoader:
    """Start tracking ``loader``'s position (idempotent); returns the same object."""
    if _is_tracked(loader) or _is_stateful(loader):
        return loader
    object.__setattr__(loader, "_ckpt_position", _Position())
    _swap_class(loader, _tracked_class)
    return loader


def track_all(state: Mapping[str, Any]) -> list[DataLoader]:
    """Track every DataLoader found in a state mapping (nested mappings and lists too);
    returns those that were not tracked before."""
    from ckpt.state.tree import instances

    new = [loader for loader in instances(state, DataLoader) if not (_is_tracked(loader) or _is_stateful(loader))]
    for loader in new:
        track(loader)
    return new


@contextlib.contextmanager
def untracked_if_refused() -> Iterator[list[DataLoader]]:
    """A list for the DataLoaders a restore tracks (:func:`track_all`'s result), which are
    untracked again (:func:`untrack`) when the block raises: a refused restore leaves them as
    they were."""
    tracked: list[DataLoader] = []
    try:
        yield tracked
    except BaseException:
        untrack(tracked)
        raise


def untrack(loaders: Iterable[DataLoader]) -> None:
    """Undo :func:`track` of ``loaders`` (a refused restore tracked them): each is of its
    own class again, without a position."""
    for loader in loaders:
        if not _is_tracked(loader):
            continue
        # the class _tracked_class derived the tracked one from (single inheritance)
        loader.__class__ = type(loader).__mro__[1]
        loader.__dict__.pop("_ckpt_position", None)


def _is_stateful(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


class DataLoaderAdapter:
    """A tracked plain ``DataLoader``: epoch, batches consumed, generator states."""

    name = "torch.utils.data.DataLoader"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, DataLoader) and not _is_stateful(obj)

    def state(self, obj: DataLoader) -> Mapping[str, Any]:
        if not _is_tracked(obj):
            raise CheckpointError(
                "a DataLoader in the state is not tracked, so its position is unknown; call "
                "ckpt.track(loader) before iterating it, or pass it to Checkpointer.resume(...)"
            )
        pos = obj._ckpt_position  # type: ignore[attr-defined]
        return {
            "epoch": pos.epoch,
            "batches": pos.batches,
            "length": len(obj) if hasattr(obj.dataset, "__len__") else None,
            "start": dict(pos.start_states),
        }

    def check(self, obj: DataLoader, tree: Mapping[str, Any]) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        if not isinstance(tree, Mapping) or not is_int(tree.get("epoch")) or not is_int(tree.get("batches")):
            raise StateMismatchError("DataLoader position in the checkpoint has no integer epoch and batches")
        if not 0 <= tree["batches"] < 2**62 or not -1 <= tree["epoch"] < 2**62:
            raise StateMismatchError(
                f"DataLoader position epoch {tree['epoch']}, batch {tree['batches']} is out of range"
            )
        if not isinstance(tree.get("start", {}), Mapping):
            raise StateMismatchError("DataLoader position in the checkpoint has no generator states mapping")
        gens = _generators(obj)
        live = {name: _get(gen) for name, gen in gens.items()}
        for name, state in tree.get("start", {}).items():
            if state is None:
                continue
            like = live.get(name)
            if not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8) or (
                like is not None and state.shape != like.shape
            ):
                raise StateMismatchError(f"DataLoader generator state {name!r} does not fit its generator")
            if name in gens:  # tried on a throw-away generator of its device: the contents
                gen = gens[name]
                try:
                    torch.Generator(device="cpu" if gen is None else gen.device).set_state(state)
                except (RuntimeError, ValueError) as exc:
                    raise StateMismatchError(f"DataLoader generator state {name!r} is not one ({exc})") from None
        length = tree.get("length")
        if length is not None and hasattr(obj.dataset, "__len__") and len(obj) != length:
            raise StateMismatchError(
                f"DataLoader has {len(obj)} batches per epoch, the checkpoint was taken with {length}"
            )

    def load(self, obj: DataLoader, tree: Mapping[str, Any]) -> None:
        track(obj)
        pos = obj._ckpt_position  # type: ignore[attr-defined]
        pos.epoch = int(tree["epoch"])
        if pos.epoch < 0:
            # saved before its first epoch: nothing to replay, nor what an earlier restore
            # left (the tiers load the local checkpoint, then maybe a newer one over it)
            pos.resume = None
            return
        pos.resume = {"epoch": pos.epoch, "batches": int(tree["batches"]), "start": dict(tree.get("start") or {})}


class StatefulDataLoaderAdapter:
    """Anything with ``state_dict()``/``load_state_dict()`` that is a DataLoader
    (torchdata's ``StatefulDataLoader``)."""

    name = "torchdata.StatefulDataLoader"

    def handles(self, obj: Any) -> bool:
        return isinstance(obj, DataLoader) and _is_stateful(obj)

    def state(self, obj: Any) -> Mapping[str, Any]:
        return obj.state_dict()

    def check(self, obj: Any, tree: Mapping[str, Any]) -> None:
        if not isinstance(tree, Mapping):
            raise StateMismatchError(f"{type(obj).__name__} state in the checkpoint is not a mapping")

    def load(self, obj: Any, tree: Mapping[str, Any]) -> None:
        obj.load_state_dict(dict(tree))
        if obj.generator is None:
            # The next iterator draws its base seed from torch's global RNG, which the
            # restore put past the original iterator's draw: that draw must not repeat.
            if not getattr(type(obj), "_ckpt_restoring", False):
                _swap_class(obj, _restoring_class)
            object.__setattr__(obj, "_ckpt_keep_global_rng", True)

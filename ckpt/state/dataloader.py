"""DataLoader position: resume mid-epoch with exactly the batch that would have come next.

A plain ``torch.utils.data.DataLoader`` keeps no position, so ckpt *tracks* it: the
loader's class is swapped for a subclass (same behaviour) that records, at the start of
each epoch, the state of every generator that decides the order (the loader's and the
sampler's generator, or torch's global RNG when the sampler has none) and counts the
batches handed out. Saving records that; restoring makes the next ``iter(loader)``
replay the epoch's order and skip the consumed batches *in the sampler* (no data is
loaded for them), with any number of workers.

Tracking must start before the epoch does: ``Checkpointer.resume`` tracks every
DataLoader in its state, or call :func:`track` yourself. Order and batch contents are
exact; randomness drawn *inside worker processes* (augmentation) restarts per epoch.

``torchdata``'s ``StatefulDataLoader`` has its own ``state_dict()``; its adapter uses it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
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


class _SkipSampler:
    """The loader's index sampler, drawing its order eagerly and skipping ``skip`` batches.

    The first batch is pulled when the epoch's iterator is built, in the original and the
    resumed run alike, so the order is drawn while the generators are in the recorded
    state. Skipping is lazy: a multiprocessing iterator builds (and throws away) one
    index iterator before the one it uses, and the throw-away one must make exactly the
    same draws in both runs.
    """

    def __init__(self, sampler: Any, skip: int, position: _Position) -> None:
        self.sampler = sampler
        self.skip = skip
        self.position = position

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[Any]:
        it = iter(self.sampler)
        return _skipping(next(it, _END), it, self.skip)


def _skipping(first: Any, rest: Iterator[Any], skip: int) -> Iterator[Any]:
    if first is _END:
        return
    if skip == 0:
        yield first
    else:
        for _ in range(skip - 1):  # `first` is the first one skipped
            if next(rest, _END) is _END:
                return
    yield from rest


_END = object()


def _tracked_class(cls: type) -> type:
    """A subclass of ``cls`` that records its position (single inheritance, so an instance's
    ``__class__`` can be swapped in place)."""

    class Tracked(cls):
        _ckpt_tracked = True

        @property
        def _index_sampler(self) -> Any:  # read by DataLoader iterators at (re)start
            return _SkipSampler(super()._index_sampler, self._ckpt_skip, self._ckpt_position)

        def __iter__(self) -> Iterator[Any]:
            return _tracked_iter(self, super().__iter__)

    Tracked.__name__ = Tracked.__qualname__ = f"Tracked{cls.__name__}"
    return Tracked


def _is_tracked(obj: Any) -> bool:
    return getattr(type(obj), "_ckpt_tracked", False)


def _tracked_iter(loader: Any, start_iterator: Any) -> Iterator[Any]:
    pos: _Position = loader._ckpt_position
    gens = _generators(loader)
    resume, pos.resume = pos.resume, None
    if resume is not None:
        current = {"global": torch.get_rng_state()} if "global" in gens else {}
        for k, g in gens.items():
            if k in resume["start"]:
                _set(g, resume["start"][k])
        pos.start_states = {k: _get(g) for k, g in gens.items()}
        object.__setattr__(loader, "_ckpt_skip", int(resume["batches"]))
        pos.epoch, pos.batches = int(resume["epoch"]), int(resume["batches"])
    else:
        pos.start_states = {k: _get(g) for k, g in gens.items()}
        object.__setattr__(loader, "_ckpt_skip", 0)
        pos.epoch, pos.batches = pos.epoch + 1, 0
    try:
        inner = start_iterator()
        if resume is not None and "global" in gens:
            # The replay re-draws exactly the epoch's own draws from the loader's generators
            # (including the one a RandomSampler makes when exhausted, which may come later
            # than the save), so those continue from the replay. torch's global RNG is
            # shared with training: it goes back to where the restore put it.
            _set(None, current["global"])
    finally:
        object.__setattr__(loader, "_ckpt_skip", 0)
    return _count(inner, pos)


def _count(inner: Iterator[Any], pos: _Position) -> Iterator[Any]:
    for batch in inner:
        pos.batches += 1
        yield batch


_tracked_classes: dict[type, type] = {}


def track(loader: DataLoader) -> DataLoader:
    """Start tracking ``loader``'s position (idempotent); returns the same object."""
    if _is_tracked(loader):
        return loader
    if _is_stateful(loader):
        return loader
    cls = type(loader)
    sub = _tracked_classes.get(cls)
    if sub is None:
        sub = _tracked_classes[cls] = _tracked_class(cls)
    object.__setattr__(loader, "_ckpt_position", _Position())
    object.__setattr__(loader, "_ckpt_skip", 0)
    loader.__class__ = sub
    return loader


def track_all(state: Mapping[str, Any]) -> None:
    """Track every DataLoader found in a state mapping (nested mappings and lists too)."""
    from ckpt.state.tree import instances

    for loader in instances(state, DataLoader):
        track(loader)


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
        if tree["batches"] < 0 or not isinstance(tree.get("start", {}), Mapping):
            raise StateMismatchError(f"DataLoader position {dict(tree)!r} is malformed")
        for name, state in tree.get("start", {}).items():
            if state is not None and not (isinstance(state, torch.Tensor) and state.dtype == torch.uint8):
                raise StateMismatchError(f"DataLoader generator state {name!r} is not a byte tensor")
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
            return  # saved before its first epoch: nothing to replay
        pos.resume = {"epoch": pos.epoch, "batches": int(tree["batches"]), "start": dict(tree["start"])}


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

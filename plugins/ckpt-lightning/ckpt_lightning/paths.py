"""Lightning checkpoint paths <-> ckpt steps, and the marker that lets ``ckpt_path="last"`` find the store.

Lightning names every checkpoint by a path (``ModelCheckpoint`` makes
``<dirpath>/epoch=0-step=100.ckpt``, ``<dirpath>/last.ckpt``...); ckpt names it by a step.
A save stores the checkpoint as step ``checkpoint["global_step"]`` and records the path in
a :class:`PathTable`. Every manifest the plugin writes carries the whole table (the paths
alive when it was saved) in ``meta["ckpt_lightning"]["paths"]``, so a new process resolves
the paths a resumed ``ModelCheckpoint`` still holds. A path resolves, in this order, to:

1. the step the table records for it;
2. ``<url>/step=<n>`` (:func:`step_path`): step ``n`` (a path that is never a file);
3. a file name whose stem starts with ``last`` (Lightning's "last" checkpoints and the
   marker below): the store's latest checkpoint;
4. a file name with ``step=<n>`` in it (``ModelCheckpoint``'s default names): step ``n``.

Lightning resolves ``ckpt_path="last"`` by listing ``ModelCheckpoint``'s directory for
``last*.ckpt`` files. No checkpoint file is written there, so after a directory's first
commit the plugin writes one small JSON marker, :data:`MARKER_NAME`, naming the store: it
is what Lightning finds, and it resolves to the store's latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import re
from collections.abc import Iterable, Mapping
from typing import Any

import ckpt

log = logging.getLogger("ckpt.lightning")

#: the marker's file name: a stem starting with ``last`` (what ``ckpt_path="last"`` looks for),
#: never a name ``ModelCheckpoint`` generates itself
MARKER_NAME = "last-ckpt-store.ckpt"
MARKER_FORMAT = "ckpt-lightning-marker"
#: the key of the plugin's own record in a manifest's ``meta``
META_KEY = "ckpt_lightning"

_STEP_IN_NAME = re.compile(r"(?:^|[-_.])step=(\d{1,18})(?=$|[-_.])")
_STEP_PATH = re.compile(r"step=(\d{1,18})")


def normalize(path: str | os.PathLike[str]) -> str:
    """One spelling per location: ``file://`` dropped, local paths absolute and normalized,
    URLs without a trailing slash."""
    text = os.fspath(path)
    if text.startswith("file://"):
        text = text[len("file://") :]
    if "://" in text:
        protocol, rest = text.split("://", 1)
        return f"{protocol}://{posixpath.normpath(rest) if rest else rest}".rstrip("/")
    return os.path.normpath(os.path.abspath(text))


def step_path(url: str, step: int) -> str:
    """The Lightning path of checkpoint ``step`` of the store at ``url``: ``<url>/step=<n>``."""
    return f"{url.rstrip('/')}/step={step}"


def is_under(path: str, root: str) -> bool:
    """Whether normalized ``path`` is ``root`` or inside it (both normalized)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


class PathTable:
    """The Lightning paths alive in one store and the step each names.

    Not thread-safe on its own: :class:`ckpt_lightning.CkptCheckpointIO` holds its lock.
    """

    def __init__(self, paths: Mapping[str, int] | None = None) -> None:
        self.paths: dict[str, int] = dict(paths or {})

    @classmethod
    def from_store(cls, url: str, storage_options: dict[str, Any] | None) -> PathTable:
        """The table recorded by the store's latest checkpoint, less the steps no longer stored."""
        latest = ckpt.latest_step(url, storage_options)
        if latest is None:
            return cls()
        record = ckpt.read_manifest(url, latest, storage_options).meta.get(META_KEY)
        raw = record.get("paths") if isinstance(record, Mapping) else None
        if not isinstance(raw, Mapping):
            return cls()
        stored = set(ckpt.steps(url, storage_options))
        # A store is untrusted input: only str -> int entries naming a stored step are kept.
        return cls(
            {
                k: v
                for k, v in raw.items()
                if isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v in stored
            }
        )

    def to_meta(self) -> dict[str, Any]:
        return {META_KEY: {"format": 1, "paths": dict(self.paths)}}

    def add(self, path: str, step: int) -> int | None:
        """Name ``step`` by ``path``; returns the step it named before and names no more (a
        path saved again, like ``last.ckpt``, is overwritten)."""
        old = self.paths.get(path)
        self.paths[path] = step
        return old if old is not None and old != step and old not in self.paths.values() else None

    def pop(self, path: str) -> int | None:
        return self.paths.pop(path, None)

    def referenced(self) -> set[int]:
        return set(self.paths.values())

    def get(self, path: str) -> int | None:
        return self.paths.get(path)


def step_in_store_path(path: str, url: str) -> int | None:
    """``n`` for ``<url>/step=<n>``; None for a path outside the store; an error for any other path inside it."""
    if not is_under(path, url):
        return None
    rest = path[len(url.rstrip("/")) :].strip("/")
    match = _STEP_PATH.fullmatch(rest)
    if match is None:
        raise ckpt.CheckpointError(
            f"{path!r} is inside the ckpt store {url} but is not a checkpoint path; use {step_path(url, 0)!r}-style "
            "paths (CkptCheckpointIO.path(step)) or the paths ModelCheckpoint generated"
        )
    return int(match.group(1))


def step_in_name(path: str) -> int | None:
    """``n`` for a file name holding ``step=<n>`` (``epoch=0-step=100.ckpt``)."""
    stem = posixpath.basename(path.replace(os.sep, "/")).removesuffix(".ckpt")
    match = _STEP_IN_NAME.search(stem)
    return int(match.group(1)) if match else None


def names_last(path: str) -> bool:
    """Whether Lightning would take ``path`` for a "last" checkpoint (its stem starts with ``last``)."""
    return posixpath.basename(path.replace(os.sep, "/")).startswith("last")


# -- the marker -----------------------------------------------------------------------------


def marker_path(directory: str) -> str:
    return posixpath.join(directory, MARKER_NAME) if "://" in directory else os.path.join(directory, MARKER_NAME)


def marker_bytes(url: str) -> bytes:
    doc = {
        "format": MARKER_FORMAT,
        "version": 1,
        "url": url,
        "checkpoint": "latest",
        "note": "Not a checkpoint: the checkpoints are in the ckpt store at 'url'. "
        "trainer.fit(model, ckpt_path='last') with CkptCheckpointIO(url) resumes from its latest.",
    }
    return json.dumps(doc, indent=1).encode()


def write_markers(directories: Iterable[str], url: str) -> list[str]:
    """Write the marker into each directory that lacks one; returns those written."""
    import fsspec

    written = []
    for directory in directories:
        fs, root = fsspec.core.url_to_fs(directory)
        target = posixpath.join(root, MARKER_NAME) if "://" in directory else os.path.join(root, MARKER_NAME)
        if fs.exists(target):
            continue
        fs.makedirs(root, exist_ok=True)
        fs.pipe_file(target, marker_bytes(url))
        written.append(target)
    return written


def check_marker(path: str, url: str) -> None:
    """Refuse a marker that names another store; a missing or unreadable one names this store by its name."""
    import fsspec

    try:
        fs, target = fsspec.core.url_to_fs(path)
        raw = fs.cat_file(target) if fs.exists(target) else None
    except (OSError, ValueError) as exc:
        log.debug("cannot read marker %s (%s); taking it for %s", path, exc, url)
        return
    if raw is None:
        return
    try:
        doc = json.loads(raw[:65536])
    except ValueError:
        raise ckpt.CheckpointError(
            f"{path} is not a ckpt-lightning marker (not JSON): a checkpoint file of another CheckpointIO?"
        ) from None
    if not isinstance(doc, dict) or doc.get("format") != MARKER_FORMAT:
        raise ckpt.CheckpointError(f"{path} is not a ckpt-lightning marker")
    named = doc.get("url")
    if isinstance(named, str) and normalize(named) != normalize(url):
        raise ckpt.CheckpointError(
            f"{path} points at the ckpt store {named!r}, but this CkptCheckpointIO reads {url!r}; "
            "pass the store the run wrote to"
        )

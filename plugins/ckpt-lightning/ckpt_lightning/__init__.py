"""ckpt-lightning: Lightning checkpoints saved asynchronously into a ckpt store.

``Trainer(plugins=[ckpt_lightning.CkptCheckpointIO(url)])`` makes every Lightning
checkpoint (``ModelCheckpoint``, ``trainer.save_checkpoint``) a ckpt checkpoint: saved
in the background, deduplicated and compressed, restored with
``trainer.fit(model, ckpt_path="last")``. See :mod:`ckpt_lightning.checkpoint_io`.

Registered through the ``ckpt`` entry-point group under its distribution name
(``ckpt-lightning``) for one hook, ``ckpt_after_commit``: once a save is durable, the
writer that made it deletes the checkpoints Lightning removed meanwhile and writes the
marker ``ckpt_path="last"`` finds. Importing this package does not import Lightning:
``CkptCheckpointIO`` loads it on first use, so ``ckpt`` commands stay fast.
"""

from __future__ import annotations

import threading
import weakref
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

import ckpt

if TYPE_CHECKING:
    from ckpt_lightning.checkpoint_io import CkptCheckpointIO

try:
    __version__ = version("ckpt-lightning")
except PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = ["CkptCheckpointIO", "__version__", "ckpt_after_commit"]

_live: weakref.WeakSet[Any] = weakref.WeakSet()
_live_lock = threading.Lock()


def _register(io: Any) -> None:
    with _live_lock:
        _live.add(io)


@ckpt.hookimpl
def ckpt_after_commit(info: ckpt.CheckpointInfo) -> None:
    """Let the ``CkptCheckpointIO`` whose save this is finish its housekeeping (on the commit thread)."""
    with _live_lock:
        targets = list(_live)
    for io in targets:
        io._after_commit(info)


def __getattr__(name: str) -> Any:
    if name == "CkptCheckpointIO":
        from ckpt_lightning.checkpoint_io import CkptCheckpointIO

        return CkptCheckpointIO
    raise AttributeError(f"module 'ckpt_lightning' has no attribute {name!r}")

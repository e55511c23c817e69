"""ckpt stores through torch.distributed.checkpoint::

    import torch.distributed.checkpoint as dcp
    dcp.save(sd, storage_writer=ckpt.dcp.StorageWriter(url, step=N))
    dcp.load(sd, storage_reader=ckpt.dcp.StorageReader(url))

See :mod:`ckpt.interop.dcp_storage` for what the store holds; :func:`checkpoint_error`
finds the :class:`ckpt.CheckpointError` inside the ``CheckpointException`` DCP raises.
"""

from __future__ import annotations

from ckpt.interop.dcp_reader import StorageReader
from ckpt.interop.dcp_storage import StorageWriter, checkpoint_error

__all__ = ["StorageReader", "StorageWriter", "checkpoint_error"]

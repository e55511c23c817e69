"""A local store writes only under its root, as it reads only there: a folder of it that is
a symlink leading out of the store is refused, not written through."""

from __future__ import annotations

import os

import pytest
import torch

import ckpt


@pytest.mark.parametrize("folder", ["objects", "manifests"])
def test_a_folder_leading_out_of_the_store_is_never_written_through(tmp_path, folder):
    url = str(tmp_path / "s")
    outside = tmp_path / "victim"
    outside.mkdir()
    ckpt.save(url, {"t": torch.ones(4)}, step=1)
    real = tmp_path / "s" / folder
    os.rename(real, tmp_path / "moved")
    os.symlink(outside, real)  # what reads refuse ("leads to ..., outside the store")
    with pytest.raises(ckpt.CorruptCheckpointError, match="outside the store: refusing to write there"):
        ckpt.save(url, {"t": torch.arange(1000.0)}, step=2)
    assert list(outside.iterdir()) == [], "nothing lands outside the store"
    # cp into such a destination: refused the same way, before it reports a copy it cannot read
    os.unlink(real)
    os.rename(tmp_path / "moved", real)
    dst = tmp_path / "d"
    (dst / folder).parent.mkdir(parents=True)
    os.symlink(outside, dst / folder)
    with pytest.raises(ckpt.CheckpointError, match="outside the store"):
        ckpt.copy(url, str(dst))
    assert list(outside.iterdir()) == []

"""A symbolic link at a manifest's name, leading inside the store, is not a checkpoint: the
listing skips it (so gc does not protect what it names), and reading that step refuses it
too, instead of showing or restoring a checkpoint that gc may sweep from under it. (One
leading out of the store is refused as such: tests/hostile/cases.py.)"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from click.testing import CliRunner

import ckpt
from ckpt.cli import build_cli
from ckpt.storage.store import Store


@pytest.fixture
def linked(tmp_path):
    url = str(tmp_path / "store")
    for step in (1, 2):
        ckpt.save(url, {"w": torch.full((64,), float(step))}, step=step)
    store = Store(url)
    two = store.manifest_path(2)
    kept = str(tmp_path / "store" / "kept-2.json")  # inside the store, not under manifests/
    shutil.move(two, kept)
    os.symlink(kept, two)
    return url


def test_a_linked_manifest_is_neither_listed_nor_read(linked):
    assert ckpt.steps(linked) == [1]
    with pytest.raises(ckpt.CorruptCheckpointError, match="symbolic link"):
        ckpt.read_manifest(linked, 2)
    live = {"w": torch.zeros(64)}
    with pytest.raises(ckpt.CorruptCheckpointError, match="manifests/2.json"):
        ckpt.restore(linked, live, step=2)
    assert torch.equal(live["w"], torch.zeros(64))
    assert ckpt.restore(linked, live).step == 1  # the newest listed one


def test_the_cli_does_not_show_a_linked_manifest(linked):
    r = CliRunner().invoke(build_cli(), ["show", linked, "--step", "2"])
    assert r.exit_code != 0 and "symbolic link" in r.output

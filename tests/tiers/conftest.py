"""Fixtures shared by the tiers tests."""

from __future__ import annotations

import pytest
from _tiers_util import weights

import ckpt


@pytest.fixture
def after_restore_calls():
    """The steps the ``ckpt_after_restore`` hook is called with, and the weights it sees."""
    from ckpt.hooks.manager import get_plugins

    calls: list[tuple[int, dict]] = []

    class Recorder:
        @ckpt.hookimpl
        def ckpt_after_restore(self, info, state):
            calls.append((info.step, weights(state)))

    pm = get_plugins().pm
    recorder = Recorder()
    pm.register(recorder, name="after-restore-recorder")
    try:
        yield calls
    finally:
        pm.unregister(recorder)

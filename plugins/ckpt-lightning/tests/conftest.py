"""Fixtures for ckpt-lightning's tests: fresh plugins, stores, a tiny LightningModule, and
the training script run as a real subprocess (killable with SIGKILL)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

from ckpt.testing import reset_plugins, store_url  # noqa: F401 - the fixture: file:// and memory:// stores

SCRIPT = Path(__file__).with_name("train_script.py")

# Lightning's own advice (no workers, no logger) is noise in these tiny runs.
warnings.filterwarnings("ignore", module="lightning")


@pytest.fixture(autouse=True)
def _fresh_plugins() -> Iterator[None]:
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture(autouse=True)
def _prompt_gc(monkeypatch: pytest.MonkeyPatch) -> None:
    # GC leaves a live writer's objects younger than the clock-skew margin: none in tests.
    monkeypatch.setenv("CKPT_CLOCK_SKEW_SECONDS", "0")

"""Every common loader setup, SIGKILLed mid-epoch and resumed, ends bit-identical.

Each case is a real training run (examples/train.py: dropout, AdamW, a scheduler,
``ckpt.RNG()``, ``@ck.resume``) killed with SIGKILL once its checkpoint lies inside an
epoch, then rerun to the end; its final state and every step's loss must equal those of
an uninterrupted run of the same setup.
"""

from __future__ import annotations

import json
import signal
import subprocess

import pytest
from _trainrun import PER_EPOCH, cmd, final_losses, reference, run, wait_for_progress

from ckpt.storage.store import Store

SETUPS = {
    "workers": ["--workers", "2"],
    "workers-global-rng": ["--workers", "2", "--no-generator"],
    "persistent": ["--workers", "2", "--persistent"],
    "stateful": ["--stateful", "--workers", "2"],
    "stateful-global-rng": ["--stateful", "--workers", "2", "--no-generator"],
    "augment-in-workers": ["--workers", "2", "--augment"],
}
SLOW_SETUPS = {
    "augment-persistent-global-rng": ["--workers", "2", "--persistent", "--augment", "--no-generator"],
    "augment-no-workers": ["--augment", "--no-generator"],
    "stateful-persistent": ["--stateful", "--workers", "2", "--persistent"],
}


def _kill_mid_epoch_then_resume(tmp_path, extra) -> None:
    ref_digest, ref_losses = reference(tmp_path / "ref", extra)
    store, digest, log = tmp_path / "store", tmp_path / "digest.json", tmp_path / "log"
    proc = subprocess.Popen(
        cmd(store, digest, log, [*extra, "--sleep", "0.05"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_for_progress(log, proc, 18)  # checkpoints at 12 and 16: both inside an epoch
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(60)
    resumed_from = Store(str(store)).latest_step()
    assert resumed_from is not None and resumed_from % PER_EPOCH != 0
    run(store, digest, log, extra)
    assert json.loads(digest.read_text()) == ref_digest
    assert final_losses(log) == ref_losses


@pytest.mark.parametrize("setup", list(SETUPS))
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path, setup):
    if "--stateful" in SETUPS[setup]:
        pytest.importorskip("torchdata.stateful_dataloader")
    _kill_mid_epoch_then_resume(tmp_path, SETUPS[setup])


@pytest.mark.slow
@pytest.mark.parametrize("setup", list(SLOW_SETUPS))
def test_more_setups_sigkill_then_resume_is_bit_identical(tmp_path, setup):
    if "--stateful" in SLOW_SETUPS[setup]:
        pytest.importorskip("torchdata.stateful_dataloader")
    _kill_mid_epoch_then_resume(tmp_path, SLOW_SETUPS[setup])

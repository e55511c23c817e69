"""DataLoader position: resume mid-epoch with exactly the batch that would have come next."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import ckpt


class Squares(Dataset):
    """Map-style dataset that counts fetches, to prove skipped batches are not loaded."""

    def __init__(self, n=50):
        self.n = n
        self.fetched = 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.fetched += 1
        return torch.tensor([i, i * i])


def _loader(seed, workers=0, generator=True, dataset=None, batch_size=4):
    ds = dataset if dataset is not None else TensorDataset(torch.arange(50))
    gen = torch.Generator().manual_seed(seed) if generator else None
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=gen, num_workers=workers)


def _batches(it, n):
    return [next(it)[0].tolist() for _ in range(n)]


def _reference(workers, generator, epochs=3):
    if not generator:
        torch.manual_seed(0)
    dl = ckpt.track(_loader(1, workers, generator))
    out = []
    for _ in range(epochs):
        out += [b[0].tolist() for b in dl]
    return out


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("generator", [True, False])
@pytest.mark.parametrize("consumed", [0, 5, 12, 13, 16])  # start, mid-epoch, an epoch boundary, epoch 2
def test_resume_mid_epoch(tmp_path, workers, generator, consumed):
    per_epoch = 13
    ref = _reference(workers, generator)
    if not generator:
        torch.manual_seed(0)
    dl = ckpt.track(_loader(1, workers, generator))
    got = []
    it = iter(dl)
    for _ in range(consumed):
        try:
            got.append(next(it)[0].tolist())
        except StopIteration:
            it = iter(dl)
            got.append(next(it)[0].tolist())
    state = {"loader": dl, "rng": ckpt.RNG()}
    ckpt.save(str(tmp_path), state, step=1)
    del it

    torch.manual_seed(12345)  # a different process state
    fresh = _loader(777, workers, generator)
    ckpt.restore(str(tmp_path), {"loader": fresh, "rng": ckpt.RNG()})
    rest = []
    epoch_left = per_epoch - consumed % per_epoch if consumed % per_epoch else (0 if consumed else per_epoch)
    rest += [b[0].tolist() for b in fresh]  # rest of the interrupted epoch
    assert len(rest) == epoch_left
    rest += [b[0].tolist() for b in fresh]  # the next full epoch continues the same stream
    assert got + rest == ref[: len(got) + len(rest)]


def test_skipped_batches_are_not_loaded(tmp_path):
    ds = Squares()
    dl = ckpt.track(_loader(3, dataset=ds))
    it = iter(dl)
    for _ in range(6):
        next(it)
    ckpt.save(str(tmp_path), {"loader": dl}, step=1)
    fresh_ds = Squares()
    fresh = _loader(3, dataset=fresh_ds)
    ckpt.restore(str(tmp_path), {"loader": fresh})
    first = next(iter(fresh))
    assert fresh_ds.fetched == 4  # only the batch handed out, none of the 6 skipped
    assert first.shape == (4, 2)


def test_untracked_loader_is_a_clear_error(tmp_path):
    with pytest.raises(ckpt.CheckpointError, match="ckpt.track"):
        ckpt.save(str(tmp_path), {"loader": _loader(0)}, step=1)


def test_length_mismatch_is_refused(tmp_path):
    dl = ckpt.track(_loader(0))
    next(iter(dl))
    ckpt.save(str(tmp_path), {"loader": dl}, step=1)
    other = _loader(0, batch_size=5)
    with pytest.raises(ckpt.StateMismatchError, match="batches per epoch"):
        ckpt.restore(str(tmp_path), {"loader": other})


def test_stateful_dataloader_uses_its_own_state(tmp_path):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    ds = TensorDataset(torch.arange(40))

    def make(seed):
        return sdl.StatefulDataLoader(ds, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed))

    ref = [b[0].tolist() for b in make(5)]
    dl = make(5)
    it = iter(dl)
    got = [next(it)[0].tolist() for _ in range(3)]
    ckpt.save(str(tmp_path), {"loader": dl}, step=1)
    fresh = make(6)
    ckpt.restore(str(tmp_path), {"loader": fresh})
    assert ckpt.load(str(tmp_path))["loader"]  # stored as a plain tree
    rest = [b[0].tolist() for b in fresh]
    assert got + rest == ref


class Noisy(Dataset):
    """Random augmentation drawn where the sample is loaded (inside the workers)."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.tensor([float(i)]) + torch.rand(1)


def _noisy_loader(persistent, seed=1):
    return DataLoader(
        Noisy(),
        batch_size=4,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
        num_workers=2,
        persistent_workers=persistent,
    )


@pytest.mark.parametrize("persistent", [False, True])
@pytest.mark.parametrize("consumed", [5, 13])  # mid-epoch in the first and the second epoch
def test_worker_randomness_and_persistent_workers_resume_exactly(tmp_path, persistent, consumed):
    dl = ckpt.track(_noisy_loader(persistent))
    ref = [b.tolist() for _ in range(3) for b in dl]
    dl = ckpt.track(_noisy_loader(persistent))
    got, it = [], iter(dl)
    for _ in range(consumed):
        b = next(it, None)
        if b is None:
            it = iter(dl)
            b = next(it)
        got.append(b.tolist())
    ckpt.save(str(tmp_path), {"loader": dl}, step=1)
    del it, dl
    fresh = _noisy_loader(persistent, seed=777)
    ckpt.restore(str(tmp_path), {"loader": fresh})
    while len(got) < len(ref):
        got += [b.tolist() for b in fresh]
    assert got == ref  # same order and the same random values, batch by batch


def test_stateful_dataloader_without_generator_keeps_the_global_rng(tmp_path):
    sdl = pytest.importorskip("torchdata.stateful_dataloader")
    ds = TensorDataset(torch.arange(40))
    torch.manual_seed(3)
    dl = sdl.StatefulDataLoader(ds, batch_size=4, shuffle=True)
    it = iter(dl)
    got = [next(it)[0].tolist() for _ in range(3)]
    ckpt.save(str(tmp_path), {"loader": dl, "rng": ckpt.RNG()}, step=1)
    ref = [next(it)[0].tolist(), torch.rand(4).tolist()]  # the next batch, then training's next draw
    torch.manual_seed(99)
    fresh = sdl.StatefulDataLoader(ds, batch_size=4, shuffle=True)
    ckpt.restore(str(tmp_path), {"loader": fresh, "rng": ckpt.RNG()})
    assert [next(iter(fresh))[0].tolist(), torch.rand(4).tolist()] == ref
    assert got

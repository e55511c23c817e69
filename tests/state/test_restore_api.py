"""The restore API a PyTorch user expects: strict=False, keys=, map_location, one object."""

from __future__ import annotations

import pytest
import torch

import ckpt
from ckpt.storage.store import Store
from ckpt.testing import assert_same_state, clone_state, corrupt_object, make_training_state


def _model(extra: bool = False) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2)]
    if extra:
        layers.append(torch.nn.Linear(2, 2))
    return torch.nn.Sequential(*layers)


def test_strict_false_loads_what_matches_and_names_the_rest(store_url):
    saved = _model(extra=True)
    ckpt.save(store_url, {"model": saved, "epoch": 3}, step=1)
    live = _model()
    with torch.no_grad():
        for p in live.parameters():
            p.zero_()
    with pytest.raises(ckpt.StateMismatchError, match="strict=False"):
        ckpt.restore(store_url, {"model": live})
    info = ckpt.restore(store_url, {"model": live, "absent": 1}, strict=False)
    assert info.unexpected_keys == ("model.3.weight", "model.3.bias")
    assert info.missing_keys == ("absent",)
    for name, p in live.named_parameters():
        assert torch.equal(p, saved.state_dict()[name])


def test_strict_false_reports_live_tensors_the_checkpoint_lacks(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"model": _model()}, step=1)
    live = _model(extra=True)
    info = ckpt.restore(url, {"model": live}, strict=False)
    assert info.missing_keys == ("model.3.weight", "model.3.bias")
    assert info.unexpected_keys == ()


def test_shape_mismatch_is_refused_even_when_not_strict(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"model": torch.nn.Linear(4, 4)}, step=1)
    with pytest.raises(ckpt.StateMismatchError, match="weight"):
        ckpt.restore(url, {"model": torch.nn.Linear(4, 5)}, strict=False)


def test_load_keys_reads_only_those_subtrees(tmp_path):
    url = f"file://{tmp_path}/s"
    state = make_training_state(seed=1)
    ckpt.save(url, state, step=1)
    manifest = ckpt.read_manifest(url)
    # damage every optimizer object: a load of the model alone never reads them
    # (each object once: small tensors share packed objects, and a second flip would undo the first)
    keys = {ref.key for path, entry in manifest.tensors.items() if path.startswith("optim/") for ref in entry.chunks}
    for key in keys:
        corrupt_object(Store(url), key)
    tree = ckpt.load(url, keys=["model"])
    assert set(tree) == {"model"}
    assert_same_state(tree["model"], clone_state(state["model"].state_dict()))
    with pytest.raises(ckpt.CorruptCheckpointError):
        ckpt.load(url)
    with pytest.raises(ckpt.CheckpointError, match="'nope'"):
        ckpt.load(url, keys=["nope"])


def test_map_location_forms(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"t": torch.arange(4.0), "n": {"u": torch.ones(2)}}, step=1)
    assert ckpt.load(url, map_location=torch.device("cpu"))["t"].device.type == "cpu"
    assert ckpt.load(url, map_location={"cpu": "meta"})["t"].device.type == "meta"
    seen = []
    tree = ckpt.load(url, map_location=lambda storage, loc: seen.append(loc))
    assert seen == ["cpu", "cpu"] and torch.equal(tree["t"], torch.arange(4.0))
    moved = ckpt.load(url, map_location=lambda storage, loc: storage)
    assert torch.equal(moved["n"]["u"], torch.ones(2))
    with pytest.raises(ckpt.CheckpointError, match="map_location"):
        ckpt.load(url, map_location=3.5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_unavailable_device_is_refused_before_any_read(tmp_path):
    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"t": torch.arange(4.0)}, step=1)
    for ref in ckpt.read_manifest(url).chunk_refs():
        corrupt_object(Store(url), ref.key)  # a read would raise CorruptCheckpointError instead
    for where in ("cuda", "cuda:1", {"cpu": "cuda:0"}):
        with pytest.raises(ckpt.CheckpointError, match="CUDA") as err:
            ckpt.load(url, map_location=where)
        assert not isinstance(err.value, ckpt.CorruptCheckpointError)
    with pytest.raises(ckpt.CheckpointError, match="CUDA"):
        ckpt.restore(url, {"t": torch.zeros(4)}, map_location="cuda")


def test_a_single_object_is_saved_and_restored_without_a_dict(store_url):
    model = _model()
    ckpt.save(store_url, model, step=1)
    assert set(ckpt.load(store_url)) == {"state"}
    live = _model(extra=False)
    with torch.no_grad():
        for p in live.parameters():
            p.add_(1.0)
    ckpt.restore(store_url, live)
    assert_same_state(clone_state(live.state_dict()), clone_state(model.state_dict()))
    with pytest.raises(ckpt.CheckpointError, match="mapping"):
        ckpt.save(store_url, object(), step=2)


def test_compiled_and_plain_modules_share_checkpoints(tmp_path):
    url = f"file://{tmp_path}/s"
    plain = _model()
    compiled = torch.compile(_model())
    with torch.no_grad():
        for p in compiled.parameters():
            p.mul_(2.0)
    ckpt.save(url, {"model": compiled}, step=1)
    assert all("_orig_mod" not in p for p in ckpt.read_manifest(url).tensors)
    ckpt.restore(url, {"model": plain})
    assert_same_state(clone_state(plain.state_dict()), clone_state(compiled._orig_mod.state_dict()))
    ckpt.save(url, {"model": _model()}, step=2)
    ckpt.restore(url, {"model": compiled}, step=2)
    assert_same_state(clone_state(compiled._orig_mod.state_dict()), clone_state(_model().state_dict()))


def test_optimizer_and_scheduler_classes_are_recorded_and_enforced(store_url):
    model = _model()
    adamw = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(adamw, step_size=2)
    model(torch.randn(3, 4)).sum().backward()
    adamw.step()
    ckpt.save(store_url, {"optim": adamw, "sched": sched}, step=1)
    assert ckpt.read_manifest(store_url).classes == {
        "optim": "torch.optim.adamw.AdamW",
        "sched": "torch.optim.lr_scheduler.StepLR",
    }
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(ckpt.StateMismatchError, match=r"AdamW.*SGD"):
        ckpt.restore(store_url, {"optim": sgd})
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(adamw, T_max=5)
    with pytest.raises(ckpt.StateMismatchError, match="StepLR"):
        ckpt.restore(store_url, {"sched": cosine})
    again = torch.optim.AdamW(model.parameters(), lr=0.5)
    ckpt.restore(store_url, {"optim": again})
    assert again.param_groups[0]["lr"] == 0.1


def test_map_location_maps_the_recorded_device(tmp_path):
    """The manifest records each tensor's device when it was not the CPU; a dict or callable
    ``map_location`` sees that location, as with ``torch.load``. (No GPU here: the record is
    written as a save from ``cuda:1`` would write it.)"""
    import json

    url = f"file://{tmp_path}/s"
    ckpt.save(url, {"t": torch.arange(4.0), "u": torch.ones(2)}, step=1)
    assert ckpt.read_manifest(url).devices == {}
    store = Store(url)
    doc = json.loads(store.read_manifest(1))
    doc["devices"] = {"t": "cuda:1"}
    store.write(store.manifest_path(1), json.dumps(doc).encode())
    assert ckpt.read_manifest(url).devices == {"t": "cuda:1"}
    seen = {}
    ckpt.load(url, map_location=lambda storage, loc: seen.setdefault(loc, storage.nbytes()) and None)
    assert seen == {"cuda:1": 16, "cpu": 8}
    tree = ckpt.load(url, map_location={"cuda:1": "meta"})
    assert tree["t"].device.type == "meta" and tree["u"].device.type == "cpu"

"""Third-party plugins, installed as real distributions with ``ckpt`` entry points:
discovery, listing, adapters and codecs through them, CKPT_DISABLE_PLUGINS, conflicts."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys

import numpy as np
import pytest
import torch

import ckpt
from ckpt.hooks.manager import PluginInfo, get_plugins, make_plugin_manager
from ckpt.io.verify import verify_manifest
from ckpt.storage.store import Store
from ckpt.testing import AdapterConformance, CodecConformance, rewrite_with_codec

POINT_PLUGIN = '''
import numpy as np
import torch

import ckpt

CALLS = {"decode": 0, "encode": 0, "load": 0}


class Point:
    """A custom class core knows nothing about."""

    def __init__(self, label="origin"):
        self.xyz = torch.zeros(3, dtype=torch.float64)
        self.label = label
        self.history = []


class PointAdapter:
    name = "fake.Point"

    def handles(self, obj):
        return isinstance(obj, Point)

    def state(self, obj):
        return {"xyz": obj.xyz, "label": obj.label, "history": tuple(obj.history)}

    def load(self, obj, tree):
        CALLS["load"] += 1
        obj.xyz.copy_(tree["xyz"])
        obj.label = tree["label"]
        obj.history = list(tree["history"])


class XorCodec:
    """Reversible and obviously not zstd: every byte xor a mask."""

    name = "xor8"

    def encode(self, data, ctx):
        CALLS["encode"] += 1
        mask = 0x5A
        return (np.frombuffer(data, dtype=np.uint8) ^ mask).tobytes(), {"mask": mask}

    def decode(self, payload, out, params, ctx):
        CALLS["decode"] += 1
        mask = params.get("mask")
        if type(mask) is not int or not 0 <= mask <= 255 or len(payload) != len(out):
            raise ckpt.CorruptCheckpointError(f"xor8: {len(payload)} bytes for {len(out)}, mask {mask!r}")
        np.bitwise_xor(np.frombuffer(payload, dtype=np.uint8), mask, out=np.frombuffer(out, dtype=np.uint8))


@ckpt.hookimpl
def ckpt_register_adapters(register):
    register(PointAdapter())


@ckpt.hookimpl
def ckpt_register_codecs(register):
    register(XorCodec())
'''

DIST = "ckpt-fake-point"


def _point_module(fake_plugin):
    module = fake_plugin(DIST, POINT_PLUGIN)
    get_plugins()  # loading the plugins imports the module
    return importlib.import_module(module)


def test_entry_point_plugin_is_discovered_and_listed(fake_plugin):
    mod = _point_module(fake_plugin)
    plugins = get_plugins()
    infos = {p.name: p for p in plugins.info()}
    assert infos[DIST] == PluginInfo(
        name=DIST, version="1.2.3", hooks=("ckpt_register_adapters", "ckpt_register_codecs")
    )
    assert infos["ckpt.hooks.defaults"].version == ckpt.__version__
    assert plugins.adapters.owner("fake.Point") == DIST
    assert plugins.codecs.owner("xor8") == DIST
    assert plugins.adapters.owner("torch.nn.Module") == "ckpt.hooks.defaults"
    assert plugins.versions()[DIST] == "1.2.3"
    assert isinstance(plugins.adapters.for_object(mod.Point()), mod.PointAdapter)


def test_plugin_versions_are_read_from_metadata_once(fake_plugin, monkeypatch, tmp_path):
    """Every save records the plugins' versions: parsing each distribution's METADATA every
    time cost a save about a millisecond. A distribution without a Version field is recorded
    as "" (not "None"), the first time and after."""
    _point_module(fake_plugin)
    fake_plugin("ckpt-nover", "")
    (metadata,) = tmp_path.glob("site-ckpt_nover_*/*.dist-info/METADATA")
    metadata.write_text("Metadata-Version: 2.1\nName: ckpt-nover\n")
    plugins = get_plugins()
    first = plugins.versions()
    assert first["ckpt-nover"] == ""
    reads: list[str] = []
    real = importlib.metadata.PathDistribution.read_text

    def read_text(self, filename):
        reads.append(filename)
        return real(self, filename)

    monkeypatch.setattr(importlib.metadata.PathDistribution, "read_text", read_text)
    assert plugins.versions() == first
    assert first[DIST] == "1.2.3"
    assert reads == []


def test_save_restore_through_plugin_adapter(fake_plugin, store_url):
    mod = _point_module(fake_plugin)
    p = mod.Point("saved")
    p.xyz += torch.tensor([1.0, -2.5, float("nan")], dtype=torch.float64)
    p.history = [1, (2, 3)]
    ckpt.save(store_url, {"p": p, "model": torch.nn.Linear(2, 2)}, step=1)

    manifest = ckpt.read_manifest(store_url, 1)
    assert manifest.adapters == {"p": "fake.Point", "model": "torch.nn.Module"}
    assert manifest.plugins[DIST] == "1.2.3", "the manifest records the plugins used"

    tree = ckpt.load(store_url)
    assert tree["p"]["label"] == "saved" and tree["p"]["history"] == (1, (2, 3))
    assert torch.equal(tree["p"]["xyz"].view(torch.int64), p.xyz.view(torch.int64))

    fresh = mod.Point()
    ckpt.restore(store_url, {"p": fresh})
    assert mod.CALLS["load"] == 1
    assert fresh.label == "saved" and fresh.history == [1, (2, 3)]
    assert torch.equal(fresh.xyz.view(torch.int64), p.xyz.view(torch.int64))


def test_plugin_codec_decodes_objects_written_with_it(fake_plugin, store_url, monkeypatch):
    mod = _point_module(fake_plugin)
    weights = torch.randn(40, 40)
    ckpt.save(store_url, {"w": weights, "ids": torch.arange(100)}, step=1)
    store = Store(store_url)
    assert len(rewrite_with_codec(store_url, 1, "xor8", paths=["w", "ids"])) == 2
    key = ckpt.read_manifest(store.url, 1).tensors["w"].chunks[0].key
    assert store.get_object(key) == (weights.numpy().view(np.uint8) ^ 0x5A).tobytes()

    live = {"w": torch.zeros(40, 40), "ids": torch.zeros(100, dtype=torch.int64)}
    ckpt.restore(store_url, live)
    assert torch.equal(live["w"], weights) and torch.equal(live["ids"], torch.arange(100))
    assert mod.CALLS["decode"] == 2
    assert verify_manifest(store, get_plugins().codecs, ckpt.read_manifest(store.url, 1)) == []

    # without the plugin the codec is unknown: a clear error, not garbage
    monkeypatch.setenv("CKPT_DISABLE_PLUGINS", DIST)
    with pytest.raises(ckpt.UnknownCodecError) as exc:
        ckpt.load(store_url)
    msg = str(exc.value)
    assert "xor8" in msg and ("'w'" in msg or "'ids'" in msg)


def test_disabled_plugin_is_not_even_imported(fake_plugin, store_url, monkeypatch):
    module = fake_plugin(DIST, POINT_PLUGIN)
    monkeypatch.setenv("CKPT_DISABLE_PLUGINS", f" other-plugin , {DIST}")
    plugins = get_plugins()
    assert module not in sys.modules, "a disabled plugin's code must not run"
    assert DIST not in {p.name for p in plugins.info()}
    assert plugins.adapters.get("fake.Point") is None and "xor8" not in plugins.codecs

    monkeypatch.delenv("CKPT_DISABLE_PLUGINS")
    mod = importlib.import_module(module) if module in sys.modules else _point_module_again(module)
    ckpt.save(store_url, {"p": mod.Point()}, step=1)  # enabled: works
    monkeypatch.setenv("CKPT_DISABLE_PLUGINS", DIST)
    with pytest.raises(ckpt.UnsupportedValueError, match="^p: .*adapter plugin"):
        ckpt.save(store_url, {"p": mod.Point()}, step=2)
    with pytest.raises(ckpt.UnsupportedValueError, match="^p: "):
        ckpt.restore(store_url, {"p": mod.Point()})
    # the data itself needs no plugin: it loads as a plain tree
    assert ckpt.load(store_url)["p"]["label"] == "origin"


def _point_module_again(module: str):
    get_plugins()
    return importlib.import_module(module)


def test_plugin_adapter_for_a_subclass_wins_over_builtin(fake_plugin, store_url):
    module = fake_plugin(
        "ckpt-fake-special",
        """
import torch, ckpt

class Special(torch.nn.Linear):
    pass

class SpecialAdapter:
    name = "fake.Special"
    def handles(self, obj):
        return isinstance(obj, Special)
    def state(self, obj):
        return {"w": obj.weight, "b": obj.bias, "note": "special"}
    def load(self, obj, tree):
        with torch.no_grad():
            obj.weight.copy_(tree["w"]); obj.bias.copy_(tree["b"])

@ckpt.hookimpl
def ckpt_register_adapters(register):
    register(SpecialAdapter())
""",
    )
    get_plugins()
    mod = importlib.import_module(module)
    special = mod.Special(3, 3)
    ckpt.save(store_url, {"m": special, "plain": torch.nn.Linear(3, 3)}, step=1)
    assert ckpt.read_manifest(store_url, 1).adapters == {"m": "fake.Special", "plain": "torch.nn.Module"}
    assert ckpt.load(store_url)["m"]["note"] == "special"


DUP_ADAPTER = """
import ckpt

class Impostor:
    name = "torch.nn.Module"
    def handles(self, obj): return False
    def state(self, obj): return {}
    def load(self, obj, tree): pass

@ckpt.hookimpl
def ckpt_register_adapters(register):
    register(Impostor())
"""


def test_duplicate_adapter_name_names_both_plugins(fake_plugin):
    fake_plugin("ckpt-impostor", DUP_ADAPTER)
    with pytest.raises(ckpt.PluginError) as exc:
        get_plugins()
    msg = str(exc.value)
    assert "'torch.nn.Module'" in msg and "'ckpt-impostor'" in msg and "'ckpt.hooks.defaults'" in msg


def test_duplicate_codec_name_names_both_plugins(fake_plugin, monkeypatch):
    codec_plugin = """
import ckpt

class Codec:
    name = "shared-name"
    def encode(self, data, ctx): return None
    def decode(self, payload, out, params, ctx): out[:] = payload

@ckpt.hookimpl
def ckpt_register_codecs(register):
    register(Codec())
"""
    fake_plugin("ckpt-codec-a", codec_plugin)
    fake_plugin("ckpt-codec-b", codec_plugin)
    with pytest.raises(ckpt.PluginError) as exc:
        get_plugins()
    msg = str(exc.value)
    assert "'shared-name'" in msg and "'ckpt-codec-a'" in msg and "'ckpt-codec-b'" in msg
    # disabling either one resolves the conflict
    monkeypatch.setenv("CKPT_DISABLE_PLUGINS", "ckpt-codec-b")
    assert get_plugins().codecs.owner("shared-name") == "ckpt-codec-a"


def test_duplicate_builtin_codec_name(fake_plugin):
    fake_plugin(
        "ckpt-zstd-clash",
        """
import ckpt
class Z:
    name = "zstd"
    def encode(self, data, ctx): return None
    def decode(self, payload, out, params, ctx): pass
@ckpt.hookimpl
def ckpt_register_codecs(register):
    register(Z())
""",
    )
    with pytest.raises(
        ckpt.PluginError,
        match="'zstd'.*'ckpt-zstd-clash'.*'ckpt.hooks.defaults'|'zstd'.*'ckpt.hooks.defaults'.*'ckpt-zstd-clash'",
    ):
        get_plugins()


@pytest.mark.parametrize(
    "body, words",
    [
        ("raise RuntimeError('boom at import')", "'ckpt-broken'.*boom at import"),
        (
            "import ckpt\n@ckpt.hookimpl\ndef ckpt_register_adapters(register):\n    raise RuntimeError('kaput')",
            "'ckpt-broken'",
        ),
        (
            "import ckpt\nclass A:\n    name = 'x'\n@ckpt.hookimpl\ndef ckpt_register_adapters(register):\n    register(A())",
            "lacks handles()",
        ),
        (
            "import ckpt\nclass C:\n    pass\n@ckpt.hookimpl\ndef ckpt_register_codecs(register):\n    register(C())",
            "has no name",
        ),
        ("import ckpt\n@ckpt.hookimpl\ndef ckpt_no_such_hook():\n    pass", "'ckpt-broken'.*ckpt_no_such_hook"),
    ],
    ids=["import-error", "hook-raises", "adapter-incomplete", "codec-unnamed", "unknown-hook"],
)
def test_broken_plugin_is_a_plugin_error(fake_plugin, body, words):
    fake_plugin("ckpt-broken", body)
    with pytest.raises(ckpt.PluginError, match=words):
        get_plugins()


@pytest.mark.parametrize("option", ["wrapper=True", "hookwrapper=True"])
@pytest.mark.parametrize("hook", ["ckpt_register_adapters", "ckpt_register_codecs"])
def test_registration_hooks_refuse_wrappers(fake_plugin, hook, option):
    """ckpt calls registration hooks one implementation at a time: a wrapper would silently never run."""
    ret = "return (yield)" if option == "wrapper=True" else "yield"
    fake_plugin("ckpt-wrapping", f"import ckpt\n@ckpt.hookimpl({option})\ndef {hook}(register):\n    {ret}\n")
    with pytest.raises(ckpt.PluginError, match=f"'ckpt-wrapping' implements {hook} with {option}"):
        get_plugins()


def test_lifecycle_hooks_take_wrappers(fake_plugin, store_url):
    module = fake_plugin(
        "ckpt-timing",
        """
import ckpt
CALLS = []
@ckpt.hookimpl(wrapper=True)
def ckpt_after_commit(info):
    CALLS.append(("enter", info.step))
    result = yield
    CALLS.append(("exit", info.step))
    return result
""",
    )
    get_plugins()
    ckpt.save(store_url, {"x": torch.ones(2)}, step=4)
    assert importlib.import_module(module).CALLS == [("enter", 4), ("exit", 4)]


def test_factory_builds_fresh_managers(fake_plugin):
    fake_plugin(DIST, POINT_PLUGIN)
    a, b = make_plugin_manager(), make_plugin_manager()
    assert a is not b
    assert a.has_plugin(DIST) and b.has_plugin(DIST)
    assert not make_plugin_manager(load_entrypoints=False).has_plugin(DIST)
    assert get_plugins() is get_plugins(), "cached per CKPT_DISABLE_PLUGINS value"


class TestPluginAdapterConformance(AdapterConformance):
    """The conformance suite, used as a plugin author would use it."""

    adapter_name = "fake.Point"

    @pytest.fixture(autouse=True)
    def _installed(self, fake_plugin):
        self.mod = _point_module(fake_plugin)

    @pytest.fixture
    def make_object(self):
        return lambda: self.mod.Point()

    @pytest.fixture
    def mutate(self):
        def mutate(p):
            p.xyz += torch.randn(3, dtype=torch.float64)
            p.label += "!"
            p.history.append(len(p.history))

        return mutate


class TestPluginCodecConformance(CodecConformance):
    """The codec conformance suite, used as a plugin author would use it."""

    codec_name = "xor8"

    @pytest.fixture(autouse=True)
    def _installed(self, fake_plugin):
        _point_module(fake_plugin)

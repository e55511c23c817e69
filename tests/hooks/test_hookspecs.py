"""Meta-tests: every hookspec is documented, and every hookspec is called with the
arguments it documents (a recording plugin, installed as a distribution, sees them all)."""

from __future__ import annotations

import importlib
import inspect
import re

import click
import pytest
import torch
from click.testing import CliRunner

import ckpt
from ckpt.hooks import hookspecs
from ckpt.hooks.manager import get_plugins

SPECS = {
    name: fn
    for name, fn in vars(hookspecs).items()
    if name.startswith("ckpt_") and callable(fn) and hasattr(fn, "ckpt_spec")
}


def test_hookspecs_are_found():
    assert {
        "ckpt_register_adapters",
        "ckpt_register_codecs",
        "ckpt_register_commands",
        "ckpt_register_key_providers",
        "ckpt_before_save",
        "ckpt_after_commit",
        "ckpt_after_restore",
    } <= set(SPECS), "the core hooks are specs"


@pytest.mark.parametrize("name", sorted(SPECS))
def test_hookspec_is_documented(name):
    fn = SPECS[name]
    doc = inspect.getdoc(fn)
    assert doc, f"{name} has no docstring"
    summary = doc.splitlines()[0]
    assert summary.endswith(".") and len(summary) > 15, f"{name}: one-line summary first"
    params = list(inspect.signature(fn).parameters)
    assert params, f"{name} takes no arguments"
    documented = re.findall(r"^:param (\w+):\s*\S", doc, flags=re.MULTILINE)
    assert documented == params, f"{name}: :param: lines {documented} must match the arguments {params}, in order"


RECORDER = """
import click
import ckpt

CALLS = []


class Adapter:
    name = "recorder.Marker"
    def handles(self, obj):
        return type(obj).__name__ == "Marker"
    def state(self, obj):
        return {"n": obj.n}
    def load(self, obj, tree):
        obj.n = tree["n"]


class Codec:
    name = "recorder-identity"
    def encode(self, data, ctx):
        return None
    def decode(self, payload, out, params, ctx):
        out[:] = payload


@ckpt.hookimpl
def ckpt_register_adapters(register):
    CALLS.append(("ckpt_register_adapters", {"register": register}))
    register(Adapter())


@ckpt.hookimpl
def ckpt_register_codecs(register):
    CALLS.append(("ckpt_register_codecs", {"register": register}))
    register(Codec())


class KeyProvider:
    key_id = "recorder:k1"
    def __init__(self, rest):
        self.rest = rest
    def wrap(self, data_key):
        return bytes(b ^ 0x5A for b in data_key)
    def unwrap(self, wrapped):
        return bytes(b ^ 0x5A for b in wrapped)


@ckpt.hookimpl
def ckpt_register_key_providers(register):
    CALLS.append(("ckpt_register_key_providers", {"register": register}))
    register("recorder", KeyProvider)


@ckpt.hookimpl
def ckpt_register_commands(cli):
    CALLS.append(("ckpt_register_commands", {"cli": cli}))

    @click.command("recorded")
    def recorded():
        click.echo("recorded command ran")

    cli.add_command(recorded)


@ckpt.hookimpl
def ckpt_before_save(url, step, tree):
    CALLS.append(("ckpt_before_save", {"url": url, "step": step, "tree": tree, "steps_on_disk": ckpt.steps(url)}))


@ckpt.hookimpl
def ckpt_after_commit(info):
    CALLS.append(("ckpt_after_commit", {"info": info}))


@ckpt.hookimpl
def ckpt_after_restore(info, state):
    CALLS.append(("ckpt_after_restore", {"info": info, "state": state, "n": state["marker"].n}))
"""


def test_every_hookspec_is_exercised(fake_plugin, store_url):
    module = fake_plugin("ckpt-recorder", RECORDER)
    plugins = get_plugins()
    rec = importlib.import_module(module)
    calls = rec.CALLS

    def called(name):
        return [kw for hook, kw in calls if hook == name]

    # registration hooks: called once each with the typed registries
    assert [type(kw["register"]) for kw in called("ckpt_register_adapters")] == [ckpt.AdapterRegistry]
    assert [type(kw["register"]) for kw in called("ckpt_register_codecs")] == [ckpt.CodecRegistry]
    assert plugins.adapters.owner("recorder.Marker") == "ckpt-recorder"
    assert plugins.codecs.owner("recorder-identity") == "ckpt-recorder"
    from ckpt.security.providers import KeyProviderRegistry

    assert [type(kw["register"]) for kw in called("ckpt_register_key_providers")] == [KeyProviderRegistry]
    assert plugins.key_providers.owner("recorder") == "ckpt-recorder"
    assert plugins.key_providers.owner("kms") == "ckpt.hooks.defaults"
    provider = plugins.key_provider("recorder:some/where")
    assert provider.rest == "some/where" and provider.unwrap(provider.wrap(b"k" * 32)) == b"k" * 32

    # lifecycle hooks
    class Marker:
        n = 0

    marker = Marker()
    marker.n = 41
    info = ckpt.save(store_url, {"marker": marker, "w": torch.ones(3)}, step=7)
    (before,) = called("ckpt_before_save")
    assert before["step"] == 7 and before["url"] == info.url
    assert before["tree"]["marker"] == {"n": 41} and torch.equal(before["tree"]["w"], torch.ones(3))
    assert before["steps_on_disk"] == [], "before_save runs before anything is committed"
    (after,) = called("ckpt_after_commit")
    assert after["info"] == info

    state = {"marker": Marker()}
    restored = ckpt.restore(store_url, state)
    (after_restore,) = called("ckpt_after_restore")
    assert after_restore["info"] == restored and restored.step == 7
    assert after_restore["state"] is state and after_restore["n"] == 41, "called after the state was loaded"

    # command registration, through the real CLI
    from ckpt.cli import build_cli

    root = build_cli()
    (cmd_call,) = called("ckpt_register_commands")
    assert isinstance(cmd_call["cli"], click.Group) and cmd_call["cli"] is root
    result = CliRunner().invoke(root, ["recorded"])
    assert result.exit_code == 0 and "recorded command ran" in result.output
    group = click.Group("other")
    plugins.register_commands(cli=group)
    assert "recorded" in group.commands

    assert {hook for hook, _ in calls} == set(SPECS), "a hookspec no test calls"

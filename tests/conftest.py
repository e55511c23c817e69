"""Shared fixtures. ``store_url`` runs a test on every store kind the machine offers."""

from __future__ import annotations

import uuid

import pytest

from ckpt.testing import reset_plugins, store_url_fixture

STORE_KINDS = [
    "file",
    "memory",
    pytest.param("s3", marks=pytest.mark.server),
    pytest.param("az", marks=pytest.mark.server),
]


@pytest.fixture(autouse=True)
def _fresh_plugins():
    reset_plugins()
    yield
    reset_plugins()


def _start_server(factory, kind: str):
    from servers import ServerUnavailable, register_fsspec_defaults, unregister_fsspec_defaults

    try:
        server = factory().start()
    except ServerUnavailable as exc:
        # the tool itself is absent (no Node.js): skip; any other start failure fails the tests
        pytest.skip(f"{kind} server unavailable: {exc}")
    register_fsspec_defaults(server)
    return server, unregister_fsspec_defaults


@pytest.fixture(scope="session")
def s3_server():
    """moto S3 on 127.0.0.1 for the whole session; plain ``s3://`` URLs reach it (fsspec config)."""
    from servers import MotoS3

    server, unregister = _start_server(MotoS3, "s3")
    yield server
    unregister("s3")
    server.stop()


@pytest.fixture(scope="session")
def kms_server(s3_server):
    """moto's KMS on 127.0.0.1: the ``s3_server`` itself (moto serves every AWS API on one
    port); ``kms_server.new_kms_key()`` makes a key, ``kms_options`` reach it."""
    return s3_server


@pytest.fixture(scope="session")
def az_server():
    """azurite (Blob) on 127.0.0.1 for the whole session; plain ``az://`` URLs reach it."""
    from servers import Azurite

    server, unregister = _start_server(Azurite, "az")
    yield server
    unregister("az")
    server.stop()


@pytest.fixture
def store_server(request):
    """The server behind ``store_url`` (None for file and memory stores)."""
    kind = request.getfixturevalue("store_url").split("://", 1)[0]
    return request.getfixturevalue(f"{kind}_server") if kind in ("s3", "az") else None


#: a fresh, empty store URL of each kind (s3 and az: a new prefix on the session's server).
#: Remote URLs need no ``storage_options``: the server fixtures register them as fsspec
#: defaults; ``store_server.storage_options`` has them for explicit use.
store_url = store_url_fixture(STORE_KINDS, servers={"s3": "s3_server", "az": "az_server"})


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    """Install a plugin *distribution* for this test only: ``fake_plugin(dist, source)``.

    Writes ``<module>.py`` and ``<dist>-<version>.dist-info/{METADATA,entry_points.txt}``
    into a temporary directory on ``sys.path``, so ``importlib.metadata`` (and so pluggy's
    entry-point loading) finds it exactly as it finds a pip-installed plugin. Returns the
    module name; the module is imported only when ckpt loads its plugins.
    """
    import sys

    made: list[str] = []

    def install(dist: str, source: str, *, version: str = "1.2.3") -> str:
        module = f"{dist.replace('-', '_')}_{uuid.uuid4().hex[:8]}"
        base = tmp_path / f"site-{module}"
        base.mkdir()
        (base / f"{module}.py").write_text(source)
        info = base / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[ckpt]\n{dist} = {module}\n")
        monkeypatch.syspath_prepend(str(base))
        made.append(module)
        reset_plugins()
        return module

    yield install
    for module in made:
        sys.modules.pop(module, None)
    reset_plugins()

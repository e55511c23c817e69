"""Fresh, empty store URLs for tests, and the pytest fixtures that hand them out.

One implementation serves ckpt's own tests and plugin authors: :func:`temporary_store_url`
makes a URL of one kind and removes what the test wrote; :func:`store_url_fixture` turns
a list of kinds into a parametrized ``store_url`` fixture. A plugin's ``conftest.py``::

    from ckpt.testing import store_url  # file:// and memory://, one run of each test per kind

or, with a server of its own (anything with ``kind``, ``storage_options`` and ``new_url``)::

    store_url = store_url_fixture(["file", "memory", "s3"], servers={"s3": "my_s3_server"})
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import pytest

#: store kinds every machine offers (no server needed)
LOCAL_STORE_KINDS = ("file", "memory")


class StoreServer(Protocol):
    """A storage server a test reaches by URL (moto for S3, azurite for Azure Blob...)."""

    #: the fsspec protocol of its URLs ("s3", "az", ...)
    kind: str

    @property
    def storage_options(self) -> Mapping[str, Any]:
        """What an fsspec client needs to reach the server."""

    def new_url(self, label: str = "t") -> str:
        """A URL under which nothing exists yet."""


@contextmanager
def temporary_store_url(
    kind: str, directory: str | Path, *, server: StoreServer | None = None, label: str = "store"
) -> Iterator[str]:
    """A fresh, empty store URL of ``kind``; what was written under it is removed afterwards.

    ``file`` stores live under ``directory`` (a pytest ``tmp_path``, which pytest removes),
    ``memory`` stores under a random root, other kinds on ``server`` (a new prefix each time).
    """
    import fsspec

    name = re.sub(r"[^A-Za-z0-9_-]+", "-", label).strip("-")[:48] or "store"
    if kind == "file":
        yield f"file://{Path(directory) / name}"
        return
    if kind == "memory":
        url = f"memory://ckpt-test-{name}-{uuid.uuid4().hex}"
        options: Mapping[str, Any] = {}
    elif server is None:
        raise ValueError(f"a {kind!r} store URL needs a server")
    else:
        url = server.new_url(name)
        options = server.storage_options
    try:
        yield url
    finally:
        fs, root = fsspec.core.url_to_fs(url, **options)
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass


def store_url_fixture(kinds: Sequence[Any] = LOCAL_STORE_KINDS, *, servers: Mapping[str, str] | None = None) -> Any:
    """A ``store_url`` fixture run once per kind in ``kinds`` (plain names or ``pytest.param``).

    ``servers`` maps a remote kind to the name of the fixture giving its :class:`StoreServer`;
    that fixture is only requested by the tests of its kind.
    """
    servers = dict(servers or {})

    @pytest.fixture(params=list(kinds))
    def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
        """A fresh, empty store URL of each kind."""
        kind = request.param
        server = request.getfixturevalue(servers[kind]) if kind in servers else None
        with temporary_store_url(kind, tmp_path, server=server, label=request.node.name) as url:
            yield url

    return store_url


#: ``store_url`` on every :data:`LOCAL_STORE_KINDS`; import it into a conftest.py to use it
store_url: Callable[..., Any] = store_url_fixture()

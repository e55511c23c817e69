"""The storage contract, checked on every store kind: file, memory, s3 (moto) and az (azurite)."""

from __future__ import annotations

import pytest

from ckpt.testing import StoreConformance


class TestStoreConformance(StoreConformance):
    @pytest.fixture
    def store_url(self, store_url):
        return store_url  # tests/conftest.py: a fresh store of each kind

    @pytest.fixture
    def storage_options(self, store_server):
        # explicit options for the servers, though plain URLs reach them too (fsspec config)
        return dict(store_server.storage_options) if store_server is not None else {}

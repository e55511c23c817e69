"""Faults: transient errors are retried, persistent ones fail in bounded time, torn writes are caught.

The store runs on top of ``faulty://`` (tests/faultfs.py), which wraps the in-memory
filesystem or a real S3 server (moto) and fails, delays or truncates calls.
"""

from __future__ import annotations

import errno
import time
import uuid

import faultfs  # noqa: F401 - registers faulty://
import fsspec
import pytest
import torch

import ckpt
from ckpt.errors import CorruptCheckpointError, MissingObjectError, StoreError
from ckpt.hooks.manager import get_plugins
from ckpt.io.verify import verify_manifest
from ckpt.storage.retry import Retrier, RetryPolicy, is_transient
from ckpt.storage.store import Store

# -- classification --------------------------------------------------------------------------


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )


def _azure_error(status: int):
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    cls = ResourceNotFoundError if status == 404 else HttpResponseError
    err = cls(message=f"status {status}")
    err.status_code = status
    return err


def _chained(outer: Exception, cause: Exception) -> Exception:
    outer.__cause__ = cause
    return outer


@pytest.mark.parametrize(
    "make, transient",
    [
        (lambda: ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (lambda: ConnectionRefusedError(errno.ECONNREFUSED, "refused"), True),
        (lambda: TimeoutError("timed out"), True),
        (lambda: OSError(errno.EBUSY, "503 SlowDown"), True),
        (lambda: OSError(errno.EIO, "500"), True),
        (lambda: _client_error("SlowDown", 503), True),
        (lambda: _client_error("Throttling", 400), True),
        (lambda: _client_error("InternalError", 500), True),
        (lambda: _client_error("Whatever", 502), True),
        (lambda: _client_error("TooManyRequests", 429), True),
        (lambda: _azure_error(503), True),
        (lambda: _azure_error(429), True),
        # s3fs wraps unknown service errors in OSError(EIO): the service's code decides
        (lambda: _chained(OSError(errno.EIO, "x"), _client_error("SlowDown", 503)), True),
        (lambda: _chained(OSError(errno.EIO, "x"), _client_error("InvalidArgument", 400)), False),
        (lambda: FileNotFoundError("gone"), False),
        (lambda: _chained(FileNotFoundError("gone"), ConnectionResetError("x")), False),
        (lambda: PermissionError("denied"), False),
        (lambda: _client_error("AccessDenied", 403), False),
        (lambda: _azure_error(404), False),
        (lambda: _azure_error(400), False),
        (lambda: ValueError("bad"), False),
        (lambda: CorruptCheckpointError("bad hash"), False),
        (lambda: OSError(errno.ENOSPC, "disk full"), False),
    ],
)
def test_transient_errors_are_told_from_permanent_ones(make, transient):
    assert is_transient(make()) is transient


def test_backoff_grows_with_jitter_and_is_capped():
    policy = RetryPolicy(retries=10, base_delay=0.1, max_delay=1.0, max_seconds=60)
    for attempt in range(10):
        cap = min(1.0, 0.1 * 2**attempt)
        delays = {round(policy.delay(attempt), 6) for _ in range(50)}
        assert all(cap / 2 <= d <= cap for d in delays)
        assert len(delays) > 1, "jitter: retries of many clients must not line up"


def test_env_knobs_configure_the_policy(monkeypatch):
    monkeypatch.setenv("CKPT_RETRIES", "3")
    monkeypatch.setenv("CKPT_RETRY_BASE_DELAY", "0.5")
    monkeypatch.setenv("CKPT_RETRY_MAX_SECONDS", "7")
    assert RetryPolicy.from_env() == RetryPolicy(retries=3, base_delay=0.5, max_delay=10.0, max_seconds=7.0)
    monkeypatch.setenv("CKPT_RETRIES", "many")
    with pytest.raises(ckpt.CheckpointError, match="CKPT_RETRIES"):
        RetryPolicy.from_env()


def test_retrier_retries_transient_errors_and_logs_them(caplog):
    retrier = Retrier(RetryPolicy(retries=5, base_delay=0.001), where="s3://b/p")
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise ConnectionResetError("reset")
        return "ok"

    with caplog.at_level("WARNING", logger="ckpt"):
        assert retrier.call(flaky, "writing x") == "ok"
    assert len(attempts) == 3 and retrier.retried == 2
    assert sum("retry" in r.message and "s3://b/p" in r.message for r in caplog.records) == 2


def test_file_not_found_is_never_retried():
    retrier = Retrier(RetryPolicy(retries=5, base_delay=0.001))
    attempts = []

    def missing():
        attempts.append(1)
        raise FileNotFoundError("nope")

    with pytest.raises(FileNotFoundError):
        retrier.call(missing, "reading x")
    assert len(attempts) == 1


# -- the store under injected faults ---------------------------------------------------------


def _state(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    return {
        "w": {f"t{i}": torch.randn(3000 + 100 * i, generator=g) for i in range(n)},
        "i": torch.randint(-(2**40), 2**40, (5000,), generator=g),
        "h": torch.randn(4000, generator=g).to(torch.bfloat16),
        "meta": {"seed": seed},
    }


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], dict):
            _assert_same(a[k], b[k])
        elif isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
            assert torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)), k
        else:
            assert a[k] == b[k], k


@pytest.fixture
def fast_retries(monkeypatch):
    monkeypatch.setenv("CKPT_RETRY_BASE_DELAY", "0.002")
    monkeypatch.setenv("CKPT_RETRIES", "10")
    monkeypatch.setenv("CKPT_CHUNK_BYTES", "4096")  # many objects, many calls


@pytest.fixture(params=["memory", pytest.param("s3", marks=pytest.mark.server)])
def faulty(request):
    """(url, storage_options factory, plain URL of the same store) over memory or moto S3."""
    kind = request.param
    tag = uuid.uuid4().hex[:12]
    if kind == "memory":
        target, target_options, path = "memory", {}, f"ckpt-faults-{tag}"
        plain = f"memory://{path}"
    else:
        server = request.getfixturevalue("s3_server")
        target, target_options, path = "s3", server.storage_options, f"{server.bucket}/faults-{tag}"
        plain = f"s3://{path}"

    def options(**faults):
        return {"target_protocol": target, "target_options": target_options, "tag": tag, **faults}

    return f"faulty://{path}", options, plain


def test_saves_and_loads_under_15_percent_failed_calls_are_bit_exact(faulty, fast_retries):
    url, options, plain = faulty
    so = options(fail_rate=0.15, delay=0.002, seed=1)
    fs = fsspec.filesystem("faulty", **so)
    states = {}
    for step in range(3):
        states[step] = _state(step)
        info = ckpt.save(url, states[step], step=step, storage_options=so)
        assert info.step == step
    # read back under faults: newest, an older step, and in place into live tensors
    _assert_same(ckpt.load(url, storage_options=so), states[2])
    _assert_same(ckpt.load(url, step=0, storage_options=so), states[0])
    live = _state(99)
    ckpt.restore(url, live, step=1, storage_options=so)
    _assert_same(live, states[1])
    # faults really happened, on writes and reads, and nothing failed for good
    assert fs.failures["pipe_file"] >= 5 and fs.failures["cat_file"] >= 5, fs.failures
    total = sum(fs.calls.values())
    assert 0.08 < sum(fs.failures.values()) / total < 0.25
    # the store is exactly what a fault-free run would give
    assert Store(plain).steps() == [0, 1, 2]
    _assert_same(ckpt.load(plain, step=1), states[1])


def test_persistent_failure_raises_naming_the_url_in_bounded_time(faulty, monkeypatch):
    url, options, plain = faulty
    monkeypatch.setenv("CKPT_RETRY_BASE_DELAY", "0.05")
    monkeypatch.setenv("CKPT_RETRY_MAX_SECONDS", "1.5")
    monkeypatch.setenv("CKPT_CHUNK_BYTES", "4096")
    good = _state(1)
    ckpt.save(url, good, step=1, storage_options=options(seed=2))
    broken = options(fail_rate=1.0, ops=["pipe_file"], seed=3)
    t0 = time.monotonic()
    with pytest.raises(StoreError) as err:
        ckpt.save(url, _state(2), step=2, storage_options=broken)
    elapsed = time.monotonic() - t0
    assert url in str(err.value) and "attempt" in str(err.value)
    # ~36 objects would each take the whole budget without the shared outage clock
    assert elapsed < 6, elapsed
    assert fsspec.filesystem("faulty", **broken).failures["pipe_file"] >= 2
    # no manifest of the failed save is visible; the previous checkpoint stays the newest
    store = Store(plain)
    assert store.steps() == [1]
    assert store.read_latest() == 1
    _assert_same(ckpt.load(plain), good)


def test_outage_that_ends_is_ridden_out(faulty, monkeypatch):
    """A service down for a while (every call fails), then back: the save completes."""
    url, options, plain = faulty
    monkeypatch.setenv("CKPT_RETRY_BASE_DELAY", "0.05")
    monkeypatch.setenv("CKPT_RETRY_MAX_SECONDS", "20")
    so = options(fail_rate=1.0, seed=4)
    fs = fsspec.filesystem("faulty", **so)
    state = _state(5)

    import threading

    def recover():
        time.sleep(0.5)
        fs.fail_rate = 0.0

    threading.Thread(target=recover, daemon=True).start()
    t0 = time.monotonic()
    ckpt.save(url, state, step=7, storage_options=so)
    assert time.monotonic() - t0 >= 0.4
    assert sum(fs.failures.values()) >= 3
    _assert_same(ckpt.load(plain), state)


def test_torn_writes_are_detected_on_read(faulty, fast_retries):
    url, options, plain = faulty
    so = options(truncate_rate=0.3, truncate_match="/objects/", seed=5)
    state = _state(6)
    ckpt.save(url, state, step=1, storage_options=so)  # the writes "succeed"
    torn = fsspec.filesystem("faulty", **so).truncated
    assert torn, "some objects must have been torn"
    with pytest.raises(CorruptCheckpointError) as err:
        ckpt.load(plain)
    msg = str(err.value)
    assert "tensor" in msg and any(p.rsplit("/", 1)[-1] in msg for p in torn)
    store = Store(plain)

    problems = verify_manifest(store, get_plugins().codecs, ckpt.read_manifest(store.url, 1))
    assert {p.key for p in problems} == {p.rsplit("/", 1)[-1] for p in torn}


def test_torn_manifest_is_detected(faulty, fast_retries):
    url, options, plain = faulty
    so = options(truncate_rate=1.0, truncate_match="/manifests/", seed=6)
    ckpt.save(url, _state(7), step=3, storage_options=so)
    with pytest.raises(CorruptCheckpointError, match="step 3"):
        ckpt.load(plain)


def test_missing_object_is_not_retried_into_a_timeout(faulty, monkeypatch):
    url, options, plain = faulty
    monkeypatch.setenv("CKPT_RETRY_BASE_DELAY", "1")
    so = options(seed=7)
    store = Store(url, so)
    t0 = time.monotonic()
    with pytest.raises(MissingObjectError, match="0123456789abcdef"):
        store.get_object("0123456789abcdef0123456789abcdef", what="tensor 'x'")
    assert time.monotonic() - t0 < 0.5 and store.retrier.retried == 0


def test_concurrency_is_parallel_and_bounded(monkeypatch):
    """Uploads and downloads overlap, never more than CKPT_THREADS at a time."""
    monkeypatch.setenv("CKPT_THREADS", "6")
    monkeypatch.setenv("CKPT_CHUNK_BYTES", "4096")
    tag = uuid.uuid4().hex[:8]
    so = {"target_protocol": "memory", "delay": 0.02, "tag": tag}
    url = f"faulty://ckpt-conc-{tag}"
    state = {"x": torch.randn(60 * 1024)}  # 60 objects of 4 KiB
    ckpt.save(url, state, step=0, storage_options=so)
    fs = fsspec.filesystem("faulty", **so)
    assert 2 <= fs.max_in_flight <= 6, fs.max_in_flight
    fs.max_in_flight = 0
    out = ckpt.load(url, storage_options=so)
    assert torch.equal(out["x"], state["x"])
    assert 2 <= fs.max_in_flight <= 6, fs.max_in_flight

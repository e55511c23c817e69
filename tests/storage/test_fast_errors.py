"""Fast errors: an endpoint that cannot be reached fails in seconds; transient errors are still retried.

A refused port, a name that does not resolve (``.invalid`` never does) or no route is most
often a wrong URL: ``ckpt.save``, ``ckpt.load`` and ``ckpt ls`` report it with a StoreError
naming the URL after ``CKPT_CONNECT_SECONDS`` (5 s), not after minutes of nested retries.
Throttling and 5xx still get the full budget, retried by ckpt alone: :mod:`ckpt.storage.backends`
turns botocore's, s3fs's and the Azure SDK's own retries off, unless the user set them.

Throttling and server errors come from :class:`Front`, a real HTTP server in front of moto
that answers 503 SlowDown or 500 InternalError to the next N requests, or stops listening
(connections refused) for a while. The generic retry suite over injected faults is
tests/storage/test_faults.py.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import fsspec
import pytest
import torch
from click.testing import CliRunner

import ckpt
from ckpt.cli.app import build_cli
from ckpt.errors import StoreError
from ckpt.storage.backends import tune_client
from ckpt.storage.retry import GaveUp, Retrier, RetryPolicy, is_transient, unreachable_reason
from ckpt.storage.store import Store

BUDGET = 8.0  # seconds a refused or unresolvable endpoint may take to report, by default


def _state(seed: int = 0) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(64, 32, generator=g)}, "step": seed}


def _free_port() -> int:
    from servers import free_port

    return free_port()


# -- a real HTTP server in front of moto that throttles, fails or goes away --------------------

_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>{code}</Code><Message>injected by the test front</Message><RequestId>0</RequestId></Error>"
)
_CODES = {503: "SlowDown", 500: "InternalError"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
    server: _Server

    def setup(self) -> None:
        super().setup()
        with self.server.front.lock:
            self.server.front.connections.append(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        front = self.server.front
        body = self._body()
        with front.lock:
            front.requests += 1
            fail = front.fail_next > 0
            if fail:
                front.fail_next -= 1
                front.failed += 1
        if fail:
            data = b"" if self.command == "HEAD" else _ERROR_BODY.format(code=_CODES[front.status]).encode()
            self.send_response(front.status)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        hop = {"connection", "keep-alive", "transfer-encoding", "content-length"}
        headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
        headers["Content-Length"] = str(len(body))
        upstream = http.client.HTTPConnection(front.target_host, front.target_port, timeout=30)
        try:
            upstream.request(self.command, self.path, body=body, headers=headers)
            resp = upstream.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in hop:
                    self.send_header(k, v)
            # HEAD: the object's size, no body
            self.send_header(
                "Content-Length", resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
            )
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            upstream.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    front: Front


class Front:
    """An HTTP server on 127.0.0.1 that forwards to ``target`` (moto), answering
    ``fail_next`` requests with ``status`` (503 SlowDown, 500 InternalError) first; while
    stopped, connections to its port are refused."""

    def __init__(self, target: str, port: int | None = None) -> None:
        host, _, port_s = target.removeprefix("http://").partition(":")
        self.target_host, self.target_port = host, int(port_s)
        self.port = port or _free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.lock = threading.Lock()
        self.connections: list[socket.socket] = []
        self.status = 503
        self.fail_next = 0
        self.requests = 0
        self.failed = 0
        self._server: _Server | None = None

    def start(self) -> Front:
        self._server = _Server(("127.0.0.1", self.port), _Handler)
        self._server.front = self
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections: what a crashed server looks like."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        with self.lock:
            conns, self.connections = self.connections, []
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def start_after(self, seconds: float) -> threading.Thread:
        thread = threading.Thread(target=lambda: (time.sleep(seconds), self.start()), daemon=True)
        thread.start()
        return thread


@pytest.fixture
def front(s3_server):
    f = Front(s3_server.endpoint).start()
    yield f
    f.stop()


def _s3_options(endpoint: str, **extra: Any) -> dict[str, Any]:
    # endpoint_url at the top, where it overrides the session's fsspec defaults for s3
    # (tests/conftest.py); moto takes any key
    return {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
        **extra,
    }


# -- classification of real errors -------------------------------------------------------------


def _refused() -> OSError:
    try:
        socket.create_connection(("127.0.0.1", _free_port()), timeout=2).close()
    except OSError as exc:
        return exc
    raise AssertionError("nothing listens on a fresh port, so the connect must be refused")


def _unresolved() -> OSError:
    try:
        socket.getaddrinfo("ckpt-fast-errors.invalid", 443)
    except OSError as exc:
        return exc
    raise AssertionError(".invalid names never resolve (RFC 6761)")


def test_unreachable_errors_are_told_apart_from_other_transient_ones():
    refused, unresolved = _refused(), _unresolved()
    assert unreachable_reason(refused) == "connection refused" and is_transient(refused)
    assert unreachable_reason(unresolved) == "the name does not resolve" and is_transient(unresolved)
    wrapped = OSError("could not connect")  # a client library's wrapper keeps the cause
    wrapped.__cause__ = refused
    assert unreachable_reason(wrapped) == "connection refused"
    for other in (ConnectionResetError("reset"), TimeoutError("read timed out"), OSError(16, "503 SlowDown")):
        assert is_transient(other) and unreachable_reason(other) is None


def test_connect_budget_knob(monkeypatch):
    monkeypatch.setenv("CKPT_CONNECT_SECONDS", "2.5")
    assert RetryPolicy.from_env().connect_seconds == 2.5
    monkeypatch.setenv("CKPT_CONNECT_SECONDS", "soon")
    with pytest.raises(ckpt.CheckpointError, match="CKPT_CONNECT_SECONDS"):
        RetryPolicy.from_env()


def test_unreachable_gets_the_short_budget_and_a_known_store_the_full_one():
    port = _free_port()

    def connect() -> None:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()

    policy = RetryPolicy(retries=50, base_delay=0.02, max_delay=0.1, max_seconds=30, connect_seconds=0.4)
    t0 = time.monotonic()
    with pytest.raises(GaveUp) as err:
        Retrier(policy, where=f"s3://fast-{uuid.uuid4().hex}").call(connect, "connecting")
    assert 0.35 < time.monotonic() - t0 < 2
    assert err.value.reason == "connection refused" and err.value.attempts > 2

    # a store that has answered before: refusals are an outage (a restarting server), ridden out
    listener = socket.create_server(("127.0.0.1", port))
    retrier = Retrier(policy, where=f"s3://known-{uuid.uuid4().hex}")
    retrier.call(connect, "connecting")
    listener.close()
    holder: list[socket.socket] = []
    threading.Thread(target=lambda: (time.sleep(1.0), holder.append(socket.create_server(("127.0.0.1", port))))).start()
    t0 = time.monotonic()
    retrier.call(connect, "connecting")  # refused for 1 s, more than connect_seconds
    assert time.monotonic() - t0 >= 0.9 and retrier.retried > 2
    holder[0].close()


def test_an_endpoint_coming_up_within_the_short_budget_is_caught(s3_server):
    """Refused at first (the server is still starting), then up: the save succeeds."""
    late = Front(s3_server.endpoint)
    late.start_after(1.5)
    try:
        url = s3_server.new_url("late")
        state = _state(1)
        t0 = time.monotonic()
        ckpt.save(url, state, step=1, storage_options=_s3_options(late.endpoint))
        assert time.monotonic() - t0 >= 1.4
        out = ckpt.load(url, storage_options=_s3_options(late.endpoint))
        assert torch.equal(out["model"]["w"], state["model"]["w"])
    finally:
        late.stop()


# -- refused, unresolvable: save, load and ls report in seconds -----------------------------------


def _unreachable(kind: str) -> tuple[str, dict[str, Any], list[str]]:
    """(url, storage_options, CLI -o values) of a store that cannot be reached."""
    if kind == "s3-refused":
        endpoint = f"http://127.0.0.1:{_free_port()}"
    elif kind == "s3-unresolvable":
        endpoint = f"http://ckpt-{uuid.uuid4().hex[:8]}.invalid:9000"
    else:
        from servers import AZURITE_ACCOUNT, AZURITE_KEY

        pytest.importorskip("adlfs")
        blob = f"http://127.0.0.1:{_free_port()}/{AZURITE_ACCOUNT}"
        conn = (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};BlobEndpoint={blob};"
        )
        return f"az://nowhere/run-{uuid.uuid4().hex[:8]}", {"connection_string": conn}, [f"connection_string={conn}"]
    # anonymous, as in the report that asked for this
    url = f"s3://nowhere/run-{uuid.uuid4().hex[:8]}"
    cli = ["anon=true", f"endpoint_url={endpoint}", "client_kwargs.region_name=us-east-1"]
    return url, {"anon": True, "endpoint_url": endpoint, "client_kwargs": {"region_name": "us-east-1"}}, cli


def _run(op: str, url: str, options: dict[str, Any], cli_options: list[str]) -> str:
    """Run ``op`` against the unreachable store; the error message it reports."""
    if op == "ls":
        args = ["ls", url]
        for o in cli_options:
            args += ["-o", o]
        result = CliRunner().invoke(build_cli(), args)
        assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
        return result.stderr
    with pytest.raises(StoreError) as err:
        if op == "save":
            ckpt.save(url, _state(), step=1, storage_options=options)
        else:
            ckpt.load(url, storage_options=options)
    return str(err.value)


@pytest.mark.parametrize("op", ["save", "load", "ls"])
@pytest.mark.parametrize("kind", ["s3-refused", "s3-unresolvable", "az-refused"])
def test_unreachable_store_fails_in_seconds_naming_the_url(kind, op):
    url, options, cli_options = _unreachable(kind)
    t0 = time.monotonic()
    message = _run(op, url, options, cli_options)
    elapsed = time.monotonic() - t0
    assert url in message, message
    assert elapsed < BUDGET, f"{op} on {kind} took {elapsed:.1f}s"
    if kind == "s3-unresolvable":
        assert ".invalid" in message  # the endpoint that does not resolve is named too


def test_endpoint_that_never_answers_the_connect_fails_in_seconds():
    """No answer at all (a firewall that drops packets): the connect times out once, then a StoreError."""
    port = _free_port()
    listener = socket.socket()
    listener.bind(("127.0.0.1", port))
    listener.listen(0)
    queued = []  # a full accept queue: the kernel drops further connection attempts
    for _ in range(3):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        queued.append(s)
    url = f"s3://nowhere/run-{uuid.uuid4().hex[:8]}"
    options = {"anon": True, "endpoint_url": f"http://127.0.0.1:{port}", "client_kwargs": {"region_name": "us-east-1"}}
    t0 = time.monotonic()
    try:
        with pytest.raises(StoreError, match=url):
            ckpt.load(url, storage_options=options)
    finally:
        for s in [*queued, listener]:
            s.close()
    assert time.monotonic() - t0 < BUDGET


# -- transient errors are still retried, by ckpt alone ---------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("status", [503, 500])
def test_throttling_and_server_errors_are_retried_until_they_pass(front, s3_server, status, monkeypatch):
    monkeypatch.setenv("CKPT_RETRY_BASE_DELAY", "0.02")
    url = s3_server.new_url("throttled")
    options = _s3_options(front.endpoint)
    state = _state(2)
    front.status, front.fail_next = status, 5
    ckpt.save(url, state, step=1, storage_options=options)
    assert front.failed == 5
    front.fail_next = 5
    out = ckpt.load(url, storage_options=options)
    assert torch.equal(out["model"]["w"], state["model"]["w"]) and front.failed == 10

    # one ckpt attempt is one request: ckpt saw (and retried) every failure the server gave
    store = Store(url, options)
    front.fail_next, failed = 3, front.failed
    assert store.read(store.manifest_path(1))
    assert front.failed - failed == 3 and store.retrier.retried == 3


@pytest.mark.server
def test_an_outage_of_a_store_that_worked_is_ridden_out(front, s3_server, monkeypatch):
    """Connections refused for longer than CKPT_CONNECT_SECONDS on a store that answered before."""
    monkeypatch.setenv("CKPT_CONNECT_SECONDS", "0.5")
    monkeypatch.setenv("CKPT_RETRY_BASE_DELAY", "0.05")
    url = s3_server.new_url("restart")
    options = _s3_options(front.endpoint)
    ckpt.save(url, _state(3), step=1, storage_options=options)
    front.stop()
    front.start_after(1.5)
    t0 = time.monotonic()
    state = _state(4)
    ckpt.save(url, state, step=2, storage_options=options)  # a new Store, the same URL
    assert time.monotonic() - t0 >= 1.4
    assert torch.equal(ckpt.load(url, storage_options=options)["model"]["w"], state["model"]["w"])


@pytest.mark.server
def test_retry_settings_the_user_passed_are_kept(front, s3_server):
    url = s3_server.new_url("user-retries")
    user = {"retries": {"max_attempts": 4, "mode": "standard"}, "connect_timeout": 2}
    options = _s3_options(front.endpoint, config_kwargs=user)
    store = Store(url, options)
    assert store.fs.config_kwargs == {"retries": {"max_attempts": 4, "mode": "standard"}, "connect_timeout": 2}
    assert user == {"retries": {"max_attempts": 4, "mode": "standard"}, "connect_timeout": 2}  # not mutated
    store.write(store.path("probe"), b"x")
    front.status, front.fail_next = 503, 2
    assert store.read(store.path("probe")) == b"x"
    # botocore retried on its own, as the user asked: ckpt saw no failure
    assert front.failed == 2 and store.retrier.retried == 0
    # without such settings, ckpt's store tunes the client: one request per attempt
    tuned = Store(url, _s3_options(front.endpoint))
    assert tuned.fs.config_kwargs["retries"]["total_max_attempts"] == 1 and tuned.fs.retries == 1
    # and through a wrapper (dir::, simplecache::) to the filesystem it wraps
    from fsspec.implementations.dirfs import DirFileSystem

    inner = fsspec.filesystem("s3", skip_instance_cache=True, **_s3_options(front.endpoint))
    assert "s3fs retries=1" in tune_client(DirFileSystem(path=s3_server.bucket, fs=inner)) and inner.retries == 1


# -- azure: the SDK's retry policy ----------------------------------------------------------------


@pytest.mark.server
def test_azure_client_is_tuned_and_an_sdk_without_the_policy_still_works(az_server, monkeypatch):
    url = az_server.new_url("tuned")
    store = Store(url, az_server.storage_options)
    configuration = store.fs.service_client._config
    assert configuration.retry_policy.total_retries == 0
    assert configuration.transport.connection_config.timeout == 5

    # a future SDK that does not expose its retry policy where we look: the client keeps its
    # own retries (slower errors), nothing fails. A distinct filesystem instance, not the shared one.
    options = {**az_server.storage_options, "connection_timeout": 7, "default_fill_cache": True}
    fs = fsspec.filesystem("az", **options)
    monkeypatch.setattr(fs.service_client._config, "retry_policy", None)
    assert tune_client(fs) == ()  # and the user's connection_timeout is kept
    assert fs.service_client._config.transport.connection_config.timeout != 5
    state = _state(5)
    ckpt.save(url, state, step=1, storage_options=options)
    assert torch.equal(ckpt.load(url, storage_options=options)["model"]["w"], state["model"]["w"])

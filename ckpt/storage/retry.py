"""Retries of storage calls: which errors are transient, and backoff with jitter.

Object stores fail every day at scale: connections reset, requests time out, the
service throttles (HTTP 429, S3 ``SlowDown``) or answers 5xx. Such a call is retried
with exponential backoff and jitter within ``CKPT_RETRY_MAX_SECONDS``; anything else (a
missing object, a permission error, our own verification errors) fails at once, because
callers rely on it (``FileNotFoundError`` means "not there", not "try again").

An endpoint that cannot be reached at all (connection refused, a name that does not
resolve, no route, no answer to the connect) is most often a wrong URL or endpoint, and
the user should hear so in seconds, not after a minute of retries: such errors get the
short budget ``CKPT_CONNECT_SECONDS`` (5 s), which still rides out a server that is
coming up. Once a store has completed a call in this process the same errors mean an
outage (a restarting server, a DNS hiccup) and get the full budget.

These are the only retries: :mod:`ckpt.storage.backends` turns the backends' own retry
loops off, because nested loops multiply (a refused endpoint took 64 s to report) and
ignore the budgets above.

Every request ckpt makes is idempotent: objects are content-addressed and manifests
and refs are whole-object PUTs, so repeating one whose answer was lost is harmless.
"""

from __future__ import annotations

import errno
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from ckpt import config
from ckpt.errors import CheckpointError

log = logging.getLogger("ckpt")

T = TypeVar("T")

#: OSError subclasses that say something definite about the path: never transient.
_PERMANENT = (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)

_TRANSIENT_ERRNOS = {
    errno.EIO,
    getattr(errno, "EREMOTEIO", errno.EIO),
    errno.EBUSY,  # s3fs: SlowDown, ServiceUnavailable
    errno.EAGAIN,
    errno.ECONNRESET,
    errno.ECONNABORTED,
    errno.ECONNREFUSED,
    errno.ETIMEDOUT,
    errno.EPIPE,
    errno.ENETDOWN,
    errno.ENETUNREACH,
    errno.EHOSTUNREACH,
}

#: Error codes of S3 (and S3-compatible) services that mean "try again later".
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ThrottledException",
    "TooManyRequests",
    "TooManyRequestsException",
    "RequestLimitExceeded",
    "RequestThrottled",
    "BandwidthLimitExceeded",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "InternalServerError",
    "ServiceUnavailable",
    "ServerBusy",
    "OperationTimedOut",
    "PriorRequestNotComplete",
}

#: Transport-level exception classes of the client libraries, matched by name so that
#: none of them has to be imported (aiohttp, botocore, urllib3, requests, azure-core).
_TRANSIENT_NAMES = {
    "ClientConnectionError",
    "ClientOSError",
    "ClientPayloadError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "HTTPClientError",
    "ResponseStreamingError",
    "IncompleteRead",
    "IncompleteReadError",
    "FSTimeoutError",
    "ProtocolError",
    "ChunkedEncodingError",
    "ServiceRequestError",
    "ServiceResponseError",
}


#: errnos of a connection that could not be made at all, and what each means.
_UNREACHABLE_ERRNOS = {
    errno.ECONNREFUSED: "connection refused",
    errno.EHOSTUNREACH: "no route to the host",
    errno.ENETUNREACH: "no route to the host",
    errno.ENETDOWN: "no route to the host",
}

#: The client libraries' names for "the name does not resolve" and "the connect timed out"
#: (aiohttp, botocore/urllib3, requests), matched by name as above.
_UNREACHABLE_NAMES = {
    "ClientConnectorDNSError": "the name does not resolve",
    "NameResolutionError": "the name does not resolve",
    "ConnectTimeoutError": "the connect timed out",
    "ConnectionTimeoutError": "the connect timed out",
    "ConnectTimeout": "the connect timed out",
}


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen and len(seen) < 8:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _http_verdict(exc: BaseException) -> bool | None:
    """True/False when ``exc`` carries an HTTP status or service error code, else None."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        code = str((response.get("Error") or {}).get("Code", ""))
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if code in _TRANSIENT_CODES:
            return True
        if isinstance(status, int):
            return status in (408, 429) or status >= 500
        return False if code else None
    for attr in ("status_code", "status"):  # azure-core HttpResponseError, aiohttp ClientResponseError
        status = getattr(exc, attr, None)
        if isinstance(status, int) and 100 <= status < 600:
            return status in (408, 429) or status >= 500
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the call that raised ``exc`` can succeed."""
    chain = list(_chain(exc))
    if any(isinstance(e, (CheckpointError, *_PERMANENT)) for e in chain):
        return False
    for e in chain:  # the service's own word wins over the generic OSError wrapping it
        verdict = _http_verdict(e)
        if verdict is not None:
            return verdict
    if unreachable_reason(exc) is not None:  # with a short budget: see Retrier.call
        return True
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


def unreachable_reason(exc: BaseException) -> str | None:
    """Why no connection to the endpoint could be made ("connection refused", "the name
    does not resolve", "no route to the host", "the connect timed out"), or None when
    ``exc`` says something else. Such an error is transient too, with a shorter budget."""
    for e in _chain(exc):
        if isinstance(e, socket.gaierror):
            return "the name does not resolve"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, OSError) and e.errno in _UNREACHABLE_ERRNOS:
            return _UNREACHABLE_ERRNOS[e.errno]
        for cls in type(e).__mro__:
            if cls.__name__ in _UNREACHABLE_NAMES:
                return _UNREACHABLE_NAMES[cls.__name__]
    return None


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a storage call is retried (see :mod:`ckpt.config`).

    ``max_seconds`` bounds a call that fails transiently; ``connect_seconds`` (at most
    ``max_seconds``) one whose every attempt found the endpoint unreachable, on a store
    that has not answered yet.
    """

    retries: int = 8
    base_delay: float = 0.2
    max_delay: float = 10.0
    max_seconds: float = 60.0
    connect_seconds: float = 5.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        return cls(
            retries=config.retries(),
            base_delay=config.retry_base_delay(),
            max_seconds=config.retry_max_seconds(),
            connect_seconds=config.connect_seconds(),
        )

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Backoff before retry ``attempt`` (0-based): "equal jitter", in [cap/2, cap]."""
        cap = min(self.max_delay, self.base_delay * (2**attempt))
        return cap / 2 + (rng or random).uniform(0, cap / 2)


class GaveUp(Exception):
    """Internal: a call failed for good; carries the last error and how hard we tried.

    ``reason``: why the endpoint could not be reached when every attempt failed so (see
    :func:`unreachable_reason`), else "".
    """

    def __init__(self, error: BaseException, attempts: int, seconds: float, *, reason: str = "") -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts
        self.seconds = seconds
        self.reason = reason


#: Stores (by URL) that completed a call in this process: for them an unreachable
#: endpoint is an outage and gets the full budget (``Store`` objects come and go, one per
#: ``ckpt.save``; the endpoint behind a URL does not).
_answered: set[str] = set()
_answered_lock = threading.Lock()

#: ``Retrier._gave_up_at`` key of an outage of every kind of call (the endpoint is unreachable).
_ALL = "*"


class Retrier:
    """Runs storage calls under a :class:`RetryPolicy`, shared by all threads of a store.

    When one call gives up, the others do not each spend a full budget on the same
    outage: until a call of the same ``kind`` (say, writes) succeeds again, or a budget's
    time has passed, failing calls of that kind fail after one attempt. A save during
    an outage thus ends in about ``max_seconds``, not once per object. Kinds are kept
    apart because reads may well work while writes are refused (a full or read-only
    bucket, throttled PUTs); an unreachable endpoint fails every kind alike.
    """

    def __init__(self, policy: RetryPolicy | None = None, *, where: str = "") -> None:
        self.policy = policy or RetryPolicy.from_env()
        self.where = where
        self._lock = threading.Lock()
        self._gave_up_at: dict[str, float] = {}
        self._answered = False
        self.retried = 0  # retries done so far (all calls), for tests and logs

    def _in_outage(self, kind: str) -> bool:
        now = time.monotonic()
        with self._lock:
            return any(
                g is not None and now - g < self.policy.max_seconds
                for g in (self._gave_up_at.get(kind), self._gave_up_at.get(_ALL))
            )

    def _known(self) -> bool:
        """Whether the store has answered a call before (in this retrier or this process)."""
        if self._answered:
            return True
        with _answered_lock:
            return bool(self.where) and self.where in _answered

    def _succeeded(self, kind: str) -> None:
        if not self._answered:
            self._answered = True
            if self.where:
                with _answered_lock:
                    _answered.add(self.where)
        if self._gave_up_at:
            with self._lock:
                self._gave_up_at.pop(kind, None)
                self._gave_up_at.pop(_ALL, None)

    def call(self, fn: Callable[[], T], what: str, kind: str = "") -> T:
        """``fn()``, retried on transient errors; raises :class:`GaveUp` or the permanent error."""
        policy = self.policy
        start = time.monotonic()
        deadline = start + policy.max_seconds
        connect_deadline = start + min(policy.connect_seconds, policy.max_seconds)
        # Until the endpoint has answered (ever, or in this call) "unreachable" is most
        # likely a wrong address: the short budget applies.
        reached = self._known()
        attempt = 0
        while True:
            try:
                result = fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                reason = unreachable_reason(exc)
                reached = reached or reason is None
                now = time.monotonic()
                end = deadline if reached else connect_deadline
                if attempt >= policy.retries or now >= end or self._in_outage(kind):
                    with self._lock:
                        self._gave_up_at[_ALL if not reached else kind] = now
                    raise GaveUp(exc, attempt + 1, now - start, reason="" if reached else reason or "") from exc
                # the last wait is cut short so that the last attempt falls at the end of the
                # budget: an endpoint that comes back within it is still caught
                delay = min(policy.delay(attempt), end - now)
                attempt += 1
                with self._lock:
                    self.retried += 1
                log.warning(
                    "%s on %s failed (%s: %s); retry %d/%d in %.2fs%s",
                    what,
                    self.where,
                    type(exc).__name__,
                    exc,
                    attempt,
                    policy.retries,
                    delay,
                    "" if reached else f" ({reason}: giving up {end - now:.1f}s from now)",
                )
                time.sleep(delay)
                continue
            self._succeeded(kind)
            return result

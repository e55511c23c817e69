"""Retries of storage calls: which errors are transient, and backoff with jitter.

Object stores fail every day at scale: connections reset, requests time out, the
service throttles (HTTP 429, S3 ``SlowDown``) or answers 5xx. Such a call is retried
with exponential backoff and jitter; anything else (a missing object, a permission
error, our own verification errors) fails at once, because callers rely on it
(``FileNotFoundError`` means "not there", not "try again").

Every request ckpt makes is idempotent: objects are content-addressed and manifests
and refs are whole-object PUTs, so repeating one whose answer was lost is harmless.
"""

from __future__ import annotations

import errno
import logging
import random
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
    for e in chain:
        if isinstance(e, (ConnectionError, TimeoutError)):
            return True
        if any(cls.__name__ in _TRANSIENT_NAMES for cls in type(e).__mro__):
            return True
        if isinstance(e, OSError) and e.errno in _TRANSIENT_ERRNOS:
            return True
    return False


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a storage call is retried (see :mod:`ckpt.config`)."""

    retries: int = 8
    base_delay: float = 0.2
    max_delay: float = 10.0
    max_seconds: float = 60.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        return cls(
            retries=config.retries(),
            base_delay=config.retry_base_delay(),
            max_seconds=config.retry_max_seconds(),
        )

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Backoff before retry ``attempt`` (0-based): "equal jitter", in [cap/2, cap]."""
        cap = min(self.max_delay, self.base_delay * (2**attempt))
        return cap / 2 + (rng or random).uniform(0, cap / 2)


class GaveUp(Exception):
    """Internal: a call failed for good; carries the last error and how hard we tried."""

    def __init__(self, error: BaseException, attempts: int, seconds: float) -> None:
        super().__init__(str(error))
        self.error = error
        self.attempts = attempts
        self.seconds = seconds


class Retrier:
    """Runs storage calls under a :class:`RetryPolicy`, shared by all threads of a store.

    When one call gives up, the others do not each spend a full budget on the same
    outage: until a call of the same ``kind`` (say, writes) succeeds again, or a budget's
    time has passed, failing calls of that kind fail after one attempt. A save during
    an outage thus ends in about ``max_seconds``, not once per object. Kinds are kept
    apart because reads may well work while writes are refused (a full or read-only
    bucket, throttled PUTs).
    """

    def __init__(self, policy: RetryPolicy | None = None, *, where: str = "") -> None:
        self.policy = policy or RetryPolicy.from_env()
        self.where = where
        self._lock = threading.Lock()
        self._gave_up_at: dict[str, float] = {}
        self.retried = 0  # retries done so far (all calls), for tests and logs

    def _in_outage(self, kind: str) -> bool:
        with self._lock:
            g = self._gave_up_at.get(kind)
            return g is not None and time.monotonic() - g < self.policy.max_seconds

    def call(self, fn: Callable[[], T], what: str, kind: str = "") -> T:
        """``fn()``, retried on transient errors; raises :class:`GaveUp` or the permanent error."""
        start = time.monotonic()
        deadline = start + self.policy.max_seconds
        attempt = 0
        while True:
            try:
                result = fn()
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = self.policy.delay(attempt)
                if attempt >= self.policy.retries or time.monotonic() + delay > deadline or self._in_outage(kind):
                    with self._lock:
                        self._gave_up_at[kind] = time.monotonic()
                    raise GaveUp(exc, attempt + 1, time.monotonic() - start) from exc
                attempt += 1
                with self._lock:
                    self.retried += 1
                log.warning(
                    "%s on %s failed (%s: %s); retry %d/%d in %.2fs",
                    what,
                    self.where,
                    type(exc).__name__,
                    exc,
                    attempt,
                    self.policy.retries,
                    delay,
                )
                time.sleep(delay)
                continue
            if kind in self._gave_up_at:
                with self._lock:
                    self._gave_up_at.pop(kind, None)
            return result

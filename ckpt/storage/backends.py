"""Backend clients tuned so that ckpt's own retries are the only ones.

s3fs and adlfs retry inside each request with their own backoff: botocore (legacy mode)
makes 5 attempts, s3fs retries throttling and read timeouts 5 times more, and the Azure
SDK retries 3 times after waits of about 15, 18 and 24 s. Under ckpt's
:class:`~ckpt.storage.retry.Retrier` these loops multiply and ignore its budgets: a refused
S3 endpoint took 64 s to report, and one attempt at a refused Azure endpoint 84 s. The
Retrier knows what the backends do not: the budget of a whole call
(``CKPT_RETRY_MAX_SECONDS``), the short one of an endpoint that cannot be reached
(``CKPT_CONNECT_SECONDS``), and an outage shared by all of a store's threads. So once a
store has opened its filesystem, :func:`tune_client` makes one ckpt attempt one request
of the backend, whose connect times out after ``CKPT_CONNECT_SECONDS`` (at least 1 s).

What the user set wins, always: s3fs ``config_kwargs`` with ``retries`` or
``connect_timeout`` are left as they are (``{"retries": {"max_attempts": 5}}`` brings
botocore's retries back), and so are adlfs ``connection_timeout`` and any ``retry_*``
option. fsspec caches filesystem instances by their options, so the tuning holds for
every user of the same instance, and is applied again, idempotently, by each store.

Azure: adlfs builds its ``BlobServiceClient`` itself and passes on no retry options, and
its per-call keyword arguments reach only uploads and downloads. The retry policy the
SDK built sits in the client's configuration (``client._config.retry_policy``, private),
shared by every container and blob client made from it; its counters
(``total_retries``) and the transport's ``connection_config.timeout`` are documented
public attributes that the policy and the transport read at every request. Only the way
to them is private, so it is looked up defensively: an SDK without it keeps its own
retries (errors are then just slower to report) and nothing fails.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from ckpt import config

log = logging.getLogger("ckpt")


def tune_client(fs: Any) -> tuple[str, ...]:
    """Turn the internal retries of ``fs``'s client off (see the module docstring).

    Returns what was changed (for logs and tests); filesystems other than s3fs and adlfs,
    and wrappers around them (``fs.fs``), are left alone or tuned through.
    """
    done: list[str] = []
    for _ in range(4):  # a wrapper (dir::, simplecache::) holds the real filesystem as .fs
        s3fs = sys.modules.get("s3fs")  # an s3fs filesystem means s3fs is imported already
        adlfs = sys.modules.get("adlfs")
        if s3fs is not None and isinstance(fs, s3fs.S3FileSystem):
            done += _tune_s3(fs)
        elif adlfs is not None and isinstance(fs, adlfs.AzureBlobFileSystem):
            done += _tune_azure(fs)
        inner = getattr(fs, "fs", None)
        if inner is None or inner is fs or not hasattr(inner, "protocol"):
            break
        fs = inner
    if done:
        log.debug("tuned %s: %s", type(fs).__name__, ", ".join(done))
    return tuple(done)


def _connect_timeout() -> float:
    return max(1.0, config.connect_seconds())


def _tune_s3(fs: Any) -> list[str]:
    done = []
    # a new dict: the one s3fs holds may be the caller's own storage_options value
    options = dict(fs.config_kwargs or {})
    if "retries" not in options:
        # total_max_attempts counts the first attempt (max_attempts would not: 1 is one retry)
        options["retries"] = {"total_max_attempts": 1}
        done.append("botocore total_max_attempts=1")
    if "connect_timeout" not in options:
        options["connect_timeout"] = _connect_timeout()
        done.append(f"botocore connect_timeout={options['connect_timeout']:g}")
    if done:
        # read when s3fs creates its client, which it does on first use (or on reconnect)
        fs.config_kwargs = options
    # s3fs's own loop (5 attempts on throttling, payload errors and read timeouts: up to
    # 5 x read_timeout per request); not a constructor option, so only an instance
    # attribute can mean someone chose it
    if "retries" not in vars(fs):
        fs.retries = 1
        done.append("s3fs retries=1")
    return done


def _tune_azure(fs: Any) -> list[str]:
    done = []
    user = getattr(fs, "storage_options", None) or {}
    configuration: Any = getattr(getattr(fs, "service_client", None), "_config", None)
    policy: Any = getattr(configuration, "retry_policy", None)
    if not any(str(k).startswith("retry_") for k in user):
        if isinstance(getattr(policy, "total_retries", None), int):
            policy.total_retries = 0
            done.append("azure retry_total=0")
        else:
            log.debug("the Azure SDK's retry policy of %r was not found; it keeps retrying on its own", fs)
    connection: Any = getattr(getattr(configuration, "transport", None), "connection_config", None)
    if "connection_timeout" not in user and isinstance(getattr(connection, "timeout", None), (int, float)):
        connection.timeout = _connect_timeout()
        done.append(f"azure connection_timeout={connection.timeout:g}")
    return done

"""Local storage servers for tests and benchmarks: moto (S3) and azurite (Azure Blob).

Both listen on 127.0.0.1 only. Each server object knows the ``storage_options`` a
client needs, the ``FSSPEC_*`` environment that gives a subprocess the same options,
and makes fresh store URLs (one bucket/container per server, a new prefix per URL).

``ServerUnavailable`` means the tool is genuinely absent (no ``node`` binary); any other
failure to start raises ``RuntimeError`` so that a broken set-up fails loudly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

#: The well-known development account of azurite (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


class ServerUnavailable(Exception):
    """The program a server needs is not installed on this machine."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout:.0f}s")


class MotoS3:
    """moto's S3 in a thread of this process (``ThreadedMotoServer``)."""

    kind = "s3"

    def __init__(self, bucket: str = "ckpt-test") -> None:
        self.bucket = bucket
        self._server: Any = None
        self.endpoint = ""

    def start(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        # moto checks nothing, but botocore wants some credentials and a region.
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one access-log line per request otherwise
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        import boto3

        boto3.client("s3", **self._boto_kwargs()).create_bucket(Bucket=self.bucket)
        return self

    def _boto_kwargs(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint,
            "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing",
            "region_name": "us-east-1",
        }

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", **self._boto_kwargs())

    def kms_client(self) -> Any:
        """A boto3 KMS client of the same server: moto serves every AWS API on one port."""
        import boto3

        return boto3.client("kms", **self._boto_kwargs())

    def new_kms_key(self) -> str:
        """A new symmetric KMS key on this server; its ARN."""
        return self.kms_client().create_key(Description="ckpt test")["KeyMetadata"]["Arn"]

    @property
    def kms_options(self) -> dict[str, Any]:
        """Keyword arguments of ``KMSKeyProvider`` that reach this server."""
        return {k: v for k, v in self._boto_kwargs().items() if k != "region_name"} | {"region": "us-east-1"}

    @property
    def storage_options(self) -> dict[str, Any]:
        return {
            "endpoint_url": self.endpoint,
            "key": "testing",
            "secret": "testing",
            "client_kwargs": {"region_name": "us-east-1"},
        }

    @property
    def cli_options(self) -> list[str]:
        """``--storage-option`` values for the CLI (flat key=value pairs)."""
        return [f"endpoint_url={self.endpoint}", "key=testing", "secret=testing"]

    @property
    def env(self) -> dict[str, str]:
        """Environment that makes plain ``s3://`` URLs reach this server (fsspec config)."""
        return {"FSSPEC_S3": json.dumps(self.storage_options), "AWS_DEFAULT_REGION": "us-east-1"}

    def new_url(self, label: str = "t") -> str:
        return f"s3://{self.bucket}/{label}-{uuid.uuid4().hex[:12]}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None


class MotoS3Process(MotoS3):
    """moto's S3 as a separate process (benchmarks: the server does not share our GIL)."""

    def __init__(self, bucket: str = "ckpt-test") -> None:
        super().__init__(bucket)
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> MotoS3Process:
        import sys

        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        port = free_port()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        _wait_port(port, timeout, self._proc)
        self.endpoint = f"http://127.0.0.1:{port}"
        self.client().create_bucket(Bucket=self.bucket)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
            self._proc = None


def azurite_command() -> list[str]:
    """The azurite-blob command line start, or ServerUnavailable when Node.js is absent."""
    if shutil.which("node") is None:
        raise ServerUnavailable("Node.js (`node`) is not installed; azurite needs it")
    local = ROOT / "node_modules" / ".bin" / "azurite-blob"
    if local.exists():
        return [str(local)]
    on_path = shutil.which("azurite-blob")
    if on_path:
        return [on_path]
    raise RuntimeError(
        "azurite is not installed: run `make node_modules` (npm install --no-save azurite) in the repository root"
    )


class Azurite:
    """azurite's Blob service as a subprocess, in memory, on a free port."""

    kind = "az"

    def __init__(self, container: str = "ckpt-test") -> None:
        self.container = container
        self.port = 0
        self._proc: subprocess.Popen | None = None
        self._workdir: str | None = None

    def start(self, timeout: float = 60.0) -> Azurite:
        cmd = azurite_command()
        # in memory: nothing to clean up, and faster; cwd still gets azurite's debug files
        self._workdir = tempfile.mkdtemp(prefix="ckpt-azurite-")
        last: Exception | None = None
        for _ in range(3):  # a free port can be taken between probing and binding
            self.port = free_port()
            self._proc = subprocess.Popen(
                [
                    *cmd,
                    "--blobHost",
                    "127.0.0.1",
                    "--blobPort",
                    str(self.port),
                    "--inMemoryPersistence",
                    "--disableTelemetry",
                    "--silent",
                    "--skipApiVersionCheck",
                ],
                cwd=self._workdir,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            try:
                _wait_port(self.port, timeout, self._proc)
                break
            except RuntimeError as exc:
                err = b""
                if self._proc.poll() is not None and self._proc.stderr is not None:
                    err = self._proc.stderr.read()
                last = RuntimeError(f"azurite did not start: {exc}; stderr: {err.decode(errors='replace')[-2000:]}")
                self._kill()
        else:
            raise last or RuntimeError("azurite did not start")
        from azure.storage.blob import BlobServiceClient

        BlobServiceClient.from_connection_string(self.connection_string).create_container(self.container)
        return self

    @property
    def connection_string(self) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={AZURITE_KEY};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT};"
        )

    def client(self) -> Any:
        from azure.storage.blob import BlobServiceClient

        return BlobServiceClient.from_connection_string(self.connection_string)

    @property
    def storage_options(self) -> dict[str, Any]:
        return {"connection_string": self.connection_string}

    @property
    def cli_options(self) -> list[str]:
        return [f"connection_string={self.connection_string}"]

    @property
    def env(self) -> dict[str, str]:
        return {"FSSPEC_AZ": json.dumps(self.storage_options)}

    def new_url(self, label: str = "t") -> str:
        return f"az://{self.container}/{label}-{uuid.uuid4().hex[:12]}"

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()
        self._proc = None

    def stop(self) -> None:
        self._kill()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def register_fsspec_defaults(server: MotoS3 | Azurite) -> None:
    """Make plain URLs of ``server.kind`` reach ``server`` in this process (fsspec config)."""
    import fsspec.config

    protocol = "s3" if server.kind == "s3" else "az"
    fsspec.config.conf[protocol] = dict(server.storage_options)


def unregister_fsspec_defaults(kind: str) -> None:
    import fsspec.config

    fsspec.config.conf.pop("s3" if kind == "s3" else "az", None)

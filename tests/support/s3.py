"""A real S3 HTTP endpoint for tests: moto's standalone server on a local port."""

from __future__ import annotations

import socket
from typing import Any

import boto3
from moto.server import ThreadedMotoServer

# The server accepts any credentials; these are used only by this helper's own client.
_DUMMY = {"aws_access_key_id": "test", "aws_secret_access_key": "test", "region_name": "us-east-1"}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    """moto's S3 server on 127.0.0.1, reached over HTTP like any S3-compatible store."""

    def __init__(self, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port if port is not None else free_port()
        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._running = False

    @property
    def endpoint_url(self) -> str:
        """The server's base URL, for boto3's ``endpoint_url``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> S3Server:
        """Start serving; returns self so a fixture can write ``S3Server().start()``."""
        self._server.start()
        self._running = True
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._running:
            self._server.stop()
            self._running = False

    def client(self) -> Any:
        """A boto3 S3 client for this server with dummy credentials, independent of the environment."""
        return boto3.client("s3", endpoint_url=self.endpoint_url, **_DUMMY)

    def create_bucket(self, name: str) -> None:
        """Create a bucket (us-east-1 needs no location constraint)."""
        self.client().create_bucket(Bucket=name)

    def reset(self) -> None:
        """Forget every bucket and object, through moto's reset API."""
        import urllib.request

        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Where `farm export` writes: a local folder or an S3 prefix, staged locally and published file by file."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from farm.errors import StorageError
from farm.storage import LocalStorage, S3Storage, open_storage

__all__ = ["Destination", "open_destination"]


class Destination(Protocol):
    """Where export files go; files are staged locally and published one by one, manifest last."""

    def fetch(self, name: str, path: Path) -> bool:
        """Copy the destination's file ``name`` to ``path``; False when there is none."""
        ...

    def publish(self, path: Path, name: str) -> None:
        """Put the local file ``path`` at the destination as ``name``, replacing any file there."""
        ...

    def staging(self) -> tempfile.TemporaryDirectory[str]:
        """A temporary folder to write files in before they are published."""
        ...


class _LocalDestination:
    def __init__(self, root: Path) -> None:
        self.root = root
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the export folder {root}: {exc.strerror or exc}") from exc

    def fetch(self, name: str, path: Path) -> bool:
        source = self.root / name
        if not source.is_file():
            return False
        shutil.copyfile(source, path)
        return True

    def publish(self, path: Path, name: str) -> None:
        # Staged in the same folder, so this is an atomic rename: readers never see half a file.
        os.replace(path, self.root / name)

    def staging(self) -> tempfile.TemporaryDirectory[str]:
        # A dot name: pyarrow, datasets and webdataset globs skip it if a crash leaves it behind.
        return tempfile.TemporaryDirectory(dir=self.root, prefix=".farm-export-")


class _S3Destination:
    def __init__(self, storage: S3Storage) -> None:
        self.storage = storage

    def _key(self, name: str) -> str:
        return f"{self.storage.prefix}/{name}" if self.storage.prefix else name

    def fetch(self, name: str, path: Path) -> bool:
        if self.storage.head(self._key(name)) is None:
            return False
        path.write_bytes(self.storage.get(self._key(name)))
        return True

    def publish(self, path: Path, name: str) -> None:
        """Upload (multipart for big shards, streamed from disk), then confirm size and SHA-256."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(name)
        digest = _file_sha256(path)
        size = path.stat().st_size
        extra = {"ContentType": _content_type(name), "Metadata": {"sha256": digest}}
        try:
            # S3Storage.put takes bytes; a shard can be gigabytes, so upload_file streams it instead.
            self.storage._client.upload_file(str(path), self.storage.bucket, key, ExtraArgs=extra)
        except (ClientError, BotoCoreError) as exc:
            self.storage._fail(exc, "upload to", key)
        stored = self.storage.head(key)
        if stored is None or stored.bytes != size or stored.sha256 != digest:
            raise StorageError(f"s3://{self.storage.bucket}/{key} did not confirm after upload")

    def staging(self) -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix="farm-export-")


def _content_type(name: str) -> str:
    suffix = Path(name).suffix
    return {
        ".png": "image/png",
        ".json": "application/json",
        ".jsonl": "application/x-ndjson",
        ".tar": "application/x-tar",
        ".parquet": "application/vnd.apache.parquet",
    }.get(suffix, "application/octet-stream")


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def open_destination(to: str, *, s3_endpoint_url: str | None, s3_region: str | None) -> Destination:
    """A local folder (a path or ``file://`` URL) or an S3 prefix (``s3://bucket/prefix``)."""
    scheme = urlsplit(to).scheme
    if scheme == "s3":
        storage = open_storage(to, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
        assert isinstance(storage, S3Storage)
        return _S3Destination(storage)
    if scheme == "file":
        local = open_storage(to)
        assert isinstance(local, LocalStorage)
        return _LocalDestination(local.root)
    if scheme and len(scheme) > 1:  # one letter is a Windows drive
        raise ValueError(f"export destination {to!r} must be a local folder or s3://bucket/prefix")
    return _LocalDestination(Path(to).expanduser().absolute())

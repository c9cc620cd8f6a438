"""Where `farm export` writes: a local folder or an S3 prefix, staged locally and published file by file."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from farm.errors import StorageError
from farm.storage import Storage, local_folder, open_storage

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


class _StorageDestination:
    """An export prefix in a bucket: files go through the storage interface, streamed and confirmed."""

    def __init__(self, storage: Storage) -> None:
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
        self.storage.put_file(self._key(name), path, content_type=_content_type(name))

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


def open_destination(to: str, *, s3_endpoint_url: str | None, s3_region: str | None) -> Destination:
    """A local folder (a path or ``file://`` URL) or an S3 prefix (``s3://bucket/prefix``)."""
    scheme = urlsplit(to).scheme
    if scheme == "s3":
        return _StorageDestination(open_storage(to, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region))
    if scheme == "file":
        open_storage(to)  # checks the URL as a storage URL is checked
        return _LocalDestination(local_folder(to))
    if scheme and len(scheme) > 1:  # one letter is a Windows drive
        raise ValueError(f"export destination {to!r} must be a local folder or s3://bucket/prefix")
    return _LocalDestination(Path(to).expanduser().absolute())

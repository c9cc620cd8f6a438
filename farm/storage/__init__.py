"""Where rendered images go: one interface, with a module per backend (local.py: a folder, s3.py: a bucket).

Callers hold a Storage and use only what it declares: put bytes or a file (confirmed before returning),
presign, read a recorded object back verified against its sha256, and map a recorded URI to its key. No
caller asks which backend it has; open_storage and storage_for are the only places that choose one.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlsplit

from farm.errors import ConfigError, StorageError
from farm.secrets import redact

if TYPE_CHECKING:
    from farm.settings import Settings

__all__ = [
    "Storage",
    "StoredObject",
    "object_key",
    "open_storage",
    "storage_for",
]


@dataclass(frozen=True)
class StoredObject:
    """An object as it exists in storage: where it is, its SHA-256 (hex) and its size."""

    uri: str
    key: str
    sha256: str
    bytes: int


class Storage(ABC):
    """A place that holds rendered images under keys such as ``prefix/dataset/job.png``."""

    prefix: str

    @abstractmethod
    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "image/png",
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        """Write ``data`` at ``key`` (overwriting) and return only once the stored copy is confirmed."""

    @abstractmethod
    def put_file(self, key: str, path: Path, *, content_type: str) -> StoredObject:
        """Write the local file ``path`` at ``key``, streamed (it may be gigabytes), then confirm it."""

    @abstractmethod
    def head(self, key: str) -> StoredObject | None:
        """Describe the object at ``key``, or None when there is none."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Read the whole object at ``key``."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object at ``key``; an absent object is not an error."""

    @abstractmethod
    def list_keys(self, prefix: str) -> Iterator[str]:
        """Every key under ``prefix`` (a folder-like prefix ending in '/'), in no particular order."""

    @abstractmethod
    def uri_for(self, key: str) -> str:
        """The URI that names ``key`` in this storage."""

    @abstractmethod
    def key_for_uri(self, uri: str) -> str:
        """The key of a URI this storage gave out (uri_for's inverse); StorageError for a URI held elsewhere."""

    @abstractmethod
    def presign(self, key: str, expires_s: int) -> str:
        """A URL that reads ``key`` without credentials for ``expires_s`` seconds (for a folder: its file URI)."""

    @abstractmethod
    def describe(self) -> str:
        """A human description of this storage, safe to log (no secrets)."""

    def read_verified(self, uri: str, sha256: str | None, *, what: str) -> bytes:
        """The object a row records, checked against the sha256 recorded with it; StorageError otherwise.

        ``what`` names the object in the error ("the image of job …"). A row without a sha256 is read unchecked.
        """
        data = self.get(self.key_for_uri(uri))
        if sha256 and hashlib.sha256(data).hexdigest() != sha256:
            raise StorageError(f"{what} at {uri} does not match its recorded sha256")
        return data


BLOCK = 1 << 20  # bytes read at a time when hashing or copying files


def file_digest(path: Path) -> tuple[int, str]:
    """(size, sha256) of a file, read block by block."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def check_key_part(what: str, value: str) -> None:
    """Refuse a key component that could change the key's shape."""
    if not value or value == "." or "/" in value or "\\" in value or ".." in value or "\x00" in value:
        raise ValueError(f"{what} {value!r} is not allowed in a storage key (no '/', '\\\\', '..' or empty)")


def object_key(prefix: str, dataset: str, job_id: str, seq: int) -> str:
    """The key of one attempt's image: ``{prefix}/{dataset}/{job_id}-{seq}.png`` (no prefix: ``{dataset}/…``).

    ``seq`` is the attempt's claim sequence, its fencing token: a late or duplicate attempt writes beside the
    winner, never over it; the job's row names the winner, and `farm gc` removes the others.
    """
    check_key_part("dataset", dataset)
    check_key_part("job id", job_id)
    if seq < 1:
        raise ValueError(f"claim sequence must be at least 1, got {seq}")
    parts = prefix_parts(prefix)
    return "/".join([*parts, dataset, f"{job_id}-{seq}.png"])


def dataset_folder(prefix: str, dataset: str) -> str:
    """The key prefix under which a dataset's images lie: ``{prefix}/{dataset}/``."""
    check_key_part("dataset", dataset)
    return "/".join([*prefix_parts(prefix), dataset]) + "/"


def prefix_parts(prefix: str) -> list[str]:
    """Split a key prefix into its non-empty segments, refusing '..' and backslashes."""
    parts = [p for p in prefix.split("/") if p]
    for part in parts:
        if part in (".", "..") or "\\" in part or "\x00" in part:
            raise ValueError(f"storage prefix {prefix!r} is not allowed (no '.', '..' or '\\\\' segments)")
    return parts


_FORMS = "file:///absolute/path, s3://bucket or s3://bucket/prefix"


def local_folder(storage_url: str) -> Path:
    """The absolute folder a ``file://`` URL names; ValueError for any other URL."""
    parts = urlsplit(storage_url)
    path = Path(unquote(parts.path))
    if parts.scheme != "file" or parts.netloc not in ("", "localhost") or not path.is_absolute():
        raise ValueError(f"storage URL {redact(storage_url)!r} needs an absolute path; use {_FORMS}")
    return path


def open_storage(
    storage_url: str,
    *,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    max_attempts: int = 5,
) -> Storage:
    """Open ``file:///abs/path`` as a folder (creating it) or ``s3://bucket[/prefix]`` as a bucket."""
    parts = urlsplit(storage_url)
    if parts.query or parts.fragment:
        raise ValueError(f"storage URL {redact(storage_url)!r} must not have a query or fragment; use {_FORMS}")
    if parts.scheme == "file":
        from farm.storage.local import LocalStorage

        path = local_folder(storage_url)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the storage folder {path}: {exc.strerror or exc}") from exc
        return LocalStorage(path)
    if parts.scheme == "s3":
        from farm.storage.s3 import S3Storage

        if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError(f"storage URL {redact(storage_url)!r} needs a bucket name; use {_FORMS}")
        return S3Storage(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=s3_endpoint_url,
            region=s3_region,
            max_attempts=max_attempts,
        )
    raise ValueError(f"unsupported storage URL {redact(storage_url)!r}; use {_FORMS}")


def storage_for(settings: Settings, *, max_attempts: int = 5) -> Storage:
    """The storage the settings name (FARM_STORAGE_URL, FARM_S3_*); a malformed URL is a ConfigError."""
    try:
        return open_storage(
            settings.storage_url,
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_region=settings.s3_region,
            max_attempts=max_attempts,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

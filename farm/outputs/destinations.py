"""Where `farm export` writes: a local folder or an S3 prefix, staged locally and published file by file.

Besides whole files, an export puts images (bytes, from several threads at once) and appends to one file
(imagefolder's metadata.jsonl) at a byte offset its manifest recorded: a local file is truncated back to that
offset (dropping whatever a crashed run appended after it) and appended to; an S3 object cannot be appended to,
so the new object is composed on the server with a multipart upload whose first parts are copies of the old
object's first ``at`` bytes (UploadPartCopy) and whose last part is the new bytes, so only the new bytes travel.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from farm.errors import StorageError
from farm.secrets import scrub
from farm.storage import BLOCK, Storage, local_folder, open_storage

# S3's multipart limits: every part but the last at least 5 MiB, a copied part at most 5 GiB.
_S3_MIN_PART = 5 * 1024 * 1024
_S3_MAX_COPY_PART = 5 * 1024 * 1024 * 1024
_S3_UPLOAD_PART = 64 * 1024 * 1024  # the new bytes go up in parts of this size

__all__ = ["Destination", "open_destination"]


class Destination(Protocol):
    """Where export files go; files are staged locally and published one by one, manifest last."""

    def fetch(self, name: str, path: Path) -> bool:
        """Copy the destination's file ``name`` to ``path``; False when there is none."""
        ...

    def publish(self, path: Path, name: str) -> None:
        """Put the local file ``path`` at the destination as ``name``, replacing any file there."""
        ...

    def put_bytes(self, name: str, data: bytes) -> None:
        """Put ``data`` at the destination as ``name``, replacing any file there; safe to call from many threads."""
        ...

    def size(self, name: str) -> int | None:
        """The size of the destination's file ``name``, or None when there is none."""
        ...

    def append(self, name: str, path: Path, *, at: int) -> int:
        """Make ``name`` its first ``at`` bytes followed by the local file ``path``; return its new size.

        The file must be at least ``at`` bytes long (StorageError otherwise); bytes past ``at`` are dropped.
        """
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

    def put_bytes(self, name: str, data: bytes) -> None:
        # A dot-named temp file beside the target, then an atomic rename, as for publish.
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=f".{name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.root / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def size(self, name: str) -> int | None:
        try:
            return (self.root / name).stat().st_size
        except FileNotFoundError:
            return None

    def append(self, name: str, path: Path, *, at: int) -> int:
        target = self.root / name
        fd = os.open(target, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size < at:
                raise StorageError(f"{target} is {size} bytes, shorter than the {at} bytes the export recorded")
            if size > at:
                os.ftruncate(fd, at)  # what a run that died after appending left beyond its last record
            os.lseek(fd, at, os.SEEK_SET)
            written = 0
            with path.open("rb") as source:
                for block in iter(lambda: source.read(BLOCK), b""):
                    view = memoryview(block)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
                        written += n
            os.fsync(fd)  # before the manifest records the new length
        finally:
            os.close(fd)
        return at + written

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

    def put_bytes(self, name: str, data: bytes) -> None:
        """One PUT (boto3 clients are thread-safe), confirmed by a HEAD."""
        self.storage.put(self._key(name), data, content_type=_content_type(name))

    def size(self, name: str) -> int | None:
        found = self.storage.head(self._key(name))
        return None if found is None else found.bytes

    def append(self, name: str, path: Path, *, at: int) -> int:
        """Below S3's 5 MiB part minimum the object is small: rewritten whole. Above it, composed on the server."""
        key = self._key(name)
        added = path.stat().st_size
        current = self.storage.head(key)
        size = 0 if current is None else current.bytes
        if size < at:
            where = self.storage.uri_for(key)
            raise StorageError(f"{where} is {size} bytes, shorter than the {at} bytes the export recorded")
        if at == 0:
            self.storage.put_file(key, path, content_type=_content_type(name))
            return added
        from farm.storage.s3 import S3Storage

        if at < _S3_MIN_PART or not isinstance(self.storage, S3Storage):
            whole = path.with_name(f"{path.name}.whole")
            with whole.open("wb") as f:
                f.write(self.storage.get(key)[:at])
                with path.open("rb") as source:
                    shutil.copyfileobj(source, f, BLOCK)
            self.storage.put_file(key, whole, content_type=_content_type(name))
            whole.unlink()
            return at + added
        # The Storage interface has no server-side compose, so this one step uses S3Storage's boto3 client.
        _compose(self.storage._client, self.storage.bucket, key, at, path, content_type=_content_type(name))
        found = self.storage.head(key)
        if found is None or found.bytes != at + added:
            raise StorageError(
                f"{self.storage.uri_for(key)} did not confirm after appending: "
                f"{None if found is None else found.bytes} bytes, expected {at + added}"
            )
        return at + added

    def staging(self) -> tempfile.TemporaryDirectory[str]:
        return tempfile.TemporaryDirectory(prefix="farm-export-")


def _compose(client: Any, bucket: str, key: str, at: int, path: Path, *, content_type: str) -> None:
    """Replace ``key`` with its first ``at`` bytes (copied on the server) + the file ``path`` (uploaded)."""
    from botocore.exceptions import BotoCoreError, ClientError

    where = f"s3://{bucket}/{key}"
    try:
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key, ContentType=content_type)["UploadId"]
    except (ClientError, BotoCoreError) as exc:
        raise StorageError(scrub(f"appending to {where} failed: {exc}")) from exc
    try:
        parts: list[dict[str, Any]] = []
        copies = math.ceil(at / _S3_MAX_COPY_PART)  # equal ranges, each well above the 5 MiB minimum
        step = math.ceil(at / copies)
        for start in range(0, at, step):
            answer = client.upload_part_copy(
                Bucket=bucket,
                Key=key,
                UploadId=upload_id,
                PartNumber=len(parts) + 1,
                CopySource={"Bucket": bucket, "Key": key},
                CopySourceRange=f"bytes={start}-{min(at, start + step) - 1}",
            )
            parts.append({"PartNumber": len(parts) + 1, "ETag": answer["CopyPartResult"]["ETag"]})
        with path.open("rb") as source:
            for block in iter(lambda: source.read(_S3_UPLOAD_PART), b""):
                answer = client.upload_part(
                    Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=len(parts) + 1, Body=block
                )
                parts.append({"PartNumber": len(parts) + 1, "ETag": answer["ETag"]})
        client.complete_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})
    except BaseException as exc:
        # An upload that cannot be aborted is left to the bucket's lifecycle rules.
        with contextlib.suppress(ClientError, BotoCoreError):
            client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)
        if isinstance(exc, ClientError | BotoCoreError):
            raise StorageError(scrub(f"appending to {where} failed: {exc}")) from exc
        raise


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

"""Where rendered images go: a local folder or an S3-compatible bucket, behind one small interface."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, Protocol
from urllib.parse import unquote, urlsplit

from farm.errors import ConfigError, StorageError, TransientStorageError

if TYPE_CHECKING:
    from botocore.exceptions import BotoCoreError, ClientError

    from farm.settings import Settings

__all__ = [
    "LocalStorage",
    "S3Storage",
    "Storage",
    "StoredObject",
    "object_key",
    "open_storage",
]

# S3 error codes that mean "try again later" even when the status code is below 500.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestLimitExceeded",
        "TooManyRequests",
    }
)
# Codes S3 uses for "no such object"; a HEAD has no body, so a missing key shows up as a bare "404".
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]*@")


@dataclass(frozen=True)
class StoredObject:
    """An object as it exists in storage: where it is, its SHA-256 (hex) and its size."""

    uri: str
    key: str
    sha256: str
    bytes: int


class Storage(Protocol):
    """A place that holds rendered images under keys such as ``prefix/dataset/job.png``."""

    prefix: str

    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "image/png",
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        """Write ``data`` at ``key`` (overwriting) and return only once the stored copy is confirmed."""
        ...

    def head(self, key: str) -> StoredObject | None:
        """Describe the object at ``key``, or None when there is none."""
        ...

    def get(self, key: str) -> bytes:
        """Read the whole object at ``key``."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object at ``key``; an absent object is not an error."""
        ...

    def uri_for(self, key: str) -> str:
        """The URI that names ``key`` in this storage."""
        ...

    def describe(self) -> str:
        """A human description of this storage, safe to log (no secrets)."""
        ...


def _check_name(what: str, value: str) -> None:
    """Refuse a key component that could change the key's shape."""
    if not value or value == "." or "/" in value or "\\" in value or ".." in value or "\x00" in value:
        raise ValueError(f"{what} {value!r} is not allowed in a storage key (no '/', '\\\\', '..' or empty)")


def object_key(prefix: str, dataset: str, job_id: str) -> str:
    """The key of one job's image: ``{prefix}/{dataset}/{job_id}.png``, or ``{dataset}/{job_id}.png``."""
    _check_name("dataset", dataset)
    _check_name("job id", job_id)
    parts = _prefix_parts(prefix)
    return "/".join([*parts, dataset, f"{job_id}.png"])


def _prefix_parts(prefix: str) -> list[str]:
    """Split a key prefix into its non-empty segments, refusing '..' and backslashes."""
    parts = [p for p in prefix.split("/") if p]
    for part in parts:
        if part in (".", "..") or "\\" in part or "\x00" in part:
            raise ValueError(f"storage prefix {prefix!r} is not allowed (no '.', '..' or '\\\\' segments)")
    return parts


def _redact(text: str) -> str:
    """Drop any ``user:password@`` from URLs inside ``text``."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LocalStorage:
    """Objects as files under one folder; writes are atomic (temp file, fsync, rename)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        self.prefix = ""

    def _path(self, key: str) -> Path:
        """The file for ``key``, refusing keys that would land outside the root."""
        if not key or key.startswith(("/", "\\")) or "\\" in key or "\x00" in key:
            raise StorageError(f"key {key!r} is not a relative key inside {self.root}")
        path = (self.root / key).resolve()
        # resolve() follows '..' and symlinks, so this also catches a link pointing out of the root.
        if path == self.root or not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} escapes the storage folder {self.root}")
        return path

    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "image/png",
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        """Write ``data`` atomically at ``key``, then re-read and hash it to confirm."""
        # A plain file has nowhere to keep content_type or metadata; they exist for the interface's sake.
        path = self._path(key)
        digest = _sha256(data)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # The temp file sits in the same folder so os.replace is a same-filesystem atomic rename.
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp_name, path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise
            _fsync_dir(path.parent)
            stored = path.read_bytes()
        except OSError as exc:
            raise StorageError(f"could not write {key!r} under {self.root}: {exc.strerror or exc}") from exc
        if len(stored) != len(data) or _sha256(stored) != digest:
            raise StorageError(f"{key!r} under {self.root} did not read back as written")
        return StoredObject(uri=path.as_uri(), key=key, sha256=digest, bytes=len(data))

    def head(self, key: str) -> StoredObject | None:
        """Describe the file at ``key`` (hashing it), or None when it is absent."""
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        except OSError as exc:
            raise StorageError(f"could not read {key!r} under {self.root}: {exc.strerror or exc}") from exc
        return StoredObject(uri=path.as_uri(), key=key, sha256=_sha256(data), bytes=len(data))

    def get(self, key: str) -> bytes:
        """Read the file at ``key``."""
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise StorageError(f"no object {key!r} under {self.root}") from exc
        except OSError as exc:
            raise StorageError(f"could not read {key!r} under {self.root}: {exc.strerror or exc}") from exc

    def delete(self, key: str) -> None:
        """Remove the file at ``key`` if it exists."""
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise StorageError(f"could not delete {key!r} under {self.root}: {exc.strerror or exc}") from exc

    def uri_for(self, key: str) -> str:
        """``file:///abs/path`` for ``key``."""
        return self._path(key).as_uri()

    def describe(self) -> str:
        """The folder the objects live in."""
        return f"local folder {self.root}"


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable by syncing its folder, where the platform allows it."""
    if not hasattr(os, "O_DIRECTORY"):
        return  # Windows cannot open a folder for fsync; the rename is still atomic.
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class S3Storage:
    """Objects in an S3 or S3-compatible bucket (MinIO, R2, …) through boto3."""

    def __init__(
        self,
        bucket: str,
        prefix: str,
        *,
        endpoint_url: str | None,
        region: str | None,
        max_attempts: int = 5,
        connect_timeout_s: float = 5,
        read_timeout_s: float = 30,
    ) -> None:
        if not bucket or "/" in bucket:
            raise ValueError(f"bucket name {bucket!r} is not valid")
        if endpoint_url is not None and urlsplit(endpoint_url).username is not None:
            # Credentials belong in the AWS_* variables; a URL with userinfo ends up in logs and errors.
            raise ValueError(
                f"the S3 endpoint URL must not contain credentials ({_redact(endpoint_url)}); "
                "use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            )
        import boto3  # Lazy: only the S3 backend needs boto3, and it is slow to import.
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = "/".join(_prefix_parts(prefix))
        self.endpoint_url = endpoint_url
        self.region = region
        s3_options: dict[str, str] = {}
        if endpoint_url is not None:
            # S3-compatible stores (MinIO in compose, R2) all serve path-style URLs; virtual hosts need DNS.
            s3_options["addressing_style"] = "path"
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, not {max_attempts}")
        config = Config(
            # botocore's "max_attempts" counts retries after the first try; "total_max_attempts" counts
            # every try, which is what our max_attempts means (1 = no retry).
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            s3=s3_options or None,
        )
        # Credentials come from the standard chain (AWS_* variables, profile, role); never passed here.
        self._client: Any = boto3.session.Session().client(
            "s3", endpoint_url=endpoint_url, region_name=region, config=config
        )

    def _fail(self, exc: ClientError | BotoCoreError, action: str, key: str | None) -> NoReturn:
        """Raise the farm error matching a botocore error: transient ones can be retried, others not."""
        from botocore.exceptions import ClientError, HTTPClientError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        where = f"s3://{self.bucket}/{key}" if key is not None else f"s3://{self.bucket}"
        if isinstance(exc, ClientError):
            error = exc.response.get("Error", {})
            code = str(error.get("Code", "Unknown"))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            detail = str(error.get("Message") or "").strip()
            message = f"{action} {where} failed: {code} (HTTP {status})" + (f": {detail}" if detail else "")
            if status >= 500 or status == 429 or code in _TRANSIENT_CODES:
                raise TransientStorageError(self._scrub(message)) from exc
            if code == "NoSuchBucket":
                message += f" — bucket {self.bucket!r} does not exist at {self._where()}"
            raise StorageError(self._scrub(message)) from exc
        # EndpointConnectionError, ConnectTimeoutError (ConnectionError) and ReadTimeoutError,
        # ConnectionClosedError (HTTPClientError): the network failed, not the request.
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            raise TransientStorageError(
                self._scrub(f"{action} {where} failed: cannot reach {self._where()} ({type(exc).__name__})")
            ) from exc
        # NoCredentialsError, ParamValidationError, …: retrying will not help.
        raise StorageError(self._scrub(f"{action} {where} failed: {type(exc).__name__}: {exc}")) from exc

    def _where(self) -> str:
        return _redact(self.endpoint_url) if self.endpoint_url else f"AWS S3 ({self.region or 'default region'})"

    def _scrub(self, text: str) -> str:
        """Remove URL userinfo and, as a last guard, the secret key and session token themselves."""
        text = _redact(text)
        for name in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
            secret = os.environ.get(name)
            if secret:
                text = text.replace(secret, "***")
        return text

    def put(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str = "image/png",
        metadata: Mapping[str, str] | None = None,
    ) -> StoredObject:
        """Upload ``data`` to ``key`` (overwriting), then confirm size and SHA-256 with a HEAD."""
        from botocore.exceptions import BotoCoreError, ClientError

        digest = _sha256(data)
        # Our sha256 goes last so caller metadata can never overwrite the value the confirmation checks.
        meta = {**(metadata or {}), "sha256": digest}
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, Metadata=meta)
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, "upload to", key)
        stored = self.head(key)
        if stored is None:
            # Some S3-compatible stores are briefly eventually consistent; a retried put simply overwrites.
            raise TransientStorageError(f"s3://{self.bucket}/{key} was not found right after upload")
        if stored.bytes != len(data) or stored.sha256 != digest:
            raise StorageError(
                f"s3://{self.bucket}/{key} did not confirm: stored {stored.bytes} bytes sha256 "
                f"{stored.sha256 or '(none)'}, expected {len(data)} bytes sha256 {digest}"
            )
        return stored

    def head(self, key: str) -> StoredObject | None:
        """Describe the object at ``key``; ``sha256`` is "" when it was not written by the farm."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._client.head_object(Bucket=self.bucket, Key=key)
        except ClientError as exc:
            # A HEAD carries no error body, so a missing bucket also reads as a plain 404 here.
            if str(exc.response.get("Error", {}).get("Code")) in _NOT_FOUND_CODES:
                return None
            self._fail(exc, "HEAD of", key)
        except BotoCoreError as exc:
            self._fail(exc, "HEAD of", key)
        return StoredObject(
            uri=self.uri_for(key),
            key=key,
            sha256=str(response.get("Metadata", {}).get("sha256", "")),
            bytes=int(response["ContentLength"]),
        )

    def get(self, key: str) -> bytes:
        """Download the object at ``key``, checking it against its stored SHA-256 when there is one."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            data: bytes = response["Body"].read()
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, "download of", key)
        expected = response.get("Metadata", {}).get("sha256")
        if expected and _sha256(data) != expected:
            raise StorageError(f"s3://{self.bucket}/{key} does not match its recorded sha256")
        return data

    def delete(self, key: str) -> None:
        """Delete the object at ``key``; S3 answers success for an absent key."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._client.delete_object(Bucket=self.bucket, Key=key)
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, "delete of", key)

    def uri_for(self, key: str) -> str:
        """``s3://bucket/key``."""
        return f"s3://{self.bucket}/{key}"

    def describe(self) -> str:
        """Bucket, prefix and endpoint, without credentials."""
        prefix = f" prefix {self.prefix!r}" if self.prefix else ""
        return f"S3 bucket {self.bucket!r}{prefix} at {self._where()}"


def open_storage(
    storage_url: str,
    *,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    max_attempts: int = 5,
) -> Storage:
    """Open ``file:///abs/path`` as a LocalStorage (creating it) or ``s3://bucket[/prefix]`` as S3Storage."""
    forms = "file:///absolute/path, s3://bucket or s3://bucket/prefix"
    parts = urlsplit(storage_url)
    if parts.query or parts.fragment:
        raise ValueError(f"storage URL {_redact(storage_url)!r} must not have a query or fragment; use {forms}")
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        if parts.netloc not in ("", "localhost") or not path.is_absolute():
            raise ValueError(f"storage URL {_redact(storage_url)!r} needs an absolute path; use {forms}")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create the storage folder {path}: {exc.strerror or exc}") from exc
        return LocalStorage(path)
    if parts.scheme == "s3":
        if not parts.netloc or "@" in parts.netloc or ":" in parts.netloc:
            raise ValueError(f"storage URL {_redact(storage_url)!r} needs a bucket name; use {forms}")
        return S3Storage(
            parts.netloc,
            unquote(parts.path),
            endpoint_url=s3_endpoint_url,
            region=s3_region,
            max_attempts=max_attempts,
        )
    raise ValueError(f"unsupported storage URL {_redact(storage_url)!r}; use {forms}")


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

"""Storage in an S3 or S3-compatible bucket (AWS, MinIO, R2, …) through boto3; every write confirmed by a HEAD."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn
from urllib.parse import unquote, urlsplit

from farm.errors import StorageError, TransientStorageError
from farm.secrets import redact, scrub
from farm.storage import Storage, StoredObject, file_digest, prefix_parts

if TYPE_CHECKING:
    from botocore.exceptions import BotoCoreError, ClientError

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


class S3Storage(Storage):
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
                f"the S3 endpoint URL must not contain credentials ({redact(endpoint_url)}); "
                "use AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
            )
        import boto3  # Lazy: only the S3 backend needs boto3, and it is slow to import.
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = "/".join(prefix_parts(prefix))
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
                raise TransientStorageError(scrub(message)) from exc
            if code == "NoSuchBucket":
                message += f" — bucket {self.bucket!r} does not exist at {self._where()}"
            raise StorageError(scrub(message)) from exc
        # EndpointConnectionError, ConnectTimeoutError (ConnectionError) and ReadTimeoutError,
        # ConnectionClosedError (HTTPClientError): the network failed, not the request.
        if isinstance(exc, BotoConnectionError | HTTPClientError):
            raise TransientStorageError(
                scrub(f"{action} {where} failed: cannot reach {self._where()} ({type(exc).__name__})")
            ) from exc
        # NoCredentialsError, ParamValidationError, …: retrying will not help.
        raise StorageError(scrub(f"{action} {where} failed: {type(exc).__name__}: {exc}")) from exc

    def _where(self) -> str:
        return redact(self.endpoint_url) if self.endpoint_url else f"AWS S3 ({self.region or 'default region'})"

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

        digest = hashlib.sha256(data).hexdigest()
        # Our sha256 goes last so caller metadata can never overwrite the value the confirmation checks.
        meta = {**(metadata or {}), "sha256": digest}
        try:
            self._client.put_object(Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, Metadata=meta)
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, "upload to", key)
        return self._confirm(key, len(data), digest)

    def _confirm(self, key: str, size: int, digest: str) -> StoredObject:
        """HEAD the object just written: it must be there with this size and sha256."""
        stored = self.head(key)
        if stored is None:
            # Some S3-compatible stores are briefly eventually consistent; a retried put simply overwrites.
            raise TransientStorageError(f"s3://{self.bucket}/{key} was not found right after upload")
        if stored.bytes != size or stored.sha256 != digest:
            raise StorageError(
                f"s3://{self.bucket}/{key} did not confirm: stored {stored.bytes} bytes sha256 "
                f"{stored.sha256 or '(none)'}, expected {size} bytes sha256 {digest}"
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
        if expected and hashlib.sha256(data).hexdigest() != expected:
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

    def put_file(self, key: str, path: Path, *, content_type: str) -> StoredObject:
        """Upload a file (multipart when big, streamed from disk), then confirm size and SHA-256 with a HEAD."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            size, digest = file_digest(path)
        except OSError as exc:
            raise StorageError(f"could not read {path} to store it at {key!r}: {exc.strerror or exc}") from exc
        extra = {"ContentType": content_type, "Metadata": {"sha256": digest}}
        try:
            self._client.upload_file(str(path), self.bucket, key, ExtraArgs=extra)
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, "upload to", key)
        return self._confirm(key, size, digest)

    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` in this bucket, page by page."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
            for page in pages:
                for item in page.get("Contents", []):
                    yield str(item["Key"])
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, "listing", prefix)

    def key_for_uri(self, uri: str) -> str:
        """The key of an ``s3://`` URI in this bucket."""
        parts = urlsplit(uri)
        if parts.scheme != "s3" or parts.netloc != self.bucket:
            raise StorageError(f"{uri} is not in the farm's storage, {self.describe()}")
        return unquote(parts.path.lstrip("/"))

    def presign(self, key: str, expires_s: int) -> str:
        """A presigned GET URL, valid for ``expires_s`` seconds."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            url: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=expires_s
            )
        except (ClientError, BotoCoreError) as exc:
            self._fail(exc, "signing a URL for", key)
        return url

    def describe(self) -> str:
        """Bucket, prefix and endpoint, without credentials."""
        prefix = f" prefix {self.prefix!r}" if self.prefix else ""
        return f"S3 bucket {self.bucket!r}{prefix} at {self._where()}"

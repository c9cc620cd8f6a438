"""farm.storage against a real folder and a real S3 HTTP endpoint (moto's server)."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from farm.errors import StorageError, TransientStorageError
from farm.storage import Storage, StoredObject, dataset_folder, object_key, open_storage
from farm.storage.local import LocalStorage
from farm.storage.s3 import S3Storage
from tests.support.s3 import S3Server, free_port

SECRET = "sEcReT-do-not-leak-0123456789abcdefXYZ"
PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Dummy credentials with a distinctive secret, isolated from the developer's own AWS setup."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTFARM")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def bucket(s3_server: S3Server) -> str:
    name = f"farm-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def s3_storage(s3_server: S3Server, bucket: str, aws_env: None) -> S3Storage:
    return S3Storage(bucket, "renders", endpoint_url=s3_server.endpoint_url, region="us-east-1", max_attempts=2)


@pytest.fixture
def local_storage(tmp_path: Path) -> LocalStorage:
    return LocalStorage(tmp_path / "objects")


@pytest.fixture(params=["local", "s3"])
def storage(request: pytest.FixtureRequest) -> Storage:
    fixture = "local_storage" if request.param == "local" else "s3_storage"
    result: Storage = request.getfixturevalue(fixture)
    return result


# --- object_key ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        ("renders", "renders/cats/j1-1.png"),
        ("", "cats/j1-1.png"),
        ("/a/b/", "a/b/cats/j1-1.png"),
        ("a//b", "a/b/cats/j1-1.png"),
    ],
)
def test_object_key_forms(prefix: str, expected: str) -> None:
    assert object_key(prefix, "cats", "j1", 1) == expected


def test_each_attempt_has_a_key_of_its_own() -> None:
    # The fence in the storage layout: a late attempt writes beside the winner, never over it.
    assert object_key("", "cats", "j1", 1) != object_key("", "cats", "j1", 2) == "cats/j1-2.png"
    with pytest.raises(ValueError, match="at least 1"):
        object_key("", "cats", "j1", 0)


def test_list_keys_under_a_dataset_folder_on_both_backends(local_storage: Storage, s3_storage: Storage) -> None:
    for storage in (local_storage, s3_storage):
        for key in (object_key(storage.prefix, "cats", "j1", 1), object_key(storage.prefix, "cats", "j2", 3)):
            storage.put(key, b"x")
        storage.put(object_key(storage.prefix, "dogs", "j9", 1), b"y")
        folder = dataset_folder(storage.prefix, "cats")
        assert sorted(storage.list_keys(folder)) == [
            object_key(storage.prefix, "cats", "j1", 1),
            object_key(storage.prefix, "cats", "j2", 3),
        ]
        assert list(storage.list_keys(dataset_folder(storage.prefix, "birds"))) == []


@pytest.mark.parametrize(
    ("prefix", "dataset", "job_id"),
    [
        ("", "a/b", "j1"),
        ("", "..", "j1"),
        ("", "cats", "../j1"),
        ("", "cats", "a\\b"),
        ("", "", "j1"),
        ("", "cats", ""),
        ("", ".", "j1"),
        ("a/../b", "cats", "j1"),
    ],
)
def test_object_key_rejects_unsafe_parts(prefix: str, dataset: str, job_id: str) -> None:
    with pytest.raises(ValueError, match="not allowed"):
        object_key(prefix, dataset, job_id, 1)


# --- both backends ------------------------------------------------------------------------------------------


def test_round_trip(storage: Storage) -> None:
    key = object_key(storage.prefix, "cats", "job-1", 1)

    stored = storage.put(key, PNG, metadata={"seed": "7"})

    assert stored == StoredObject(
        uri=storage.uri_for(key), key=key, sha256=hashlib.sha256(PNG).hexdigest(), bytes=len(PNG)
    )
    assert storage.head(key) == stored
    assert storage.get(key) == PNG
    storage.delete(key)
    assert storage.head(key) is None
    storage.delete(key)  # absent is fine
    with pytest.raises(StorageError):
        storage.get(key)


def test_head_of_absent_key_is_none(storage: Storage) -> None:
    assert storage.head(object_key(storage.prefix, "cats", "never-written", 1)) is None


def test_uris(local_storage: LocalStorage, s3_storage: S3Storage, tmp_path: Path) -> None:
    local_key = object_key(local_storage.prefix, "cats", "j1", 1)
    assert local_storage.put(local_key, PNG).uri == (tmp_path / "objects" / "cats" / "j1-1.png").resolve().as_uri()
    assert local_storage.uri_for(local_key).startswith("file:///")

    s3_key = object_key(s3_storage.prefix, "cats", "j1", 1)
    assert s3_key == "renders/cats/j1-1.png"
    assert s3_storage.put(s3_key, PNG).uri == f"s3://{s3_storage.bucket}/renders/cats/j1-1.png"


# --- retries overwrite, never duplicate ---------------------------------------------------------------------


def test_s3_put_twice_leaves_one_object(s3_storage: S3Storage, s3_server: S3Server) -> None:
    key = object_key(s3_storage.prefix, "cats", "j1", 1)
    s3_storage.put(key, b"first attempt")
    second = s3_storage.put(key, PNG)

    listing = s3_server.client().list_objects_v2(Bucket=s3_storage.bucket)
    assert listing["KeyCount"] == 1
    assert [o["Key"] for o in listing["Contents"]] == [key]
    assert s3_storage.head(key) == second
    assert s3_storage.get(key) == PNG


def test_local_put_twice_leaves_one_file(local_storage: LocalStorage) -> None:
    key = object_key(local_storage.prefix, "cats", "j1", 1)
    local_storage.put(key, b"first attempt")
    second = local_storage.put(key, PNG)

    # No temp files are left behind either: the folder holds exactly the object.
    assert [p.name for p in (local_storage.root / "cats").iterdir()] == ["j1-1.png"]
    assert local_storage.head(key) == second
    assert local_storage.get(key) == PNG


# --- S3 specifics -------------------------------------------------------------------------------------------


def test_s3_caller_metadata_is_stored_but_cannot_replace_sha256(s3_storage: S3Storage, s3_server: S3Server) -> None:
    key = object_key(s3_storage.prefix, "cats", "j1", 1)
    stored = s3_storage.put(key, PNG, metadata={"seed": "7", "sha256": "bogus"})

    raw = s3_server.client().head_object(Bucket=s3_storage.bucket, Key=key)
    assert raw["Metadata"] == {"seed": "7", "sha256": hashlib.sha256(PNG).hexdigest()}
    assert raw["ContentType"] == "image/png"
    assert stored.sha256 == hashlib.sha256(PNG).hexdigest()


def test_s3_head_of_foreign_object_has_empty_sha256(s3_storage: S3Storage, s3_server: S3Server) -> None:
    key = object_key(s3_storage.prefix, "cats", "foreign", 1)
    s3_server.client().put_object(Bucket=s3_storage.bucket, Key=key, Body=b"abc")

    stored = s3_storage.head(key)

    assert stored is not None
    assert (stored.sha256, stored.bytes) == ("", 3)


def test_s3_get_refuses_an_object_that_no_longer_matches_its_sha256(s3_storage: S3Storage, s3_server: S3Server) -> None:
    key = object_key(s3_storage.prefix, "cats", "j1", 1)
    stored = s3_storage.put(key, PNG)
    s3_server.client().put_object(
        Bucket=s3_storage.bucket, Key=key, Body=b"tampered", Metadata={"sha256": stored.sha256}
    )

    with pytest.raises(StorageError, match="sha256") as info:
        s3_storage.get(key)
    assert not isinstance(info.value, TransientStorageError)


def test_s3_missing_bucket_is_a_permanent_error(s3_server: S3Server, aws_env: None) -> None:
    storage = S3Storage("no-such-bucket-farm", "", endpoint_url=s3_server.endpoint_url, region="us-east-1")

    with pytest.raises(StorageError) as info:
        storage.put("cats/j1-1.png", PNG)

    assert not isinstance(info.value, TransientStorageError)
    message = str(info.value)
    assert "no-such-bucket-farm" in message
    assert "NoSuchBucket" in message
    assert SECRET not in message


def test_s3_unreachable_endpoint_is_transient(aws_env: None) -> None:
    storage = S3Storage(
        "farm",
        "",
        endpoint_url=f"http://127.0.0.1:{free_port()}",
        region="us-east-1",
        max_attempts=1,
        connect_timeout_s=2,
    )

    with pytest.raises(TransientStorageError) as put_info:
        storage.put("cats/j1-1.png", PNG)
    # head() must not mistake "cannot connect" for "absent".
    with pytest.raises(TransientStorageError) as head_info:
        storage.head("cats/j1-1.png")

    for info in (put_info, head_info):
        assert "farm" in str(info.value)
        assert SECRET not in str(info.value)


class _FixedErrorHandler(BaseHTTPRequestHandler):
    """Answers every request with one S3 error document, counting the requests."""

    protocol_version = "HTTP/1.1"  # so botocore's "Expect: 100-continue" is answered at once
    status = 503
    code = "SlowDown"
    requests: list[str]

    def _answer(self) -> None:
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{self.code}</Code>"
            f"<Message>fixed answer</Message><RequestId>r1</RequestId></Error>"
        ).encode()
        self.requests.append(self.command)
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(self.status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_PUT = do_GET = do_HEAD = do_DELETE = _answer

    def log_message(self, format: str, *args: object) -> None:  # silence the test output
        return


@contextmanager
def _error_server(status: int, code: str) -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server that answers every request with one S3 error; yields its URL and request log."""
    requests: list[str] = []
    handler = type("Handler", (_FixedErrorHandler,), {"status": status, "code": code, "requests": requests})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.parametrize(
    ("status", "code", "transient"),
    [
        (503, "SlowDown", True),
        (500, "InternalError", True),
        (400, "RequestTimeout", True),
        (403, "AccessDenied", False),
        (403, "InvalidAccessKeyId", False),
    ],
)
def test_s3_error_classification(aws_env: None, status: int, code: str, transient: bool) -> None:
    with _error_server(status, code) as (url, requests):
        storage = S3Storage("farm", "", endpoint_url=url, region="us-east-1", max_attempts=1)
        with pytest.raises(StorageError) as info:
            storage.put("cats/j1-1.png", PNG)

    assert isinstance(info.value, TransientStorageError) is transient
    assert requests == ["PUT"]  # max_attempts=1: botocore did not retry
    assert code in str(info.value)
    assert "s3://farm/cats/j1-1.png" in str(info.value)
    assert SECRET not in str(info.value)


def test_s3_max_attempts_counts_every_try(aws_env: None) -> None:
    with _error_server(503, "SlowDown") as (url, requests):
        storage = S3Storage("farm", "", endpoint_url=url, region="us-east-1", max_attempts=2)
        with pytest.raises(TransientStorageError):
            storage.put("cats/j1-1.png", PNG)

    assert requests == ["PUT", "PUT"]


def test_s3_endpoint_with_credentials_is_refused_without_echoing_them(aws_env: None) -> None:
    with pytest.raises(ValueError, match="must not contain credentials") as info:
        S3Storage("farm", "", endpoint_url=f"http://user:{SECRET}@127.0.0.1:9000", region=None)
    assert SECRET not in str(info.value)


def test_s3_describe_has_no_secret(s3_storage: S3Storage, s3_server: S3Server) -> None:
    text = s3_storage.describe()
    assert s3_storage.bucket in text
    assert s3_server.endpoint_url in text
    assert SECRET not in text
    assert "AKIATESTFARM" not in text


# --- local specifics ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["../outside.png", "cats/../../outside.png", "/etc/passwd", "..\\x.png", ""])
def test_local_key_escaping_root_is_refused(local_storage: LocalStorage, tmp_path: Path, key: str) -> None:
    with pytest.raises(StorageError):
        local_storage.put(key, PNG)
    assert not (tmp_path / "outside.png").exists()


def test_local_symlink_out_of_root_is_refused(local_storage: LocalStorage, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    local_storage.root.mkdir(parents=True)
    (local_storage.root / "cats").symlink_to(outside)

    with pytest.raises(StorageError, match="escapes"):
        local_storage.put("cats/j1-1.png", PNG)
    assert list(outside.iterdir()) == []


def test_local_write_failure_leaves_nothing_behind(local_storage: LocalStorage) -> None:
    local_storage.root.mkdir(parents=True)
    (local_storage.root / "cats").write_bytes(b"a file where a folder should be")

    with pytest.raises(StorageError, match="could not write"):
        local_storage.put("cats/j1-1.png", PNG)
    assert [p.name for p in local_storage.root.iterdir()] == ["cats"]


def test_local_describe(local_storage: LocalStorage) -> None:
    assert str(local_storage.root) in local_storage.describe()


# --- open_storage -------------------------------------------------------------------------------------------


def test_open_storage_file_url_creates_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "objects"
    storage = open_storage(folder.as_uri())

    assert isinstance(storage, LocalStorage)
    assert folder.is_dir()
    assert storage.root == folder.resolve()
    assert storage.prefix == ""


@pytest.mark.parametrize(
    ("url", "bucket", "prefix"),
    [
        ("s3://farm-bucket", "farm-bucket", ""),
        ("s3://farm-bucket/some/prefix/", "farm-bucket", "some/prefix"),
    ],
)
def test_open_storage_s3_url(s3_server: S3Server, aws_env: None, url: str, bucket: str, prefix: str) -> None:
    storage = open_storage(url, s3_endpoint_url=s3_server.endpoint_url, s3_region="us-east-1")

    assert isinstance(storage, S3Storage)
    assert (storage.bucket, storage.prefix) == (bucket, prefix)
    assert object_key(storage.prefix, "cats", "j1", 1) == "/".join(p for p in (prefix, "cats/j1-1.png") if p)
    assert SECRET not in storage.describe()


def test_open_storage_s3_round_trip(s3_server: S3Server, bucket: str, aws_env: None) -> None:
    storage = open_storage(f"s3://{bucket}/datasets", s3_endpoint_url=s3_server.endpoint_url)
    key = object_key(storage.prefix, "cats", "j1", 1)

    assert storage.put(key, PNG).uri == f"s3://{bucket}/datasets/cats/j1-1.png"
    assert storage.get(key) == PNG


@pytest.mark.parametrize(
    "url",
    ["ftp://x", "file://relative/path", "s3://", "/abs/path", "s3://user:pw@bucket/x", "file:///tmp/x?y=1"],
)
def test_open_storage_rejects_other_forms(url: str, aws_env: None) -> None:
    with pytest.raises(ValueError, match="file:///absolute/path") as info:
        open_storage(url)
    assert "pw" not in str(info.value)

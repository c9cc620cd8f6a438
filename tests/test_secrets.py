"""The one secret scrubber (farm/secrets.py): URL passwords given in the userinfo or as query parameters
(`?password=`, `?token=`, …) never reach what the farm prints, logs or stores, and such URLs work.

Real services throughout: the shared PostgreSQL and Redis, a private redis-server that demands a password, and
a listener speaking just enough of PostgreSQL's protocol to ask libpq for a password (the shared PostgreSQL
trusts every connection from 127.0.0.1, so it never asks for one).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import text
from sqlalchemy.engine import Engine

from farm.dispatch.broker import kombu_url, make_celery
from farm.errors import ConfigError, FarmError
from farm.secrets import MASK, ScrubbingFilter, redact, scrub, secrets_in, secrets_of
from farm.settings import load_settings
from farm.store import fleet
from farm.store.engine import ensure_schema, make_engine
from tests.support.processes import Worker, farm_env, run_farm, wait_until
from tests.support.s3 import free_port

SECRET = "s3cret-q"

# Every spelling of a secret query parameter the scrubber knows (case-insensitive).
SECRET_PARAMETERS = [
    "password",
    "PASSWORD",
    "Password",
    "passwd",
    "pwd",
    "pass",
    "sslpassword",
    "token",
    "access_token",
    "X-Amz-Security-Token",
    "secret",
    "client_secret",
    "api_key",
    "apikey",
    "api-key",
    "sig",
    "X-Amz-Signature",
]


# ---- redact, secrets_in / secrets_of, scrub ----------------------------------------------------------


@pytest.mark.parametrize("name", SECRET_PARAMETERS)
def test_redact_masks_each_secret_query_parameter_and_keeps_the_rest_of_the_url(name: str) -> None:
    url = f"postgresql+psycopg://farm@Db.Example:5432/farm?sslmode=require&{name}={SECRET}&application_name=x#f"
    assert redact(url) == (
        f"postgresql+psycopg://farm@Db.Example:5432/farm?sslmode=require&{name}={MASK}&application_name=x#f"
    )
    assert secrets_in(url) == {SECRET}
    assert scrub(f'driver said: value "{SECRET}" is wrong for {url}', hidden=[]) == (
        f'driver said: value "{SECRET}" is wrong for {redact(url)}'
    ), "without the configured secrets, only the URL syntax is masked"
    cleaned = scrub(f'driver said: value "{SECRET}" is wrong for {url}', hidden=secrets_in(url))
    assert SECRET not in cleaned and f"{name}={MASK}" in cleaned


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://farm@db/farm?sslmode=require&application_name=farm",
        "rediss://redis.example:6380/0?ssl_cert_reqs=required",
        "http://minio:9000/?X-Amz-Credential=AKIDEXAMPLE&key=images/a.png",  # an access key id is no secret
        "s3://bucket/prefix",
        "file:///tmp/x#token=not-a-query",
    ],
)
def test_redact_leaves_urls_without_secrets_as_written(url: str) -> None:
    assert redact(url) == url
    assert secrets_in(url) == set()


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (
            "redis://user:pw@Redis.Example:6380/0?password=q&db=1",
            f"redis://user:{MASK}@Redis.Example:6380/0?password={MASK}&db=1",
        ),
        ("redis://:pw@[::1]:6379/0", f"redis://:{MASK}@[::1]:6379/0"),
        ("amqp://guest:guest@rabbit:5672//?heartbeat=30", f"amqp://guest:{MASK}@rabbit:5672//?heartbeat=30"),
        ("redis://h:6379/0?password=", "redis://h:6379/0?password="),  # nothing to hide
    ],
)
def test_redact_masks_userinfo_and_query_together(url: str, expected: str) -> None:
    assert redact(url) == expected


def test_redact_inside_a_sentence_keeps_the_sentence_punctuation() -> None:
    line = f"cannot reach postgresql+psycopg://farm@db/farm?password={SECRET}: connection refused."
    assert redact(line) == f"cannot reach postgresql+psycopg://farm@db/farm?password={MASK}: connection refused."
    assert redact(redact(line)) == redact(line), "scrubbing twice changes nothing"


def test_secrets_of_collects_query_values_raw_and_decoded_and_scrub_removes_every_spelling(tmp_path: Path) -> None:
    settings = load_settings(
        {},
        home=str(tmp_path),
        database_url="postgresql+psycopg://farm@db/farm?password=p%40ss%2Bq&sslmode=require",
        broker_url="redis://redis:6379/0?token=tok+en",
        storage_url="s3://bucket/prefix",
        s3_endpoint_url="http://minio:9000/?X-Amz-Security-Token=stok",
    )
    found = set(secrets_of(settings, env={}))
    assert {"p%40ss%2Bq", "p@ss+q", "tok+en", "tok en", "stok"} <= found
    assert not {"require", "farm", "redis", "minio"} & found
    message = "FATAL: password \"p@ss+q\" rejected; token 'tok en'; raw p%40ss%2Bq; session stok"
    cleaned = scrub(message, settings)
    for secret in ("p@ss+q", "tok en", "p%40ss%2Bq", "stok"):
        assert secret not in cleaned


def test_scrub_masks_a_configured_query_secret_that_ends_in_punctuation(tmp_path: Path) -> None:
    settings = load_settings(
        {}, home=str(tmp_path), database_url="postgresql+psycopg://farm@db/farm?password=abc!)", broker_url="memory://"
    )
    cleaned = scrub(f"cannot reach {settings.database_url}: refused", settings)
    assert "abc" not in cleaned and f"?password={MASK}" in cleaned


def test_the_scrubbing_filter_cleans_messages_arguments_and_tracebacks() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(ScrubbingFilter(hidden=[SECRET]))
    log = logging.getLogger(f"test-secrets-{uuid.uuid4().hex}")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("Cannot connect to %s: %s", f"redis://h:6379/0?password={SECRET}", f"auth {SECRET} refused")
        try:
            raise RuntimeError(f"lost redis://:{SECRET}@h:6379/0")
        except RuntimeError:
            log.exception("Connection to broker lost, %d%%", 100)
    finally:
        log.removeHandler(handler)
    written = stream.getvalue()
    assert SECRET not in written
    assert f"Cannot connect to redis://h:6379/0?password={MASK}: auth {MASK} refused" in written
    assert "Connection to broker lost, 100%" in written and "RuntimeError: lost redis://:***@h" in written


# ---- the heartbeat ------------------------------------------------------------------------------------


def test_a_heartbeat_stores_no_secret(sqlite_engine: Engine) -> None:
    url = f"https://hub.example/model?token={SECRET}"
    heartbeat = fleet.Heartbeat(
        "w1#abc",
        None,
        "host",
        1,
        f"cpu (redis://:{SECRET}@h)",
        None,
        {"models": [url], "adapters": [(url, "x")], "caches": {"hits": 1, url: 2}},
        0,
        0.0,
        datetime.now(UTC),
    )
    with sqlite_engine.begin() as conn:
        fleet.beat(conn, fleet.scrubbed(heartbeat, [SECRET]))
        fleet.beat(conn, heartbeat)  # beat scrubs URL secrets itself, whoever built the heartbeat
        row = conn.execute(text("SELECT * FROM workers")).one()
    stored = json.dumps([str(value) for value in row])
    assert SECRET not in stored
    assert row.name == "w1#abc", "the identity is kept: leases and routing match it"
    assert json.loads(row.loaded)["models"] == [f"https://hub.example/model?token={MASK}"]


# ---- the broker URL: kombu's form, and a URL kombu cannot use ------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected", "password"),
    [
        ("redis://127.0.0.1:6379/0?password=s3cret-q", "redis://:s3cret-q@127.0.0.1:6379/0", "s3cret-q"),
        ("redis://u@h:1/0?password=p%40w%2B&ssl_cert_reqs=none", "redis://u:p%40w%2B@h:1/0?ssl_cert_reqs=none", "p@w+"),
        ("amqp://h:5672//?username=g&password=pw-9", "amqp://g:pw-9@h:5672//", "pw-9"),
        ("redis://:same@h/0?password=same", "redis://:same@h/0", "same"),
        ("redis://:pw-8@h/0", "redis://:pw-8@h/0", "pw-8"),
        ("sqla+postgresql://u@h/db?password=x", "sqla+postgresql://u@h/db?password=x", None),  # libpq reads it
    ],
)
def test_kombu_url_moves_query_credentials_into_the_userinfo(url: str, expected: str, password: str | None) -> None:
    assert kombu_url(url) == expected
    if password is not None:
        connection = Connection(expected)
        assert connection.password == password
        assert password not in connection.as_uri()


@pytest.mark.parametrize("url", ["redis://:one@h/0?password=two", "redis://h/0?password=one&password=two"])
def test_kombu_url_refuses_two_different_passwords_without_printing_them(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        kombu_url(url)
    assert "one" not in str(caught.value) and "two" not in str(caught.value)


def test_a_broker_url_kombu_cannot_parse_is_a_plain_config_error(tmp_path: Path) -> None:
    settings = load_settings(
        {}, home=str(tmp_path), broker_url=f"redis://127.0.0.1:6379/0?socket_timeout=3&password={SECRET}"
    )
    with pytest.raises(ConfigError, match="cannot be used by kombu") as caught:
        make_celery(settings)
    assert SECRET not in str(caught.value)


# ---- farm config, farm doctor, cannot reach the job database -----------------------------------------


def _secret_urls(redis_port: int, pg_port: int) -> dict[str, str]:
    return {
        "FARM_DATABASE_URL": f"postgresql+psycopg://farm@127.0.0.1:{pg_port}/farm?password={SECRET}-db",
        "FARM_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0?password={SECRET}-broker",
        "FARM_STORAGE_URL": f"s3://no-such-bucket/renders?token={SECRET}-storage",
        "FARM_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}/?X-Amz-Security-Token={SECRET}-endpoint",
    }


def test_config_prints_no_query_secret(tmp_path: Path) -> None:
    result = run_farm(["config"], farm_env(FARM_HOME=str(tmp_path), **_secret_urls(6379, 5432)))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert SECRET not in output
    assert f"database_url = postgresql+psycopg://farm@127.0.0.1:5432/farm?password={MASK}" in output
    assert f"broker_url = redis://127.0.0.1:6379/0?password={MASK}" in output
    assert f"storage_url = s3://no-such-bucket/renders?token={MASK}" in output
    assert f"X-Amz-Security-Token={MASK}" in output


def test_doctor_prints_no_query_secret(tmp_path: Path) -> None:
    redis_port, pg_port = free_port(), free_port()
    env = farm_env(FARM_HOME=str(tmp_path), AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="aws-Secret-value")
    env.update(_secret_urls(redis_port, pg_port))
    result = run_farm(["doctor"], env, timeout_s=120)
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert SECRET not in output and "aws-Secret-value" not in output
    assert f"redis://127.0.0.1:{redis_port}/0?password={MASK}" in output
    assert f"postgresql+psycopg://farm@127.0.0.1:{pg_port}/farm?password={MASK}" in output
    assert "Traceback" not in output


def test_an_unreachable_database_with_a_query_password_is_a_plain_error_without_it(tmp_path: Path) -> None:
    port = free_port()
    url = f"postgresql+psycopg://farm@127.0.0.1:{port}/farm?password={SECRET}"
    result = run_farm(["status"], farm_env(FARM_HOME=str(tmp_path), FARM_DATABASE_URL=url))
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "cannot reach the job database" in result.stderr
    assert f"127.0.0.1:{port}/farm?password={MASK}" in result.stderr
    assert "Traceback" not in output and SECRET not in output


# ---- PostgreSQL: the password as a query parameter works ---------------------------------------------


class PasswordAskingServer:
    """Speaks just enough of PostgreSQL's protocol to ask for a cleartext password, record it, and refuse.

    Real libpq talks to it over TCP, so what it records is what libpq sends to a server that checks passwords.
    """

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self.passwords: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._sock.close()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError, struct.error):
                self._handle(conn)

    def _handle(self, conn: socket.socket) -> None:
        while True:  # SSLRequest / GSSENCRequest are answered "N" (not supported), then the startup follows
            (length,) = struct.unpack("!i", _read(conn, 4))
            (code,) = struct.unpack("!i", _read(conn, length - 4)[:4])
            if code not in (80877103, 80877104):
                break
            conn.sendall(b"N")
        conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
        if _read(conn, 1) != b"p":
            return
        (length,) = struct.unpack("!i", _read(conn, 4))
        self.passwords.append(_read(conn, length - 4).rstrip(b"\0").decode())
        fields = b'SFATAL\0VFATAL\0C28P01\0Mpassword authentication failed for user "farm"\0\0'
        conn.sendall(b"E" + struct.pack("!i", 4 + len(fields)) + fields)


def _read(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise OSError("closed")
        data += chunk
    return data


def test_libpq_sends_the_query_password_to_a_server_that_asks_for_one() -> None:
    server = PasswordAskingServer()
    try:
        url = f"postgresql://farm@127.0.0.1:{server.port}/farm?password={SECRET}%2B%40&connect_timeout=5"
        engine = make_engine(url)
        with pytest.raises(FarmError) as caught:
            ensure_schema(engine, auto_upgrade=False)
        engine.dispose()
    finally:
        server.close()
    assert server.passwords and set(server.passwords) == {f"{SECRET}+@"}
    message = str(caught.value)
    assert "cannot reach the job database" in message and "password authentication failed" in message
    assert SECRET not in message and f"password={MASK}" in message


@pytest.mark.integration
def test_postgresql_connects_with_the_password_as_a_query_parameter(pg_url: str) -> None:
    """The shared server trusts 127.0.0.1 (pg_hba: trust), so it accepts any password; this proves the URL is
    accepted end to end and that libpq holds the query's password (the listener above proves it is sent)."""
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(pg_url)
    role = f"farm_secret_{uuid.uuid4().hex[:8]}"
    password = f"{SECRET}+@/x"
    conninfo = f"host={admin.host} port={admin.port or 5432} user={admin.username} dbname={admin.database}"
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{password}'")
        conn.execute(f"GRANT SELECT ON alembic_version TO {role}")
    try:
        query = "%2B%40%2Fx"
        url = f"postgresql://{role}@{admin.host}:{admin.port or 5432}/{admin.database}?password={SECRET}{query}"
        engine = make_engine(url)
        try:
            ensure_schema(engine, auto_upgrade=False)  # connects, and finds the schema current
            with engine.connect() as conn:
                assert conn.execute(text("SELECT current_user")).scalar() == role
                assert conn.connection.dbapi_connection.info.password == password  # type: ignore[union-attr]
        finally:
            engine.dispose()
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f"REVOKE ALL ON alembic_version FROM {role}")
            conn.execute(f"DROP ROLE {role}")


# ---- Redis: submit and a worker with the password as a query parameter -------------------------------

REDIS_PASSWORD = f"{SECRET}+@/x"
REDIS_QUERY = "s3cret-q%2B%40%2Fx"  # REDIS_PASSWORD, percent-encoded for a query string


@pytest.fixture()
def private_redis(tmp_path: Path) -> Iterator[int]:
    """A redis-server of this test's own on a free port, which refuses clients without REDIS_PASSWORD."""
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            REDIS_PASSWORD,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port, password=REDIS_PASSWORD, socket_connect_timeout=1)
    try:
        wait_until(lambda: _pings(client), timeout_s=20, what="the private redis-server")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _pings(client: object) -> bool:
    import redis

    try:
        return bool(client.ping())  # type: ignore[attr-defined]
    except redis.RedisError:
        return False


def test_submit_with_a_query_password_broker_records_and_dispatches(
    tmp_path: Path, private_redis: int, queue_name: str
) -> None:
    import redis

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\na cat\n", encoding="utf-8")
    env = farm_env(
        FARM_HOME=str(tmp_path / "home"),
        FARM_QUEUE=queue_name,
        FARM_BROKER_URL=f"redis://127.0.0.1:{private_redis}/0?password={REDIS_QUERY}",
    )
    result = run_farm(["submit", str(prompts), "--dataset", "secret", "--dispatch"], env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "2 new jobs" in output and "dispatched 2 jobs" in output
    assert "Traceback" not in output and "s3cret" not in output
    client = redis.Redis(host="127.0.0.1", port=private_redis, password=REDIS_PASSWORD)
    assert client.keys(f"{queue_name}*"), "the tasks are on the password-protected Redis"

    wrong = dict(env, FARM_BROKER_URL=f"redis://127.0.0.1:{private_redis}/0?password=wrong-{SECRET}")
    prompts.write_text("a whale\n", encoding="utf-8")
    refused = run_farm(["submit", str(prompts), "--dataset", "secret", "--dispatch"], wrong)
    output = refused.stdout + refused.stderr
    assert refused.returncode == 3, output
    assert "1 new jobs" in output and f"redis://127.0.0.1:{private_redis}/0?password={MASK}" in refused.stderr
    assert "unreachable" in refused.stderr and "nothing is lost" in refused.stderr
    assert "Traceback" not in output and SECRET not in output


def test_a_worker_logs_no_secret_from_celery_or_kombu(tmp_path: Path, private_redis: int, queue_name: str) -> None:
    """Banner, "Connected to", "Connection to broker lost" (with its traceback) and the "Cannot connect to"
    retries, all from Celery and kombu themselves, with the broker password given as a query parameter."""
    home = tmp_path / "home"
    env = farm_env(
        FARM_HOME=str(home),
        FARM_QUEUE=queue_name,
        FARM_BROKER_URL=f"redis://127.0.0.1:{private_redis}/0?password={REDIS_QUERY}",
        FARM_DEVICE="cpu",
    )
    worker = Worker(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: " ready." in worker.log(), timeout_s=120, what="the worker to connect", worker=worker)
        wait_until(lambda: bool(_worker_rows(home)), timeout_s=60, what="the first heartbeat", worker=worker)
        # The broker goes away: kombu logs the lost connection, then retries.
        subprocess.run(
            ["redis-cli", "-p", str(private_redis), "-a", REDIS_PASSWORD, "--no-auth-warning", "shutdown", "nosave"],
            check=False,
            capture_output=True,
            timeout=10,
        )
        wait_until(lambda: "Cannot connect to" in worker.log(), timeout_s=120, what="kombu's retry line", worker=worker)
    finally:
        worker.stop()
    log = worker.log()
    assert f"transport:   redis://:{MASK}@127.0.0.1:{private_redis}/0" in log, log[-4000:]  # the banner
    assert f"Connected to redis://:{MASK}@127.0.0.1:{private_redis}/0" in log
    assert "Connection to broker lost" in log
    assert f"Cannot connect to redis://:{MASK}@127.0.0.1:{private_redis}/0" in log
    assert "s3cret" not in log and REDIS_QUERY not in log
    rows = _worker_rows(home)
    assert rows and "s3cret" not in json.dumps(rows)


def _worker_rows(home: Path) -> list[list[str]]:
    path = home / "farm.db"
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=5) as conn:
        try:
            return [[str(v) for v in row] for row in conn.execute("SELECT * FROM workers")]
        except sqlite3.OperationalError:
            return []

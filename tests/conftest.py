"""Fixtures that give real services: PostgreSQL, Redis, an S3 HTTP server, tiny real models.

Where PostgreSQL or Redis is not running, their tests skip with the reason; with CI set they fail instead.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from tests.support.s3 import S3Server

PG_ADMIN_URL = os.environ.get("FARM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("FARM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
_START_HINTS = {
    "PostgreSQL": "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
    "Redis": 'redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no',
}


def _unavailable(service: str, why: str) -> None:
    message = f"{service} is not reachable ({why}); start it with: {_START_HINTS[service]}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, at the current schema, dropped afterwards."""
    yield from _fresh_database()


@pytest.fixture()
def own_pg_url() -> Iterator[str]:
    """A PostgreSQL database of this test's own: for fleets whose reaper and dispatcher would otherwise act on
    the jobs other tests left in the session's database."""
    yield from _fresh_database()


def _fresh_database() -> Iterator[str]:
    if not _port_open("127.0.0.1", 5432):
        _unavailable("PostgreSQL", "nothing listens on 127.0.0.1:5432")
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(PG_ADMIN_URL)
    name = f"farm_test_{uuid.uuid4().hex[:10]}"
    conninfo = f"host={admin.host} port={admin.port or 5432} user={admin.username} dbname={admin.database}"
    try:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        _unavailable("PostgreSQL", str(exc).splitlines()[0])
    url = admin.set(database=name).render_as_string(hide_password=False)

    from farm.store.engine import make_engine, upgrade

    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture()
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """A real SQLite job store under tmp_path, upgraded to the current schema by alembic."""
    from farm.store.engine import ensure_schema, make_engine

    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The local Redis; tests isolate themselves with their own queue names."""
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.exceptions.RedisError as exc:
        _unavailable("Redis", str(exc))
    return REDIS_URL


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server on a free loopback port, reached by boto3 over HTTP."""
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture()
def s3_bucket(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket, with credentials for it in the environment as AWS_* variables."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "farm-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "farm-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = f"farm-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight PixArt pipeline folder, built offline once per session."""
    from models.tiny import make_tiny

    return make_tiny(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture()
def queue_name() -> str:
    """A broker queue of this test's own, so tests never consume each other's messages."""
    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture(autouse=True)
def _clean_farm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests build their settings explicitly; FARM_* variables of the shell must not leak in."""
    for key in list(os.environ):
        if key.startswith("FARM_") and not key.startswith("FARM_TEST_"):
            monkeypatch.delenv(key)

"""The chaos-test harness works against real servers: a Redis that forgets on restart, a proxy that takes
PostgreSQL or S3 down on demand, event parsing, and a fleet that refuses local state."""

from __future__ import annotations

import io
import os
import shutil
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import boto3
import psycopg
import pytest
import redis
import urllib3
from botocore.config import Config
from botocore.exceptions import ClientError

from tests.support.chaos import Event, Fleet, RedisServer, ToggleProxy, in_flight, read_events
from tests.support.s3 import S3Server, free_port

PG_HOST, PG_PORT = "127.0.0.1", 5432


def _unavailable(message: str) -> None:
    """As tests/conftest.py does: a missing service skips the test, but fails it under CI."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture()
def pg_reachable() -> None:
    """The shared PostgreSQL answers a direct connection (else skip, or fail under CI)."""
    try:
        with psycopg.connect(f"postgresql://postgres@{PG_HOST}:{PG_PORT}/postgres", connect_timeout=2) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        _unavailable(f"PostgreSQL is not reachable on {PG_HOST}:{PG_PORT} ({str(exc).splitlines()[0]})")


def _pg(port: int) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", connect_timeout=3, autocommit=True)


def test_redis_restart_loses_queued_items_and_keeps_its_port(tmp_path: Path) -> None:
    if shutil.which("redis-server") is None:
        _unavailable("redis-server is not on PATH")
    with RedisServer(tmp_path / "redis") as server:
        client = redis.Redis.from_url(server.url, socket_timeout=2)
        assert client.config_get("save") == {"save": ""}
        assert client.config_get("appendonly") == {"appendonly": "no"}
        client.rpush("render", "job-1")
        assert client.llen("render") == 1
        port, pid = server.port, server.pid

        server.restart()

        assert server.port == port
        assert server.pid != pid
        assert server.url == f"redis://127.0.0.1:{port}/0"
        fresh = redis.Redis.from_url(server.url, socket_timeout=2)
        assert fresh.ping()
        assert fresh.llen("render") == 0  # nothing persisted: the queued message is gone
        fresh.close()
        client.close()
    assert not server.ping()
    assert not list((tmp_path / "redis").glob("*.rdb")) and not list((tmp_path / "redis").glob("*.aof"))


@pytest.mark.usefixtures("pg_reachable")
def test_toggle_proxy_takes_postgres_down_and_back() -> None:
    with ToggleProxy(PG_HOST, PG_PORT) as proxy:
        conn = _pg(proxy.port)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert proxy.open_connections == 1

        proxy.go_down()
        started = time.monotonic()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")  # the open connection was cut: the client notices on its next query
        assert time.monotonic() - started < 2
        conn.close()
        with pytest.raises(psycopg.OperationalError):
            _pg(proxy.port)  # and a new one is dropped as soon as it is accepted
        assert proxy.refused >= 1

        proxy.pass_through()
        with _pg(proxy.port) as again:
            assert again.execute("SELECT 2").fetchone() == (2,)
        assert proxy.connections >= 3


def test_toggle_proxy_answers_503_in_front_of_s3(s3_server: S3Server) -> None:
    bucket = f"chaos-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    with ToggleProxy(s3_server.host, s3_server.port) as proxy:
        s3 = boto3.client(
            "s3",
            endpoint_url=proxy.endpoint_url,
            aws_access_key_id="test",
            aws_secret_access_key="test",
            region_name="us-east-1",
            config=Config(retries={"total_max_attempts": 1}, connect_timeout=2, read_timeout=5),
        )
        s3.put_object(Bucket=bucket, Key="a", Body=b"first")

        proxy.answer_503()
        for call in (
            lambda: s3.put_object(Bucket=bucket, Key="b", Body=b"bytes body"),
            lambda: s3.put_object(Bucket=bucket, Key="c", Body=io.BytesIO(b"file body")),  # Expect: 100-continue
            lambda: s3.get_object(Bucket=bucket, Key="a"),
        ):
            with pytest.raises(ClientError) as caught:
                call()
            assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
            assert caught.value.response["Error"]["Code"] == "SlowDown"
        assert proxy.injected_503 == 3

        proxy.pass_through()
        assert s3.get_object(Bucket=bucket, Key="a")["Body"].read() == b"first"
        s3.put_object(Bucket=bucket, Key="b", Body=b"second")
        assert s3_server.client().get_object(Bucket=bucket, Key="b")["Body"].read() == b"second"
        assert s3_server.client().list_objects_v2(Bucket=bucket)["KeyCount"] == 2  # no 503'd write got through


class _KeepAlive(BaseHTTPRequestHandler):
    """A real HTTP/1.1 server that keeps connections open, as S3 does (moto's server closes after each response)."""

    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_toggle_proxy_503_cuts_pooled_keep_alive_connections() -> None:
    """botocore's pool (urllib3, no retries) must meet the 503 on its next request, not an old open connection."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _KeepAlive)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with ToggleProxy("127.0.0.1", server.server_address[1]) as proxy:
            pool = urllib3.HTTPConnectionPool("127.0.0.1", proxy.port, maxsize=1, retries=False, timeout=5)
            assert pool.request("GET", "/").data == b"ok"
            assert pool.request("GET", "/").data == b"ok"
            assert proxy.connections == 1 and proxy.open_connections == 1  # one connection, kept alive

            proxy.answer_503()
            response = pool.request("GET", "/")
            assert response.status == 503 and b"<Code>SlowDown</Code>" in response.data
            assert proxy.connections == 2 and proxy.injected_503 == 1

            proxy.pass_through()
            assert pool.request("GET", "/").data == b"ok"
            pool.close()
    finally:
        server.shutdown()
        server.server_close()


def test_toggle_proxy_down_in_front_of_nothing_listening() -> None:
    """A target that is itself down: the client sees its connection closed, and the proxy stops cleanly."""
    proxy = ToggleProxy("127.0.0.1", free_port()).start()
    try:
        with pytest.raises(psycopg.OperationalError):
            _pg(proxy.port)
        assert proxy.connections >= 1 and proxy.open_connections == 0
    finally:
        proxy.stop()
    ToggleProxy("127.0.0.1", free_port()).stop()  # never started: stop() must not hang


JOB_A, JOB_B, JOB_C = "a" * 32, "0123456789abcdef" * 2, "f" * 32


def _line(event: str, job: str, seq: int, worker: str) -> str:
    return f"[2025-01-01 12:00:00,000: INFO/MainProcess] render: event={event} job={job} seq={seq} worker={worker}\n"


def test_read_events_and_in_flight(tmp_path: Path) -> None:
    first, second = tmp_path / "w1-1.log", tmp_path / "w1-2.log"
    first.write_text(
        "celery@w1 ready.\n"
        + _line("claimed", JOB_A, 1, "w1#0001")
        + _line("render_start", JOB_A, 1, "w1#0001")
        + _line("render_end", JOB_A, 1, "w1#0001")
        + _line("upload_start", JOB_A, 1, "w1#0001")
        + "some other line mentioning event=claimed without the rest\n"
        + _line("claimed", JOB_B, 2, "w1#0001")
        + _line("render_start", JOB_B, 2, "w1#0001")
        # killed here: JOB_A was uploading, JOB_B rendering
    )
    second.write_text(
        _line("claimed", JOB_A, 3, "w1#0002")
        + _line("render_start", JOB_A, 3, "w1#0002")
        + _line("render_end", JOB_A, 3, "w1#0002")
        + _line("upload_start", JOB_A, 3, "w1#0002")
        + _line("upload_end", JOB_A, 3, "w1#0002")
        + _line("recorded", JOB_A, 3, "w1#0002")
        + _line("claimed", JOB_C, 4, "w1#0002")
        + _line("render_start", JOB_C, 4, "w1#0002")
        + _line("released", JOB_C, 4, "w1#0002")  # released mid-render: no longer in flight
        + _line("render_start", JOB_B, 2, "w1#0002")  # a start in another log does not close w1-1's
        + _line("render_end", JOB_B, 2, "w1#0002")
        + "[2025-01-01 12:00:01,000: INFO/MainProcess] render: event=upload_start job="  # still being written
    )

    events = read_events([first, second])

    assert [e.name for e in events[:4]] == ["claimed", "render_start", "render_end", "upload_start"]
    assert events[0] == Event("claimed", JOB_A, 1, "w1#0001", 2, first)
    assert [e.log for e in events].count(first) == 6 and [e.log for e in events].count(second) == 11
    assert events[-1] == Event("render_end", JOB_B, 2, "w1#0002", 11, second)
    assert in_flight(events, "render") == {(JOB_B, 2)}
    assert in_flight(events, "upload") == {(JOB_A, 1)}
    assert in_flight([e for e in events if e.log == second], "render") == set()
    with pytest.raises(ValueError, match="phase"):
        in_flight(events, "claim")

    bad = tmp_path / "bad.log"
    bad.write_text(_line("renderd", JOB_A, 1, "w1#0003"))
    with pytest.raises(ValueError, match="renderd"):
        read_events([bad])
    assert read_events([tmp_path / "not-written-yet.log"]) == []


def test_fleet_refuses_an_existing_farm_home(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    with pytest.raises(ValueError, match="exists"):
        Fleet({"FARM_HOME": str(home)}, tmp_path / "fleet")
    with pytest.raises(ValueError, match="absolute"):
        Fleet({"FARM_HOME": "relative/home"}, tmp_path / "fleet")

    fleet = Fleet({"PATH": os.environ.get("PATH", "")}, tmp_path / "fleet")
    assert fleet.env["FARM_HOME"] == str(tmp_path / "fleet" / "no-such-home")
    assert not Path(fleet.env["FARM_HOME"]).exists()
    assert fleet.workers() == [] and fleet.alive() == []
    fleet.stop_all(timeout_s=1)  # nothing started: nothing to stop

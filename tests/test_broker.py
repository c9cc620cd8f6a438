"""The Celery configuration: JSON only, settings for long GPU tasks, per-transport options, TLS."""

from __future__ import annotations

import ssl
from pathlib import Path

from farm.dispatch.broker import celery_config, make_celery
from farm.settings import load_settings


def _settings(tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    return load_settings({}, home=str(tmp_path), **kw)


def test_only_json_is_accepted_and_long_task_settings_are_on(tmp_path: Path) -> None:
    conf = celery_config(_settings(tmp_path))
    assert conf["task_serializer"] == "json" and conf["accept_content"] == ["json"]
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
    assert conf["worker_prefetch_multiplier"] == 1
    app = make_celery(_settings(tmp_path))
    assert "pickle" not in app.conf.accept_content


def test_redis_visibility_timeout_exceeds_the_lease(tmp_path: Path) -> None:
    conf = celery_config(_settings(tmp_path, broker_url="redis://127.0.0.1:6379/0", lease_s=5000))
    assert conf["broker_transport_options"]["visibility_timeout"] > 5000


def test_sqlite_broker_gets_no_redis_only_options(tmp_path: Path) -> None:
    conf = celery_config(_settings(tmp_path))
    assert conf["broker_url"].startswith("sqlite:///")
    assert conf["broker_transport"] == "farm.dispatch.broker:SQLBrokerTransport"
    assert "visibility_timeout" not in conf["broker_transport_options"]
    with make_celery(_settings(tmp_path)).connection_for_write() as conn:
        assert conn.transport.polling_interval == 0.1  # not kombu's 1 s between two tasks


def test_rediss_verifies_certificates_by_default(tmp_path: Path) -> None:
    conf = celery_config(_settings(tmp_path, broker_url="rediss://:pw@redis.example:6380/0"))
    assert conf["broker_use_ssl"] == {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    explicit = celery_config(_settings(tmp_path, broker_url="rediss://h:6380/0?ssl_cert_reqs=CERT_NONE"))
    assert explicit["broker_use_ssl"] is None
    app = make_celery(_settings(tmp_path, broker_url="rediss://:pw@redis.example:6380/0"))
    with app.connection_for_write() as conn:  # builds the transport without connecting
        assert conn.transport_cls == "rediss"
        assert "pw" not in conn.as_uri()

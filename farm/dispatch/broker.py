"""The Celery configuration shared by the dispatcher and the workers. Messages carry job ids only, as JSON."""

from __future__ import annotations

import os
import ssl
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import quote, unquote, unquote_plus, urlsplit

from celery import Celery
from kombu.transport import sqlalchemy as sqla_transport
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError

from farm.errors import ConfigError
from farm.secrets import redact, scrub
from farm.settings import Settings
from farm.store.engine import sqlite_file_lock

RENDER_TASK = "farm.render"


class SQLBrokerChannel(sqla_transport.Channel):
    """kombu's SQLAlchemy channel, safe for processes that open a fresh broker database at the same moment.

    kombu creates its tables on first use (look, then CREATE TABLE), and a queue's row the same way (look, then
    INSERT): two `farm submit` processes started together on a new FARM_HOME both looked, and one of them died
    with `table kombu_message already exists` or `UNIQUE constraint failed: kombu_queue.name`.
    """

    def _open(self) -> Any:
        url = self.connection.client.hostname
        if url in self._engines:  # this process created (or found) the tables already
            return super()._open()
        with _creation_lock(url):
            return super()._open()

    def _get_or_create(self, queue: str) -> Any:
        try:
            return super()._get_or_create(queue)
        except IntegrityError:
            # Another process inserted this queue's row between our look and our insert: use theirs.
            self.session.rollback()
            return super()._get_or_create(queue)


def _creation_lock(url: str) -> AbstractContextManager[None]:
    """An exclusive file lock beside a SQLite broker database while kombu creates its tables, as the job store's
    first users take one (other databases: no lock)."""
    parsed = make_url(url)
    database = parsed.database if parsed.get_backend_name() == "sqlite" else None
    if database and database != ":memory:" and not os.path.isdir(os.path.dirname(os.path.abspath(database))):
        database = None  # nothing to lock beside (a missing folder fails in kombu's words, as a broker that is away)
    return sqlite_file_lock(database)


class SQLBrokerTransport(sqla_transport.Transport):
    """kombu's SQLAlchemy transport, polling every 0.1 s instead of every second, with SQLBrokerChannel.

    A solo worker asks for its next message only after acknowledging the last one, so the default 1 s poll
    stood between every two tasks. kombu hands transport options to create_engine, so the interval cannot be
    passed as one; it is set here instead.
    """

    Channel = SQLBrokerChannel
    polling_interval = 0.1


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings that matter for long GPU tasks (docs/ARCHITECTURE.md): JSON only, late acks, prefetch 1."""
    broker_url, transport = kombu_url(settings.broker_url), None
    if broker_url.startswith("sqla+"):
        broker_url, transport = broker_url[len("sqla+") :], f"{__name__}:SQLBrokerTransport"
    return {
        "broker_url": broker_url,
        "broker_transport": transport,
        # Pickle would let anyone who can write to the broker run code in a worker.
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_serializer": "json",
        "task_ignore_result": True,
        "result_backend": None,
        "task_default_queue": settings.queue,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "broker_transport_options": transport_options(settings),
        "broker_use_ssl": _broker_tls(settings.broker_url),
        "worker_hijack_root_logger": False,
        # Task events (sent, received, started, succeeded, failed) are what Flower shows; cheap next to a render.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "enable_utc": True,
    }


# Query parameters kombu cannot take (it passes the query on as keyword arguments next to its own userid and
# password), though redis-py and libpq accept them: they move into the URL's userinfo instead.
_TO_USERINFO = ("username", "password")


def kombu_url(url: str) -> str:
    """The broker URL as kombu understands it: `redis://host:6379/0?password=pw` → `redis://:pw@host:6379/0`.

    kombu turns a URL's query into keyword arguments beside the userinfo's user and password, so a `password`
    (or `username`) query parameter collides with them and every connection attempt fails with a TypeError.
    The value moves into the userinfo, where kombu, Celery's banner and its retry logs mask it. Other query
    parameters and the URL's spelling stay as they were. `sqla+` URLs are left alone: SQLAlchemy hands query
    parameters to the database driver, and libpq accepts `?password=`. The result holds the password in clear:
    it is for kombu only, never for printing (print settings.broker_url through farm.secrets.redact).
    """
    if url.startswith("sqla+") or "?" not in url:
        return url
    if ";" in url:  # failover: kombu takes `url1;url2`, each one parsed on its own
        return ";".join(kombu_url(alternate) for alternate in url.split(";"))
    parts = urlsplit(url)
    moved: dict[str, str] = {}
    kept: list[str] = []
    for pair in parts.query.split("&"):
        name, _eq, value = pair.partition("=")
        key = unquote_plus(name)
        if key not in _TO_USERINFO:
            kept.append(pair)
        elif moved.setdefault(key, unquote_plus(value)) != unquote_plus(value):
            raise ConfigError(f"broker_url {redact(url)} gives the query parameter {key!r} twice, differently")
    if not moved:
        return url
    userinfo, at, hostport = parts.netloc.rpartition("@")
    user, colon, password = userinfo.partition(":")
    given = {"username": unquote(user) if at else "", "password": unquote(password) if colon else ""}
    for key, value in moved.items():
        if given[key] and value and given[key] != value:
            raise ConfigError(f"broker_url {redact(url)} gives a {key} both before the host and as ?{key}=")
        given[key] = given[key] or value
    netloc = quote(given["username"], safe="")
    if given["password"]:
        netloc += ":" + quote(given["password"], safe="")
    netloc = f"{netloc}@{hostport}" if netloc else hostport
    query = "&".join(kept)
    return (
        f"{parts.scheme}://{netloc}{parts.path}"
        + (f"?{query}" if query else "")
        + (f"#{parts.fragment}" if parts.fragment else "")
    )


def transport_options(settings: Settings) -> dict[str, Any]:
    """Per-transport options: each kombu transport accepts its own keys and rejects the others."""
    scheme = settings.broker_url.split("://", 1)[0]
    if scheme in ("redis", "rediss"):
        # Redis redelivers an unacknowledged message after this; keep it above the longest lease,
        # and the guarded claim makes a redelivery render nothing twice.
        # Ten priority levels, served strictly in order (kombu's Redis transport: 0 is served first).
        return {
            "visibility_timeout": max(3600, settings.lease_s * 2),
            "priority_steps": list(range(10)),
            "queue_order_strategy": "priority",
        }
    if scheme.startswith("sqla+"):
        # kombu hands these to create_engine: wait on SQLite's lock instead of failing.
        return {"connect_args": {"timeout": 30}} if "sqlite" in scheme else {}
    return {}


def _broker_tls(url: str) -> dict[str, Any] | None:
    """rediss:// verifies the server's certificate unless the URL says otherwise (ssl_cert_reqs=...)."""
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        return {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    return None


def make_celery(settings: Settings, name: str = "farm") -> Celery:
    """A Celery app bound to the configured broker; the workers add the task body to it."""
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    try:
        # Builds kombu's connection object (no network): a URL kombu cannot parse fails here, in plain words,
        # not as a traceback from the first publish after `farm submit` recorded its jobs.
        app.connection_for_write().release()
    except (TypeError, ValueError, KeyError) as exc:
        reason = f"{exc.__class__.__name__}: {exc}"
        raise ConfigError(
            scrub(f"broker_url {redact(settings.broker_url)} cannot be used by kombu ({reason})", settings)
        ) from None
    return app

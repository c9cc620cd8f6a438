"""The Celery configuration shared by the dispatcher and the workers. Messages carry job ids only, as JSON."""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery
from kombu.transport import sqlalchemy as sqla_transport

from farm.settings import Settings

RENDER_TASK = "farm.render"


class SQLBrokerTransport(sqla_transport.Transport):
    """kombu's SQLAlchemy transport, polling every 0.1 s instead of every second.

    A solo worker asks for its next message only after acknowledging the last one, so the default 1 s poll
    stood between every two tasks. kombu hands transport options to create_engine, so the interval cannot be
    passed as one; it is set here instead.
    """

    polling_interval = 0.1


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings that matter for long GPU tasks (docs/ARCHITECTURE.md): JSON only, late acks, prefetch 1."""
    broker_url, transport = settings.broker_url, None
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
    return app

"""Prometheus metrics of one worker process: images rendered, render time, queue wait, cache use and errors.

The metrics live in a registry of their own (not prometheus_client's global one), so tests and other code
that use the global registry never collide with ours. Counting is always on and costs a few additions per
batch; only the HTTP endpoint is optional (`farm worker --metrics-port PORT`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import select
from sqlalchemy.engine import Connection

from farm.store.schema import Job, utcnow

log = logging.getLogger("farm.worker")

# LCM renders take a fraction of a second (tiny model, CPU) to tens of seconds (1024 px on a small GPU).
RENDER_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Waiting in the queue runs from seconds to hours on a busy farm.
QUEUE_BUCKETS_S = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
ERROR_KINDS = ("render", "upload")

CacheStats = Callable[[], Mapping[str, Any]]


class _CacheCollector(Collector):
    """Reads the worker's cache counters at scrape time, so the caches need no metrics code of their own."""

    def __init__(self) -> None:
        self.source: CacheStats | None = None

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        if self.source is None:
            return
        hits = CounterMetricFamily("cache_hits", "Lookups served from a worker cache.", labels=["cache"])
        misses = CounterMetricFamily("cache_misses", "Lookups that had to load or compute.", labels=["cache"])
        entries = GaugeMetricFamily("cache_entries", "Entries held in a worker cache now.", labels=["cache"])
        for name, stats in sorted(self.source().items()):
            if not isinstance(stats, Mapping):
                continue  # plain counters such as t5_loads
            hits.add_metric([name], float(stats.get("hits", 0)))
            misses.add_metric([name], float(stats.get("misses", 0)))
            entries.add_metric([name], float(stats.get("entries", 0)))
        yield from (hits, misses, entries)


class WorkerMetrics:
    """The metrics of one worker process; the worker code feeds them through the observe_* methods."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.images_rendered = Counter(
            "images_rendered", "Images rendered by this worker (before upload).", registry=self.registry
        )
        self.render_seconds = Histogram(
            "render_seconds",
            "Pipeline time per image, in seconds.",
            buckets=RENDER_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_wait_seconds = Histogram(
            "queue_wait_seconds",
            "Time from a job's creation to its claim by this worker, in seconds.",
            buckets=QUEUE_BUCKETS_S,
            registry=self.registry,
        )
        self.errors = Counter("errors", "Failed images, by kind (render, upload).", ["kind"], registry=self.registry)
        for kind in ERROR_KINDS:
            self.errors.labels(kind=kind)  # present at 0 from the start, so rates work before the first error
        self._caches = _CacheCollector()
        self.registry.register(self._caches)
        self.serving_port: int | None = None
        self._lock = threading.Lock()

    def observe_render(self, images: int, seconds_per_image: float) -> None:
        """A batch of `images` rendered in one pipeline call."""
        self.images_rendered.inc(images)
        for _ in range(images):
            self.render_seconds.observe(seconds_per_image)

    def observe_queue_wait(self, conn: Connection, job_ids: Sequence[str], *, now: datetime | None = None) -> None:
        """Record how long the jobs just claimed waited since they were created (only while serving)."""
        if self.serving_port is None or not job_ids:
            return  # one more query per task is only worth it when someone scrapes the result
        now = now or utcnow()
        created = conn.execute(select(Job.created_at).where(Job.id.in_(list(job_ids)))).scalars().all()
        for moment in created:
            self.queue_wait_seconds.observe(max((now - moment).total_seconds(), 0.0))

    def count_errors(self, kind: str, n: int = 1) -> None:
        """`n` images failed at `kind` (render or upload)."""
        if n:
            self.errors.labels(kind=kind).inc(n)

    def track_caches(self, stats: CacheStats) -> None:
        """Report these caches (a callable returning {cache: {hits, misses, entries}}) at each scrape."""
        self._caches.source = stats

    def serve(self, port: int, addr: str = "0.0.0.0") -> int:
        """Serve /metrics on `port` (0 picks a free one) in a background thread; returns the port."""
        from prometheus_client import start_http_server

        with self._lock:
            if self.serving_port is not None:
                return self.serving_port
            server, _thread = start_http_server(port, addr=addr, registry=self.registry)
            self.serving_port = int(server.server_port)
        log.info("metrics served on http://%s:%d/metrics", addr, self.serving_port)
        return self.serving_port

    def render_text(self) -> str:
        """The exposition text a scrape would get (for tests and logs)."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry).decode("utf-8")


# One per process: a worker process runs one render loop, and its hooks all feed this object.
METRICS = WorkerMetrics()


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> int:
    """Serve this process's worker metrics on `port`; returns the port actually bound."""
    return METRICS.serve(port, addr)

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

from farm.settings import Settings
from farm.store.schema import Job, utcnow

log = logging.getLogger("farm.worker")

# LCM renders take a fraction of a second (tiny model, CPU) to tens of seconds (1024 px on a small GPU).
RENDER_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Waiting in the queue runs from seconds to hours on a busy farm.
QUEUE_BUCKETS_S = (1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 24 * 3600.0)
ERROR_KINDS = ("render", "upload")
# Score histograms: the CLIP score's 0-100 and the aesthetic predictor's 1-10 scale.
CLIP_SCORE_BUCKETS = (10.0, 15.0, 20.0, 22.5, 25.0, 27.5, 30.0, 32.5, 35.0, 40.0, 50.0)
AESTHETIC_BUCKETS = (2.0, 3.0, 4.0, 4.5, 5.0, 5.5, 6.0, 6.5, 7.0, 8.0)
SCORE_SECONDS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)

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


class _PendingCollector(Collector):
    """farm_pending_jobs{pool}: the fleet's pending jobs per pool, as the control loop's leader last counted them
    (farm/dispatch/backlog.py), read from the job store at scrape time. Every worker serves the same figures; none
    while nobody has counted lately."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, int] | None] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.source is None:
            return
        try:
            pools = self.source()
        except Exception as exc:  # the database is away: this scrape has no backlog figures
            log.debug("no backlog figures for the metrics: %s", exc)
            return
        if pools is None:
            return
        gauge = GaugeMetricFamily(
            "farm_pending_jobs",
            "Jobs waiting in the job store (not yet in the broker's window), by the pool that would take them.",
            labels=["pool"],
        )
        for pool, n in sorted(pools.items()):
            gauge.add_metric([pool], float(n))
        yield gauge


class _ThroughputCollector(Collector):
    """render_images_per_second and render_mfu of the last pipeline call (the render alone: no claim, upload or
    waiting). MFU = the call's FLOP/s (models/flops.py, from the model's config, size and steps) ÷ the device's bf16
    peak (FARM_PEAK_TFLOPS, or the GPU's data-sheet figure by name); reported only once both are known, so never on
    a CPU without FARM_PEAK_TFLOPS. Neither is reported before the first render."""

    def __init__(self) -> None:
        self.images_per_s: float | None = None
        self.flops_per_s: float | None = None
        self.peak_source: Callable[[], float | None] | None = None
        self._peak: tuple[float | None] | None = None  # resolved once, on the first render that has a FLOP count

    def peak(self) -> float | None:
        if self._peak is None:
            try:
                self._peak = (self.peak_source() if self.peak_source is not None else None,)
            except Exception as exc:  # an unknown device: no MFU, rendering goes on
                log.warning("no bf16 peak for this device, so no MFU: %s", exc)
                self._peak = (None,)
            if self._peak[0]:
                log.info("MFU measured against a bf16 peak of %.0f TFLOP/s", self._peak[0] / 1e12)
        return self._peak[0]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        if self.images_per_s is None:
            return
        yield GaugeMetricFamily(
            "render_images_per_second", "Images per second of the last pipeline call.", value=self.images_per_s
        )
        peak = self._peak[0] if self._peak is not None else None
        if self.flops_per_s is not None and peak:
            yield GaugeMetricFamily(
                "render_mfu",
                "Model FLOPs utilisation of the last pipeline call: its FLOP/s over the device's bf16 peak (0-1).",
                value=self.flops_per_s / peak,
            )


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
        self.clip_score = Histogram(
            "clip_score",
            "CLIP score of each scored image (0-100).",
            ["pool"],
            buckets=CLIP_SCORE_BUCKETS,
            registry=self.registry,
        )
        self.aesthetic_score = Histogram(
            "aesthetic_score",
            "Aesthetic score of each scored image (1-10).",
            ["pool"],
            buckets=AESTHETIC_BUCKETS,
            registry=self.registry,
        )
        self.nsfw_flagged = Counter(
            "nsfw_flagged", "Scored images the safety checker flagged.", ["pool"], registry=self.registry
        )
        self.score_seconds = Histogram(
            "score_seconds",
            "Scoring time per image (CLIP, aesthetic and safety), in seconds.",
            ["pool"],
            buckets=SCORE_SECONDS_BUCKETS,
            registry=self.registry,
        )
        self._caches = _CacheCollector()
        self.registry.register(self._caches)
        self._pending = _PendingCollector()
        self.registry.register(self._pending)
        self._throughput = _ThroughputCollector()
        self.registry.register(self._throughput)
        self.serving_port: int | None = None
        self._lock = threading.Lock()

    def observe_scores(self, pool: str, results: Sequence[Any], seconds_per_image: float) -> None:
        """One scored batch (models/scoring.py's results), under the worker's pool ("" without one)."""
        for result in results:
            self.clip_score.labels(pool=pool).observe(result.clip_score)
            if result.aesthetic is not None:
                self.aesthetic_score.labels(pool=pool).observe(result.aesthetic)
            if result.nsfw:
                self.nsfw_flagged.labels(pool=pool).inc()
            self.score_seconds.labels(pool=pool).observe(seconds_per_image)

    def observe_render(self, images: int, seconds_per_image: float, flops_per_image: float | None = None) -> None:
        """A batch of `images` rendered in one pipeline call; `flops_per_image` (models/flops.py) gives its MFU."""
        if seconds_per_image > 0:
            self._throughput.images_per_s = 1.0 / seconds_per_image
            flops = flops_per_image / seconds_per_image if flops_per_image else None
            self._throughput.flops_per_s = flops if flops is not None and self._throughput.peak() else None
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

    def track_peak(self, source: Callable[[], float | None]) -> None:
        """Where the device's bf16 peak (FLOP/s) comes from, for render_mfu; asked once, at the first render."""
        self._throughput.peak_source = source
        self._throughput._peak = None

    def track_pending(self, source: Callable[[], Mapping[str, int] | None]) -> None:
        """Report farm_pending_jobs{pool} from this callable (pool → jobs, or None when unknown) at each scrape."""
        self._pending.source = source

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


def device_peak(settings: Settings) -> float | None:
    """The bf16 peak a worker's MFU is measured against: FARM_PEAK_TFLOPS, else the GPU's figure by name."""
    from models.devices import resolve_device
    from models.flops import device_peak_flops

    return device_peak_flops(resolve_device(settings.device), settings.peak_tflops)


# One per process: a worker process runs one render loop, and its hooks all feed this object.
METRICS = WorkerMetrics()


def start_metrics_server(port: int, addr: str = "0.0.0.0") -> int:
    """Serve this process's worker metrics on `port`; returns the port actually bound."""
    return METRICS.serve(port, addr)

"""Per-process worker state: the database engine, the storage backend and the loaded pipelines."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from celery import Celery
from sqlalchemy import select
from sqlalchemy.engine import Connection, Engine

from farm.settings import Settings
from farm.storage import Storage, storage_for
from farm.store import fleet
from farm.store.engine import ensure_schema, make_engine
from farm.store.schema import Dataset, utcnow
from workers.caches import PipelineCache, RenderCaches
from workers.control import ControlLoop
from workers.heartbeat import LeaseKeeper
from workers.recording import Unrecorded, record_stored, retry_unrecorded
from workers.uploads import Uploader

log = logging.getLogger("farm.worker")


def default_worker_name() -> str:
    """host:pid, the label of a worker started without --name."""
    return f"{socket.gethostname()}:{os.getpid()}"


def new_incarnation(label: str) -> str:
    """The owner of everything one worker process claims: its label plus a random part drawn at start, so two
    workers given one --name, or a container restarted under its old name, never share ownership."""
    return f"{label}#{uuid.uuid4().hex[:8]}"


class Holdings:
    """The jobs this incarnation holds in memory, (job id, claim seq) each: claimed and not yet recorded or given
    back. Only these leases are renewed; a job the heartbeat finds no longer ours (canceled, reaped, claimed
    again) is marked lost, and its render and upload stop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._lost: set[str] = set()

    def add(self, held: list[tuple[str, int]]) -> None:
        with self._lock:
            self._held.update(held)

    def drop(self, job_ids: list[str]) -> None:
        with self._lock:
            for job_id in job_ids:
                self._held.pop(job_id, None)
                self._lost.discard(job_id)

    def snapshot(self) -> list[tuple[str, int]]:
        with self._lock:
            return list(self._held.items())

    def mark_lost(self, job_ids: set[str]) -> set[str]:
        """Mark held jobs lost; returns the ones newly marked."""
        with self._lock:
            new = {job_id for job_id in job_ids if job_id in self._held and job_id not in self._lost}
            self._lost |= new
            return new

    def is_lost(self, job_id: str) -> bool:
        with self._lock:
            return job_id in self._lost

    def __len__(self) -> int:
        with self._lock:
            return len(self._held)


@dataclass
class WorkerStats:
    """Counters since the worker started (logged, and read by tests and benchmarks)."""

    claimed: int = 0
    rendered: int = 0
    succeeded: int = 0
    retried: int = 0
    failed: int = 0
    skipped: int = 0
    lost: int = 0
    render_ms: int = 0


@dataclass
class WorkerRuntime:
    """Everything a render task needs, built once per worker process."""

    settings: Settings
    app: Celery
    name: str  # the incarnation (label#random): the owner of every claim, lease and write of this process
    engine: Engine
    storage: Storage
    caches: RenderCaches
    uploader: Uploader
    leases: LeaseKeeper
    max_batch: int
    pool: str | None = None
    stats: WorkerStats = field(default_factory=WorkerStats)
    holdings: Holdings = field(default_factory=Holdings)
    unrecorded: Unrecorded = field(default_factory=Unrecorded)
    stopping_at: float | None = None  # monotonic time of the SIGTERM that began a warm shutdown
    control: ControlLoop | None = None  # the reaper and dispatcher loop (started by the worker's Celery app)
    started_at: datetime = field(default_factory=utcnow)
    _rate_mark: tuple[float, int] = field(default_factory=lambda: (time.monotonic(), 0))
    _dataset_names: dict[int, str] = field(default_factory=dict)

    def dataset_name(self, dataset_id: int, conn: Connection | None = None) -> str:
        """A dataset's name (part of its object keys); names never change, so each is read once, at claim time
        (``conn``: the claim's transaction), so that rendering and uploading need no database."""
        if dataset_id not in self._dataset_names:
            query = select(Dataset.name).where(Dataset.id == dataset_id)
            if conn is not None:
                name = conn.execute(query).scalar_one()
            else:
                with self.engine.connect() as own:
                    name = own.execute(query).scalar_one()
            self._dataset_names[dataset_id] = str(name)
        return self._dataset_names[dataset_id]

    @property
    def pipelines(self) -> PipelineCache:
        return self.caches.pipelines

    def event(self, name: str, job_id: str, seq: int) -> None:
        """One line per step of a job's attempt, for operators (and the chaos test) to follow it."""
        log.info("event=%s job=%s seq=%d worker=%s", name, job_id, seq, self.name)

    def grace_left(self) -> float | None:
        """Seconds of the shutdown grace period left (None while not shutting down)."""
        if self.stopping_at is None:
            return None
        return self.settings.shutdown_grace_s - (time.monotonic() - self.stopping_at)

    @classmethod
    def build(
        cls,
        settings: Settings,
        app: Celery,
        name: str | None = None,
        *,
        max_batch: int | None = None,
        io_threads: int = 2,
        low_memory: bool = False,
        pool: str | None = None,
    ) -> WorkerRuntime:
        storage = storage_for(settings)
        batch = max_batch or settings.batch_size
        name = new_incarnation(name or default_worker_name())
        holdings = Holdings()

        def event(step: str, job_id: str, seq: int) -> None:
            log.info("event=%s job=%s seq=%d worker=%s", step, job_id, seq, name)

        # Two batches may wait for storage while a third renders; beyond that the render loop waits.
        uploader = Uploader(
            storage,
            threads=io_threads,
            max_in_flight=2 * batch,
            event=event,
            is_lost=holdings.is_lost,
            group_s=settings.record_group_s,
        )
        caches = RenderCaches(settings, storage, PipelineCache(settings, low_memory=low_memory))
        # The model-level steps (T5 loaded and released, pipeline moved off and onto the device), in the job
        # events' format with a detail instead of a job, so the order can be read from the worker's log.
        caches.on_event = lambda step, detail: log.info("event=%s detail=%s worker=%s", step, detail, name)
        engine = make_engine(settings.database_url)
        ensure_schema(engine, auto_upgrade=settings.embedded)  # refuses a job store newer than this code
        leases = LeaseKeeper(engine, worker=name, lease_s=settings.lease_s, holdings=holdings)
        runtime = cls(settings, app, name, engine, storage, caches, uploader, leases, batch, pool=pool)
        runtime.holdings = holdings
        uploader.event = runtime.event
        uploader.on_done = lambda done, failed: record_stored(runtime, done, failed)
        leases.describe = runtime.heartbeat
        leases.on_lost = runtime.lost
        leases.after_beat = lambda: retry_unrecorded(runtime)
        leases.start()
        return runtime

    def lost(self, job_ids: set[str]) -> None:
        """The heartbeat found these held jobs no longer ours: their attempt stops."""
        for job_id, seq in self.holdings.snapshot():
            if job_id in job_ids:
                self.event("lost", job_id, seq)

    def heartbeat(self, current_jobs: int) -> fleet.Heartbeat:
        """What `farm workers` shows: device, what is loaded, cache figures, jobs held and recent images/s."""
        now = time.monotonic()
        last_at, last_count = self._rate_mark
        rate = (self.stats.succeeded - last_count) / max(now - last_at, 1e-3)
        self._rate_mark = (now, self.stats.succeeded)
        caches = self.caches
        loaded = {
            "models": [
                f"{model}" + (f" ({quantize})" if quantize else "") for model, quantize in caches.pipelines.loaded
            ],
            "adapters": [name for name, _dtype in caches.adapters.cached_keys()],
            "caches": caches.stats(),
            "renderer": self.settings.renderer,  # "null": synthetic images, no model (models/null.py)
        }
        device, memory = _device(self.settings.device)
        heartbeat = fleet.Heartbeat(
            self.name,
            self.pool,
            socket.gethostname(),
            os.getpid(),
            device,
            memory,
            loaded,
            current_jobs,
            rate,
            self.started_at,
        )
        # Model names and descriptions may quote a configured URL: its secrets never reach the workers table.
        from farm.secrets import secrets_of

        return fleet.scrubbed(heartbeat, secrets_of(self.settings))


def _device(requested: str) -> tuple[str, int | None]:
    """The device this worker renders on, and its memory (GPU memory, or the machine's RAM on a CPU)."""
    from models.devices import resolve_device

    device = resolve_device(requested)
    if device.startswith("cuda"):
        import torch

        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        return f"{device} ({props.name})", int(props.total_memory)
    return "cpu", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

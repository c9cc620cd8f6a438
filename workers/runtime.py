"""Per-process worker state: the database engine, the storage backend and the loaded pipelines."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import datetime

from celery import Celery
from sqlalchemy import select
from sqlalchemy.engine import Engine

from farm.settings import Settings
from farm.storage import Storage, storage_for
from farm.store import fleet
from farm.store.engine import make_engine
from farm.store.schema import Dataset, utcnow
from workers.caches import PipelineCache, RenderCaches
from workers.heartbeat import LeaseKeeper
from workers.uploads import Uploader

log = logging.getLogger("farm.worker")


def default_worker_name() -> str:
    """host:pid: unique among live workers, which the guarded claim relies on."""
    return f"{socket.gethostname()}:{os.getpid()}"


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
    name: str
    engine: Engine
    storage: Storage
    caches: RenderCaches
    uploader: Uploader
    leases: LeaseKeeper
    max_batch: int
    pool: str | None = None
    stats: WorkerStats = field(default_factory=WorkerStats)
    started_at: datetime = field(default_factory=utcnow)
    _rate_mark: tuple[float, int] = field(default_factory=lambda: (time.monotonic(), 0))
    _dataset_names: dict[int, str] = field(default_factory=dict)

    def dataset_name(self, dataset_id: int) -> str:
        """A dataset's name (part of its object keys); names never change, so each is read once."""
        if dataset_id not in self._dataset_names:
            with self.engine.connect() as conn:
                name = conn.execute(select(Dataset.name).where(Dataset.id == dataset_id)).scalar_one()
            self._dataset_names[dataset_id] = str(name)
        return self._dataset_names[dataset_id]

    @property
    def pipelines(self) -> PipelineCache:
        return self.caches.pipelines

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
        # Two batches may wait for storage while a third renders; beyond that the render loop waits.
        uploader = Uploader(storage, threads=io_threads, max_in_flight=2 * batch)
        caches = RenderCaches(settings, storage, PipelineCache(settings, low_memory=low_memory))
        name = name or default_worker_name()
        engine = make_engine(settings.database_url)
        leases = LeaseKeeper(engine, worker=name, lease_s=settings.lease_s)
        runtime = cls(settings, app, name, engine, storage, caches, uploader, leases, batch, pool=pool)
        leases.describe = runtime.heartbeat
        leases.start()
        return runtime

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
        }
        device, memory = _device(self.settings.device)
        return fleet.Heartbeat(
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

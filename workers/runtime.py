"""Per-process worker state: the database engine, the storage backend and the loaded pipelines."""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from sqlalchemy import select
from sqlalchemy.engine import Engine

from farm.db import make_engine
from farm.profiles import model_source
from farm.schema import Dataset
from farm.settings import Settings
from farm.storage import Storage, open_storage
from workers.uploads import Uploader

log = logging.getLogger("farm.worker")


def default_worker_name() -> str:
    """host:pid: unique among live workers, which the guarded claim relies on."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class PipelineCache:
    """Loaded pipelines keyed by model, least recently used evicted beyond `capacity`."""

    settings: Settings
    capacity: int = 1
    loaded: OrderedDict[str, Any] = field(default_factory=OrderedDict)
    hits: int = 0
    misses: int = 0
    evictions: int = 0

    def get(self, model: str) -> Any:
        """The pipeline for a job's model, loading it on first use (never at import)."""
        if model in self.loaded:
            self.hits += 1
            self.loaded.move_to_end(model)
            return self.loaded[model]
        self.misses += 1
        from models.pipeline import load_pipeline

        while len(self.loaded) >= self.capacity:
            evicted, _ = self.loaded.popitem(last=False)
            self.evictions += 1
            log.info(
                "pipeline cache: evicted %s (hits=%d misses=%d evictions=%d)",
                evicted,
                self.hits,
                self.misses,
                self.evictions,
            )
        source = model_source(model, self.settings)
        started = time.perf_counter()
        pipe = load_pipeline(source, device=self.settings.device, dtype=self.settings.dtype)
        log.info("loaded model %s from %s in %.1f s", model, source, time.perf_counter() - started)
        self.loaded[model] = pipe
        return pipe


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
    pipelines: PipelineCache
    uploader: Uploader
    max_batch: int
    stats: WorkerStats = field(default_factory=WorkerStats)
    _dataset_names: dict[int, str] = field(default_factory=dict)

    def dataset_name(self, dataset_id: int) -> str:
        """A dataset's name (part of its object keys); names never change, so each is read once."""
        if dataset_id not in self._dataset_names:
            with self.engine.connect() as conn:
                name = conn.execute(select(Dataset.name).where(Dataset.id == dataset_id)).scalar_one()
            self._dataset_names[dataset_id] = str(name)
        return self._dataset_names[dataset_id]

    @classmethod
    def build(
        cls,
        settings: Settings,
        app: Celery,
        name: str | None = None,
        *,
        max_batch: int | None = None,
        io_threads: int = 2,
    ) -> WorkerRuntime:
        storage = open_storage(
            settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url, s3_region=settings.s3_region
        )
        batch = max_batch or settings.batch_size
        # Two batches may wait for storage while a third renders; beyond that the render loop waits.
        uploader = Uploader(storage, threads=io_threads, max_in_flight=2 * batch)
        return cls(
            settings,
            app,
            name or default_worker_name(),
            make_engine(settings.database_url),
            storage,
            PipelineCache(settings),
            uploader,
            batch,
        )

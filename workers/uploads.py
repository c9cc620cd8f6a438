"""Encoding and uploading on a bounded background pool, so the next batch renders while this one uploads."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from farm.job import Claimed, Scores
from farm.storage import Storage, StoredObject, object_key
from workers.png import encode_png

log = logging.getLogger("farm.worker")

# A stored image: its job, object, render ms, recipe JSON and scores (farm/store/verdicts.py), or None unscored.
StoredResult = tuple[Claimed, StoredObject, int, str | None, Scores | None]
BatchDone = Callable[[list[StoredResult], list[tuple[Claimed, BaseException]]], None]


class JobLost(Exception):
    """The job was canceled, reaped or claimed again while this attempt rendered it."""


@dataclass
class Rendered:
    """An image waiting to be encoded and stored."""

    job: Claimed
    dataset: str
    image: Any
    render_ms: int
    recipe: str | None = None  # how it was sampled (models/recipe.py), for the row and the PNG
    scores: Scores | None = None  # what the scorers said (a yield-targeted line's try), for the row and the PNG


@dataclass
class _Batch:
    size: int
    on_done: BatchDone
    done: list[StoredResult] = field(default_factory=list)
    failed: list[tuple[Claimed, BaseException]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, ok: StoredResult | None, bad: tuple[Claimed, BaseException] | None) -> bool:
        with self.lock:
            if ok:
                self.done.append(ok)
            if bad:
                self.failed.append(bad)
            return len(self.done) + len(self.failed) == self.size


def _yield_to_rendering() -> None:
    """Run this I/O thread at a lower CPU priority (Linux threads have their own nice value).

    On a small CPU machine torch's threads and PNG encoding compete for the same cores; rendering is the
    bottleneck, so it should win, and the upload pool catches up in the gaps (back-pressure bounds the lag).
    """
    with contextlib.suppress(AttributeError, OSError):  # not Linux, or not permitted: keep the default
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)


class Uploader:
    """At most `max_in_flight` images rendered but not yet stored: the render loop blocks beyond that
    (back-pressure), so a slow store costs time, never unbounded memory."""

    def __init__(
        self,
        storage: Storage,
        *,
        threads: int = 2,
        max_in_flight: int = 16,
        event: Callable[[str, str, int], None] | None = None,
        is_lost: Callable[[str], bool] | None = None,
    ) -> None:
        self.storage = storage
        self.event = event or (lambda name, job_id, seq: None)  # one log line per upload step
        self.is_lost = is_lost or (lambda job_id: False)  # a canceled or reaped job is not uploaded
        self.max_in_flight = max_in_flight
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._pool = ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix="farm-upload", initializer=_yield_to_rendering
        )
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self.in_flight = 0  # queued and not yet stored and recorded (what drain() waits for)
        self._jobs: set[str] = set()
        self.images_held = 0  # rendered images in memory, waiting for or being encoded/uploaded
        self.peak_images_held = 0
        self.stored_bytes = 0

    def submit(self, batch: Sequence[Rendered], on_done: BatchDone) -> None:
        """Queue a rendered batch; blocks while the pool is full. on_done runs once the whole batch is stored."""
        tracker = _Batch(len(batch), on_done)
        for item in batch:
            self._slots.acquire()
            with self._lock:
                self.in_flight += 1
                self._jobs.add(item.job.id)
                self.images_held += 1
                self.peak_images_held = max(self.peak_images_held, self.images_held)
            self._pool.submit(self._store, item, tracker)

    def _store(self, item: Rendered, batch: _Batch) -> None:
        ok: StoredResult | None = None
        bad: tuple[Claimed, BaseException] | None = None
        job = item.job
        try:
            if self.is_lost(job.id):
                raise JobLost(f"job {job.id} attempt {job.claim_seq} is no longer this worker's; not uploaded")
            data = encode_png(item.image, job, item.recipe, item.scores)
            key = object_key(self.storage.prefix, item.dataset, job.id, job.claim_seq)
            self.event("upload_start", job.id, job.claim_seq)
            stored = self.storage.put(key, data, metadata={"job_id": job.id, "seed": str(job.seed)})
            self.event("upload_end", job.id, job.claim_seq)
            ok = (job, stored, item.render_ms, item.recipe, item.scores)
            with self._lock:
                self.stored_bytes += stored.bytes
        except Exception as exc:
            bad = (item.job, exc)
        finally:
            item.image = None  # the pixels are no longer needed; free them before the slot opens
            with self._lock:
                self.images_held -= 1
            self._slots.release()
        try:
            if batch.add(ok, bad):
                batch.on_done(batch.done, batch.failed)
        finally:
            with self._lock:
                self.in_flight -= 1
                self._jobs.discard(item.job.id)
                if self.in_flight == 0:
                    self._idle.notify_all()

    def holding(self) -> set[str]:
        """Ids of the jobs whose images are queued or being stored now."""
        with self._lock:
            return set(self._jobs)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued image is stored and recorded; True if it got there in time."""
        with self._lock:
            return self._idle.wait_for(lambda: self.in_flight == 0, timeout=timeout_s)

    def close(self) -> None:
        """Drain, then stop the threads."""
        self.drain()
        self._pool.shutdown(wait=True)

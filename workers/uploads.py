"""Encoding and uploading on a bounded background pool, so the next batch renders while this one uploads."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from farm.job import Claimed, Scores
from farm.storage import Storage, StoredObject, object_key
from workers.png import encode_png

log = logging.getLogger("farm.worker")

# Group commit (Settings.record_group_s): the most jobs one grouped record holds; more are recorded at once.
RECORD_GROUP_JOBS = 64

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
    (back-pressure), so a slow store costs time, never unbounded memory.

    Each batch, once all its images are stored, goes to its `on_done` (the worker's: record it). With `group_s`
    above 0 the stored batches wait up to that long (or until RECORD_GROUP_JOBS jobs wait) on one thread that
    hands them over together, one call per callback: the worker records them in one transaction (group commit).
    Until then their jobs count as held here (`holding`), and `drain` hands them over at once and waits for it.
    """

    def __init__(
        self,
        storage: Storage,
        *,
        threads: int = 2,
        max_in_flight: int = 16,
        event: Callable[[str, str, int], None] | None = None,
        is_lost: Callable[[str], bool] | None = None,
        on_done: BatchDone | None = None,
        group_s: float = 0.0,
        group_jobs: int = RECORD_GROUP_JOBS,
    ) -> None:
        self.storage = storage
        self.on_done = on_done  # for batches submitted without their own
        self.group_s, self.group_jobs = group_s, group_jobs
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
        # Group commit: stored batches not yet handed to their callback, and their jobs (waiting or being handed).
        self._groups: list[tuple[BatchDone, list[StoredResult], list[tuple[Claimed, BaseException]]]] = []
        self._group_jobs = 0
        self._group_since = 0.0
        self._deferred = 0
        self._flush = self._closing = False
        self._wake = threading.Condition(self._lock)
        self._grouper: threading.Thread | None = None
        if group_s > 0:
            self._grouper = threading.Thread(target=self._group_loop, name="farm-record", daemon=True)
            self._grouper.start()

    def submit(self, batch: Sequence[Rendered], on_done: BatchDone | None = None) -> None:
        """Queue a rendered batch; blocks while the pool is full. on_done (else the uploader's) runs once the whole
        batch is stored, or with the other batches of its group."""
        callback = on_done or self.on_done
        if callback is None:
            raise ValueError("no on_done for this batch, and the uploader has none")
        tracker = _Batch(len(batch), callback)
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
        deferred = False
        try:
            if batch.add(ok, bad):
                if self._grouper is not None:
                    self._defer(batch)  # its jobs stay held here until handed over
                    deferred = True
                else:
                    batch.on_done(batch.done, batch.failed)
        finally:
            with self._lock:
                self.in_flight -= 1
                if not deferred:
                    self._jobs.discard(item.job.id)
                if self.in_flight == 0:
                    self._idle.notify_all()

    def _defer(self, batch: _Batch) -> None:
        """A stored batch joins the group that the grouping thread hands over next."""
        ids = [job.id for job, *_result in batch.done] + [job.id for job, _exc in batch.failed]
        with self._lock:
            if not self._groups:
                self._group_since = time.monotonic()
            self._groups.append((batch.on_done, batch.done, batch.failed))
            self._group_jobs += len(ids)
            self._deferred += len(ids)
            self._jobs.update(ids)
            self._wake.notify_all()

    def _group_loop(self) -> None:
        while True:
            with self._lock:
                while not self._groups and not self._closing:
                    self._wake.wait()
                if not self._groups:
                    return
                while not (self._flush or self._closing or self._group_jobs >= self.group_jobs):
                    left = self._group_since + self.group_s - time.monotonic()
                    if left <= 0:
                        break
                    self._wake.wait(left)
                taken, self._groups, self._group_jobs = self._groups, [], 0
            self._hand_over(taken)

    def _hand_over(
        self, taken: list[tuple[BatchDone, list[StoredResult], list[tuple[Claimed, BaseException]]]]
    ) -> None:
        """One call per callback, with every batch of the group that named it, in the order they were stored."""
        merged: dict[int, tuple[BatchDone, list[StoredResult], list[tuple[Claimed, BaseException]]]] = {}
        for on_done, done, failed in taken:
            entry = merged.setdefault(id(on_done), (on_done, [], []))
            entry[1].extend(done)
            entry[2].extend(failed)
        for on_done, done, failed in merged.values():
            try:
                on_done(done, failed)
            except Exception:  # the worker's callback keeps what it cannot record; anything else is a bug
                log.exception("handing over %d stored results failed", len(done) + len(failed))
            finally:
                with self._lock:
                    self._deferred -= len(done) + len(failed)
                    self._jobs.difference_update([job.id for job, *_r in done] + [job.id for job, _e in failed])
                    if self.in_flight == 0 and self._deferred == 0:
                        self._idle.notify_all()

    def holding(self) -> set[str]:
        """Ids of the jobs whose images are queued or being stored now."""
        with self._lock:
            return set(self._jobs)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued image is stored and recorded (a waiting group handed over at once, and so is
        every batch stored meanwhile); True if it got there in time."""
        with self._lock:
            self._flush = True
            self._wake.notify_all()
            try:
                return self._idle.wait_for(lambda: self.in_flight == 0 and self._deferred == 0, timeout=timeout_s)
            finally:
                self._flush = False

    def close(self) -> None:
        """Drain, then stop the threads."""
        self.drain()
        self._pool.shutdown(wait=True)
        if self._grouper is not None:
            with self._lock:
                self._closing = True
                self._wake.notify_all()
            self._grouper.join()

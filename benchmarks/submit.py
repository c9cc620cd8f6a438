"""`farm bench submit`: time `farm submit` of many prompts (read, validate, record) and the leader's first top-up of
the broker's window, `farm status` on a million-job dataset, and (--backlog-jobs) the pending-per-pool count."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, text, update
from sqlalchemy.engine import Connection, Engine

from farm.dispatch.broker import make_celery
from farm.dispatch.publish import dispatch_pending
from farm.secrets import redact
from farm.settings import Settings
from farm.store import control
from farm.store.engine import open_store
from farm.store.queries import dataset_status
from farm.store.schema import Dataset, Job, JobStatus, utcnow
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.record import record

_SQLITE_CHUNK = 50_000
_COLUMNS = (
    "id", "dataset_id", "source_line", "prompt", "seed", "width", "height", "num_inference_steps", "guidance_scale",
    "model", "status", "attempts", "worker", "created_at", "started_at", "finished_at", "lease_expires_at",
    "output_uri", "sha256", "bytes", "render_ms", "error",
)  # fmt: skip
# Of every 20 jobs: 11 succeeded (55%), 1 failed (5%), 2 running (10%), 6 queued (30%).
_STATES = [JobStatus.SUCCEEDED] * 11 + [JobStatus.FAILED] + [JobStatus.RUNNING] * 2 + [JobStatus.QUEUED] * 6


def bench_submit(
    settings: Settings,
    *,
    prompts: int = 100_000,
    status_jobs: int = 1_000_000,
    status_runs: int = 7,
    backlog_jobs: int = 0,
    workdir: Path,
    keep: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure submit of `prompts` prompts (and the first window sent), `farm status` on `status_jobs` jobs and,
    with `backlog_jobs`, counting that many pending jobs per pool; return figures."""
    say = progress or (lambda _line: None)
    tag = uuid.uuid4().hex[:12]
    settings = dataclasses.replace(settings, queue=f"bench-{tag}")
    engine = open_store(settings)
    names = [f"bench-submit-{tag}", f"bench-status-{tag}", f"bench-backlog-{tag}"]
    backlog: dict[str, Any] | None = None
    try:
        submit = _bench_submit(engine, settings, names[0], prompts, Path(workdir), keep, say)
        status = _bench_status(engine, settings, names[1], status_jobs, status_runs, say)
        if backlog_jobs:
            backlog = _bench_backlog(engine, settings, names[2], backlog_jobs, say)
        if not keep:
            started = time.perf_counter()
            for name in names:
                _drop_dataset(engine, name)
            status["cleanup_s"] = round(time.perf_counter() - started, 3)
            say(f"cleaned up in {status['cleanup_s']:.1f} s")
    except BaseException:
        if not keep:
            for name in names:
                _drop_dataset(engine, name)
        raise
    finally:
        engine.dispose()
    figures = {
        "store": redact(settings.database_url),
        "broker": redact(settings.broker_url),
        "submit": submit,
        "status": status,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    if backlog is not None:
        figures["backlog"] = backlog
    return figures


def _bench_submit(
    engine: Engine, settings: Settings, name: str, prompts: int, workdir: Path, keep: bool, say: Callable[[str], None]
) -> dict[str, Any]:
    """Time what `farm submit` does for a file of distinct prompts (plan_submission, record), then the first
    dispatch_pending the leader runs on them (a window: no worker is alive here, so one worker's share); purge the
    queue after."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"{name}.txt"
    path.write_text("".join(f"bench prompt {i}: a lighthouse at dusk, watercolor\n" for i in range(prompts)))
    app = make_celery(settings)
    say(f"submit: {prompts} prompts to dataset {name}, queue {settings.queue}")
    try:
        t0 = time.perf_counter()
        plan = plan_submission(path, SubmitOptions(dataset=name, model=settings.default_model))
        t1 = time.perf_counter()
        recorded = record(engine, plan)
        t2 = time.perf_counter()
        sent = dispatch_pending(engine, app, settings, dataset_id=recorded.dataset_id)
        t3 = time.perf_counter()
    finally:
        purged = _purge_queue(app, settings.queue)
        app.close()
        if not keep:
            path.unlink(missing_ok=True)
    total = t2 - t0  # `farm submit` returns here; the leader's dispatcher sends the window
    figures = {
        "dataset": name,
        "prompts": prompts,
        "jobs": recorded.new_jobs,
        "dispatched_jobs": sent.jobs,
        "tasks": sent.tasks,
        "batch_size": settings.batch_size,
        "plan_s": round(t1 - t0, 3),
        "record_s": round(t2 - t1, 3),
        "dispatch_s": round(t3 - t2, 3),  # the leader's first top-up, not part of the submit
        "total_s": round(total, 3),
        "prompts_per_s": round(prompts / total, 1) if total > 0 else None,
        "dispatch_us_per_message": round((t3 - t2) / sent.tasks * 1e6, 1) if sent.tasks else None,
        "purged_messages": purged,
    }
    say(
        f"submit: plan {figures['plan_s']} s, record {figures['record_s']} s, total {figures['total_s']} s; "
        f"first window: {sent.jobs} jobs in {sent.tasks} tasks in {figures['dispatch_s']} s"
    )
    return figures


def _purge_queue(app: Any, queue: str) -> int:
    """Remove every message of this one queue (app.control.purge would empty every queue), then the queue."""
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        purged = int(channel.queue_purge(queue) or 0)
        # Declared and deleted on this channel, so Redis forgets the queue's binding too.
        bound = app.amqp.queues[queue].bind(channel)
        bound.declare()
        bound.delete()
    return purged


def _bench_status(
    engine: Engine, settings: Settings, name: str, jobs: int, runs: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """Bulk-insert `jobs` rows in mixed states, then time dataset_status and one `farm status --json` process."""
    say(f"status: inserting {jobs} jobs into dataset {name}")
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(insert(Dataset).values(name=name, created_at=utcnow()))
        ds_id = int(conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar_one())
        _insert_jobs(conn, ds_id, name, jobs)
    insert_s = time.perf_counter() - started
    _finish_recently(engine, ds_id)
    analyze_s = 0.0
    if engine.dialect.name == "postgresql":
        started = time.perf_counter()
        with engine.begin() as conn:
            conn.execute(text("ANALYZE jobs"))
            conn.execute(text("ANALYZE datasets"))
        analyze_s = time.perf_counter() - started
    say(f"status: inserted in {insert_s:.1f} s; timing dataset_status {runs} times")
    first = dataset_status(engine, name)  # warm-up: pool, statement cache, OS page cache
    times = _time_status(engine, name, runs)
    vacuumed: list[float] = []
    if engine.dialect.name == "postgresql":
        # Right after a bulk load PostgreSQL's visibility map is empty, so the count cannot be answered from
        # the index alone; autovacuum fixes that on a live table. Time both: just loaded, and vacuumed.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE jobs"))
        vacuumed = _time_status(engine, name, runs)
    cli_ms, cli_total = _time_cli(settings, name)
    figures = {
        "dataset": name,
        "jobs": first.total,
        "counts": first.counts,
        "insert_s": round(insert_s, 3),
        "analyze_s": round(analyze_s, 3),
        "runs": runs,
        "min_ms": round(times[0], 2),
        "median_ms": round(statistics.median(times), 2),
        "p95_ms": round(times[max(0, math.ceil(0.95 * len(times)) - 1)], 2),
        "median_ms_after_vacuum": round(statistics.median(vacuumed), 2) if vacuumed else None,
        "cli_ms": round(cli_ms, 1),
        "cli_total": cli_total,
    }
    say(f"status: median {figures['median_ms']} ms in-process, `farm status --json` process {figures['cli_ms']} ms")
    return figures


# As on a busy fleet: this many of the loaded jobs finished in the last 100 s (a load of 10M jobs takes longer
# than the rate window, so without it the rate would read nothing).
_RECENT_FINISHES = 20_000


def _finish_recently(engine: Engine, ds_id: int) -> None:
    """Move the finish time of _RECENT_FINISHES succeeded jobs into the last 100 s, spread evenly."""
    with engine.begin() as conn:
        query = select(Job.id).where(Job.dataset_id == ds_id, Job.status == JobStatus.SUCCEEDED.value)
        ids = list(conn.execute(query.limit(_RECENT_FINISHES)).scalars())
        if not ids:
            return
        now = utcnow()
        moved = [{"jid": job_id, "at": now - timedelta(seconds=100 * i / len(ids))} for i, job_id in enumerate(ids)]
        conn.execute(update(Job).where(Job.id == bindparam("jid")).values(finished_at=bindparam("at")), moved)


def _time_status(engine: Engine, name: str, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        dataset_status(engine, name)
        times.append((time.perf_counter() - started) * 1000)
    return sorted(times)


def _insert_jobs(conn: Connection, ds_id: int, name: str, count: int, *, pending: bool = False) -> None:
    """COPY on PostgreSQL, executemany in chunks on SQLite, all in the caller's transaction. `pending`: every job
    pending, with one of six render keys (model and size), instead of the mixed states."""
    rows = _pending_rows if pending else _job_rows
    if conn.dialect.name == "postgresql":
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY jobs ({', '.join(_COLUMNS)}) FROM STDIN") as copy:
            for row in rows(ds_id, name, count, lambda moment: moment):
                copy.write_row(row)
        return
    # The text SQLAlchemy stores for a UTC timestamp on SQLite, so range filters compare correctly.
    sql = f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
    chunk: list[tuple[Any, ...]] = []
    for row in rows(ds_id, name, count, lambda moment: moment.strftime("%Y-%m-%d %H:%M:%S.%f")):
        chunk.append(row)
        if len(chunk) == _SQLITE_CHUNK:
            conn.exec_driver_sql(sql, chunk)
            chunk = []
    if chunk:
        conn.exec_driver_sql(sql, chunk)


def _job_rows(ds_id: int, name: str, count: int, stamp: Callable[[datetime], Any]) -> Iterator[tuple[Any, ...]]:
    """Deterministic rows in _COLUMNS order; finished jobs spread over the last hour."""
    now = utcnow()
    created = stamp(now - timedelta(hours=1))
    lease = stamp(now + timedelta(minutes=10))
    for i in range(count):
        job_id = hashlib.md5(f"{name}\0{i}".encode()).hexdigest()
        state = _STATES[i % len(_STATES)]
        worker = started = finished = expires = uri = digest = size = render_ms = error = None
        attempts = 0
        if state is not JobStatus.QUEUED:
            worker, attempts = f"bench-worker-{i % 8}", 1
            moment = now - timedelta(seconds=3600 * ((i * 0.6180339887) % 1.0))
            started = stamp(moment - timedelta(seconds=2))
            if state is JobStatus.RUNNING:
                expires = lease
            else:
                finished = stamp(moment)
        if state is JobStatus.SUCCEEDED:
            uri, digest, size, render_ms = f"file:///bench/{name}/{job_id}.png", job_id * 2, 150_000 + i % 4096, 480
        elif state is JobStatus.FAILED:
            attempts, error = 3, "bench: simulated failure"
        yield (
            job_id, ds_id, i + 1, f"bench prompt {i}", i, 1024, 1024, 4, 0.0, "tiny", state.value, attempts,
            worker, created, started, finished, expires, uri, digest, size, render_ms, error,
        )  # fmt: skip


def _pending_rows(ds_id: int, name: str, count: int, stamp: Callable[[datetime], Any]) -> Iterator[tuple[Any, ...]]:
    """Pending rows in _COLUMNS order, spread over six (model, size) render keys."""
    created = stamp(utcnow() - timedelta(hours=1))
    keys = [(model, size) for model in ("tiny", "bench-small") for size in (64, 128, 256)]
    for i in range(count):
        job_id = hashlib.md5(f"{name}\0{i}".encode()).hexdigest()
        model, size = keys[i % len(keys)]
        yield (
            job_id, ds_id, i + 1, f"bench prompt {i}", i, size, size, 4, 0.0, model, JobStatus.PENDING.value, 0,
            None, created, None, None, None, None, None, None, None, None,
        )  # fmt: skip


def _time_cli(settings: Settings, name: str) -> tuple[float, int | None]:
    """Wall time of one `python -m farm status NAME --json` process, and the total it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(
        FARM_DATABASE_URL=settings.database_url,
        FARM_BROKER_URL=settings.broker_url,
        FARM_HOME=str(settings.home),
        FARM_STORAGE_URL=settings.storage_url,
    )
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "farm", "status", name, "--json"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = (time.perf_counter() - started) * 1000
    if done.returncode != 0:
        raise RuntimeError(f"`farm status {name} --json` exited {done.returncode}: {done.stderr.strip()[-500:]}")
    [status] = json.loads(done.stdout)  # `farm status NAME --json`: an array holding that one dataset
    return elapsed, status.get("total")


def _bench_backlog(
    engine: Engine, settings: Settings, name: str, jobs: int, say: Callable[[str], None]
) -> dict[str, Any]:
    """Bulk-insert `jobs` pending rows of six render keys, then time the leader's pending-per-pool count (3 runs)
    and one `farm status --json` process that reports it."""
    from farm.dispatch.backlog import count_backlog, refresh_backlog
    from farm.dispatch.routing import Router

    say(f"backlog: inserting {jobs} pending jobs into dataset {name}")
    started = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(insert(Dataset).values(name=name, created_at=utcnow()))
        ds_id = int(conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar_one())
        _insert_jobs(conn, ds_id, name, jobs, pending=True)
    insert_s = time.perf_counter() - started
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE jobs"))
    router = Router.load(engine, settings)
    times = sorted(count_backlog(engine, router).seconds * 1000 for _ in range(3))
    holder = f"bench#{name}"
    refresh_backlog(engine, settings, holder=holder, ttl_s=60, router=router)  # what `farm status --json` shows
    cli_ms, _total = _time_cli(settings, name)
    with engine.begin() as conn:  # a leader of this store counts again at its next round
        control.give_up(conn, control.BACKLOG, holder=holder)
    figures = {
        "dataset": name,
        "jobs": jobs,
        "insert_s": round(insert_s, 3),
        "count_ms": [round(t, 1) for t in times],
        "cli_ms": round(cli_ms, 1),
    }
    say(f"backlog: counted per pool in {times[1]:.0f} ms (median of 3); `farm status --json` {cli_ms:.0f} ms")
    return figures


def _drop_dataset(engine: Engine, name: str) -> None:
    """Delete a benchmark dataset and its jobs, if it exists."""
    with engine.begin() as conn:
        ds_id = conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar()
        if ds_id is not None:
            conn.execute(delete(Job).where(Job.dataset_id == ds_id))
            conn.execute(delete(Dataset).where(Dataset.id == ds_id))

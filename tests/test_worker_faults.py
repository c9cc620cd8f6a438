"""A worker runtime against faults that strike while it holds jobs: a cancel mid-render, a database that goes
away between render and record, attempts that lost their job; and `farm gc`, which keeps exactly the winners."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine, make_url

from farm.dispatch.broker import make_celery
from farm.outputs.gc import collect
from farm.settings import load_settings
from farm.storage import object_key
from farm.storage.local import LocalStorage
from farm.store import transitions
from farm.store.engine import make_engine, open_store
from farm.store.schema import Job
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.record import record
from tests.support.chaos import ToggleProxy
from workers.recording import retry_unrecorded
from workers.runtime import WorkerRuntime
from workers.tasks import Outcome, render_jobs


@pytest.fixture(scope="module")
def bench_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from models.bench_small import make_bench_small

    return make_bench_small(tmp_path_factory.mktemp("wf-models") / "bench-small")


def _submit(engine: Engine, tmp_path: Path, model: Path, n: int, steps: int) -> list[str]:
    path = tmp_path / "p.txt"
    path.write_text("".join(f"a slow render, take {i}\n" for i in range(n)))
    plan = plan_submission(path, SubmitOptions(dataset="wf", model=str(model), num_inference_steps=steps))
    record(engine, plan)
    return plan.ids


def _rows(engine: Engine, ids: list[str]) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(Job.__table__).where(Job.id.in_(ids)).order_by(Job.id)))


def _in_thread(rt: WorkerRuntime, ids: list[str]) -> tuple[threading.Thread, list[Outcome]]:
    outcomes: list[Outcome] = []
    thread = threading.Thread(target=lambda: outcomes.append(render_jobs(rt, ids)), daemon=True)
    thread.start()
    return thread, outcomes


def _wait(condition: Any, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_canceling_a_rendering_job_stops_its_batch_and_stores_nothing(tmp_path: Path, bench_small: Path) -> None:
    # Problem 8: jobs canceled while rendering still stored their objects.
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://", lease_s=6)
    engine = open_store(settings)
    ids = _submit(engine, tmp_path, bench_small, 2, steps=50)  # one batch of two, several seconds long
    rt = WorkerRuntime.build(settings, make_celery(settings), name="w-cancel")
    thread, outcomes = _in_thread(rt, ids)
    _wait(lambda: len(rt.holdings) == 2, "the claim")
    with engine.begin() as conn:
        assert transitions.cancel(conn, job_ids=ids) == 2
    thread.join(timeout=120)  # the heartbeat (every 2 s) finds them canceled; the render stops at its next step
    assert not thread.is_alive()
    assert rt.uploader.drain(timeout_s=60)
    rt.leases.stop()
    assert outcomes[0].rendered == 0 and rt.stats.rendered == 0  # the batch never finished
    assert [row.status for row in _rows(engine, ids)] == ["canceled", "canceled"]
    assert not list((tmp_path / "home" / "images").rglob("*.png"))  # nothing of them stored
    assert len(rt.holdings) == 0


def test_results_the_database_refused_are_recorded_once_it_is_back(
    tmp_path: Path, bench_small: Path, own_pg_url: str
) -> None:
    # Problem 6: results that could not be recorded were never redone or recorded while the worker lived.
    url = make_url(own_pg_url)
    proxy = ToggleProxy(url.host or "127.0.0.1", url.port or 5432).start()
    proxied = url.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://", database_url=proxied, lease_s=600)
    direct = make_engine(own_pg_url)
    ids = _submit(direct, tmp_path, bench_small, 2, steps=20)
    rt = WorkerRuntime.build(settings, make_celery(settings), name="w-record")
    try:
        thread, _ = _in_thread(rt, ids)
        _wait(lambda: len(rt.holdings) == 2, "the claim")
        proxy.go_down()  # the database goes away while the batch renders
        thread.join(timeout=120)
        assert rt.uploader.drain(timeout_s=60)
        assert len(rt.unrecorded) == 2 and len(rt.holdings) == 2  # kept, and still held (leases renewed)
        assert {row.status for row in _rows(direct, ids)} == {"running"}
        proxy.pass_through()
        retry_unrecorded(rt)  # what the next heartbeat does
        rows = _rows(direct, ids)
        assert [(row.status, row.attempts, row.claim_seq) for row in rows] == [("succeeded", 1, 1)] * 2
        assert len(rt.unrecorded) == 0 and len(rt.holdings) == 0
        for row in rows:
            assert Path(row.output_uri.removeprefix("file://")).is_file()
    finally:
        rt.leases.stop()
        proxy.stop()
        direct.dispose()


def test_gc_keeps_the_winners_and_running_attempts_and_deletes_the_rest(tmp_path: Path) -> None:
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://")
    engine = open_store(settings)
    path = tmp_path / "p.txt"
    path.write_text("one\ntwo\nthree\n")
    plan = plan_submission(path, SubmitOptions(dataset="gc"))
    record(engine, plan)
    storage = LocalStorage(tmp_path / "home" / "images")
    won, running, canceled = plan.ids
    with engine.begin() as conn:
        jobs = {job.id: job for job in transitions.claim(conn, plan.ids, worker="w#1", lease_s=60, max_attempts=3)}
        winner = storage.put(object_key("", "gc", won, 1), b"the winner")
        assert transitions.mark_succeeded(conn, won, worker="w#1", seq=1, stored=winner, render_ms=1)
        transitions.cancel(conn, job_ids=[canceled])
    late = storage.put(object_key("", "gc", won, 2), b"a late attempt of a finished job")
    in_flight = storage.put(object_key("", "gc", running, jobs[running].claim_seq), b"an upload in flight")
    stale = storage.put(object_key("", "gc", running, 7), b"an attempt the job no longer runs")
    of_canceled = storage.put(object_key("", "gc", canceled, 1), b"stored after the cancel")
    (storage.root / "gc" / "README.txt").write_text("not the farm's")

    dry = collect(engine, storage, dataset="gc", dry_run=True)
    assert sorted(dry.deleted) == sorted([late.key, stale.key, of_canceled.key])
    assert all(storage.head(key) is not None for key in dry.deleted)  # a dry run deletes nothing
    done = collect(engine, storage)
    assert (done.kept, sorted(done.deleted), done.foreign) == (2, sorted(dry.deleted), ["gc/README.txt"])
    assert sorted(storage.list_keys("gc/")) == sorted([winner.key, in_flight.key, "gc/README.txt"])


def test_an_attempt_that_lost_its_job_deletes_its_object_and_gives_up_unrecordable_results(
    tmp_path: Path, bench_small: Path
) -> None:
    from workers.recording import record_batch

    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://", lease_s=6)
    engine = open_store(settings)
    ids = _submit(engine, tmp_path, bench_small, 2, steps=1)
    rt = WorkerRuntime.build(settings, make_celery(settings), name="w-late")
    try:
        with engine.begin() as conn:
            jobs = transitions.claim(conn, ids, worker=rt.name, lease_s=60, max_attempts=3)
        rt.holdings.add([job.held for job in jobs])
        late, kept = jobs
        with engine.begin() as conn:  # the first job is reaped and claimed by another worker meanwhile
            conn.execute(Job.__table__.update().where(Job.id == late.id).values(status="pending"))
            transitions.claim(conn, [late.id], worker="other#1", lease_s=60, max_attempts=3)
        stored = rt.storage.put(object_key("", "wf", late.id, late.claim_seq), b"late bytes")
        assert record_batch(rt, [(late, stored, 5, None, None)], [])
        assert rt.storage.head(stored.key) is None  # nothing of the losing attempt stays stored
        assert [row.status for row in _rows(engine, [late.id])] == ["running"]  # the other attempt's, untouched

        # A result unrecordable for a whole lease is given up: its object goes, the job is left to the reaper.
        other = rt.storage.put(object_key("", "wf", kept.id, kept.claim_seq), b"never recorded")
        rt.unrecorded.batches.append((time.monotonic() - settings.lease_s - 1, [(kept, other, 5)], []))
        retry_unrecorded(rt)
        assert rt.storage.head(other.key) is None and len(rt.holdings) == 0 and len(rt.unrecorded) == 0
    finally:
        rt.leases.stop()


def test_a_worker_whose_heartbeat_fails_claims_nothing(tmp_path: Path, bench_small: Path) -> None:
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://", lease_s=6)
    engine = open_store(settings)
    ids = _submit(engine, tmp_path, bench_small, 1, steps=1)
    rt = WorkerRuntime.build(settings, make_celery(settings), name="w-sick")
    rt.leases.stop()
    rt.leases.last_ok = time.monotonic() - settings.lease_s  # no successful beat for a whole lease
    assert render_jobs(rt, ids).claimed == 0
    assert [row.status for row in _rows(engine, ids)] == ["pending"]


@pytest.mark.integration
def test_a_retry_keeps_its_datasets_priority_and_queue(
    tmp_path: Path, tiny_model: Path, pg_url: str, redis_url: str, queue_name: str
) -> None:
    # Retries were published with no priority, and so jumped ahead of urgent datasets on Redis priority queues.
    import base64
    import json
    import shutil

    import redis

    settings = load_settings(
        {}, home=str(tmp_path / "home"), database_url=pg_url, broker_url=redis_url, queue=queue_name
    )
    engine = make_engine(pg_url)
    broken = shutil.copytree(tiny_model, tmp_path / "broken")
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    path = tmp_path / "p.txt"
    path.write_text("a prompt whose model never loads\n")
    dataset = f"prio-{queue_name}"
    plan = plan_submission(path, SubmitOptions(dataset=dataset, model=str(broken)))
    recorded = record(engine, plan)
    with engine.begin() as conn:
        transitions.set_priority(conn, recorded.dataset_id, 7)
    rt = WorkerRuntime.build(settings, make_celery(settings), name="w-prio")
    try:
        assert render_jobs(rt, plan.ids).render_failed == 1
    finally:
        rt.leases.stop()
    client = redis.Redis.from_url(redis_url)
    messages = [json.loads(raw) for key in client.keys(f"{queue_name}*") for raw in client.lrange(key, 0, -1)]
    assert len(messages) == 1
    assert messages[0]["properties"]["priority"] == 9 - 7  # kombu serves 0 first: the farm's 9 is kombu's 0
    assert json.loads(base64.b64decode(messages[0]["body"]))[0] == [plan.ids]
    engine.dispose()

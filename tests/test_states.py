"""The guarded state transitions, on SQLite and on PostgreSQL."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from farm.job import Claimed
from farm.storage import StoredObject
from farm.store import transitions
from farm.store.engine import ensure_schema, make_engine
from farm.store.schema import Dataset, Job, JobStatus, utcnow


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "sqlite":
        eng = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
        ensure_schema(eng, auto_upgrade=True)
    else:
        eng = make_engine(request.getfixturevalue("pg_url"))
    yield eng
    eng.dispose()


def _jobs(engine: Engine, n: int) -> list[str]:
    name = f"states-{uuid.uuid4().hex[:8]}"
    ids = [uuid.uuid4().hex for _ in range(n)]
    with engine.begin() as conn:
        conn.execute(Dataset.__table__.insert().values(name=name, created_at=utcnow()))
        ds = conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar_one()
        conn.execute(
            Job.__table__.insert(),
            [
                dict(
                    id=i,
                    dataset_id=ds,
                    prompt=f"p{k}",
                    seed=k,
                    width=64,
                    height=64,
                    num_inference_steps=4,
                    guidance_scale=0.0,
                    model="tiny",
                    status="pending",
                    attempts=0,
                    created_at=utcnow(),
                )
                for k, i in enumerate(ids)
            ],
        )
    return ids


def _status(engine: Engine, job_id: str) -> tuple[str, int, str | None]:
    with engine.connect() as conn:
        row = conn.execute(select(Job.status, Job.attempts, Job.error).where(Job.id == job_id)).one()
    return row.status, row.attempts, row.error


def _claim(engine: Engine, ids: list[str], worker: str = "w1", max_attempts: int = 3) -> list[Claimed]:
    with engine.begin() as conn:
        return transitions.claim(conn, ids, worker=worker, lease_s=60, max_attempts=max_attempts)


STORED = StoredObject(uri="file:///x.png", key="x.png", sha256="ab" * 32, bytes=10)


def test_claim_is_exclusive_so_a_duplicate_delivery_renders_nothing(engine: Engine) -> None:
    ids = _jobs(engine, 3)
    first = _claim(engine, ids, "w1")
    assert [c.id for c in first] == ids and all(c.attempts == 1 for c in first)
    assert _claim(engine, ids, "w2") == []  # the same message delivered again, to another worker
    assert _status(engine, ids[0])[:2] == ("running", 1)


def test_claim_takes_pending_and_queued_but_not_finished_jobs(engine: Engine) -> None:
    ids = _jobs(engine, 3)
    with engine.begin() as conn:
        assert transitions.mark_queued(conn, ids[:1]) == 1
        assert transitions.cancel(conn, job_ids=ids[2:]) == 1
    claimed = _claim(engine, ids)
    assert [c.id for c in claimed] == ids[:2]
    assert _status(engine, ids[2])[0] == "canceled"


def test_mark_queued_never_moves_a_running_job_back(engine: Engine) -> None:
    ids = _jobs(engine, 1)
    _claim(engine, ids)
    with engine.begin() as conn:
        assert transitions.mark_queued(conn, ids) == 0
    assert _status(engine, ids[0])[0] == "running"


def test_only_the_holding_worker_can_mark_succeeded_and_only_once(engine: Engine) -> None:
    ids = _jobs(engine, 1)
    _claim(engine, ids, "w1")
    with engine.begin() as conn:
        assert not transitions.mark_succeeded(conn, ids[0], worker="w2", stored=STORED, render_ms=5)
        assert transitions.mark_succeeded(conn, ids[0], worker="w1", stored=STORED, render_ms=5)
        assert not transitions.mark_succeeded(conn, ids[0], worker="w1", stored=STORED, render_ms=5)
    with engine.connect() as conn:
        row = conn.execute(select(Job.__table__).where(Job.id == ids[0])).one()
    assert (row.status, row.sha256, row.bytes, row.output_uri) == ("succeeded", STORED.sha256, 10, STORED.uri)
    assert row.finished_at is not None and row.finished_at.tzinfo is not None
    assert _claim(engine, ids, "w1") == []


def test_failed_attempts_requeue_then_fail_with_the_error_kept(engine: Engine) -> None:
    ids = _jobs(engine, 1)
    for attempt in (1, 2):
        assert [c.attempts for c in _claim(engine, ids, max_attempts=3)] == [attempt]
        with engine.begin() as conn:
            state = transitions.mark_attempt_failed(conn, ids[0], worker="w1", error="boom", max_attempts=3)
        assert state is JobStatus.QUEUED
    _claim(engine, ids, max_attempts=3)
    with engine.begin() as conn:
        assert transitions.mark_attempt_failed(conn, ids[0], worker="w1", error="boom 3", max_attempts=3) is (
            JobStatus.FAILED
        )
    assert _status(engine, ids[0]) == ("failed", 3, "attempt 1: boom\nattempt 2: boom\nattempt 3: boom 3")
    assert _claim(engine, ids, max_attempts=3) == []


def test_a_canceled_job_is_not_marked_by_its_late_worker(engine: Engine) -> None:
    ids = _jobs(engine, 2)
    _claim(engine, ids, "w1")
    with engine.begin() as conn:
        assert transitions.cancel(conn, job_ids=ids) == 2
        assert not transitions.mark_succeeded(conn, ids[0], worker="w1", stored=STORED, render_ms=1)
        assert transitions.mark_attempt_failed(conn, ids[1], worker="w1", error="x", max_attempts=3) is None
    assert [_status(engine, i)[0] for i in ids] == ["canceled", "canceled"]


def test_expired_lease_lets_another_worker_claim(engine: Engine) -> None:
    ids = _jobs(engine, 1)
    _claim(engine, ids, "dead-worker")
    assert _claim(engine, ids, "w2") == []
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == ids[0]).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
    claimed = _claim(engine, ids, "w2")
    assert [c.attempts for c in claimed] == [2]
    with engine.begin() as conn:  # the dead worker, if it comes back, can no longer finish it
        assert not transitions.mark_succeeded(conn, ids[0], worker="dead-worker", stored=STORED, render_ms=1)


def test_mark_pending_returns_queued_jobs_for_redispatch(engine: Engine) -> None:
    ids = _jobs(engine, 2)
    with engine.begin() as conn:
        transitions.mark_queued(conn, ids)
    _claim(engine, ids[1:])
    with engine.begin() as conn:
        assert transitions.mark_pending(conn, ids) == 1
    assert [_status(engine, i)[0] for i in ids] == ["pending", "running"]


def test_reaper_requeues_expired_leases_and_fails_the_last_attempt(engine: Engine) -> None:
    ids = _jobs(engine, 3)
    _claim(engine, ids, "dead-worker", max_attempts=2)
    with engine.begin() as conn:  # the third job is on its last attempt
        conn.execute(update(Job).where(Job.id == ids[2]).values(attempts=2))
        conn.execute(update(Job).where(Job.id.in_(ids[1:])).values(lease_expires_at=utcnow() - timedelta(seconds=1)))
        reaped = transitions.reap_expired(conn, max_attempts=2)
    assert (reaped.requeued, reaped.failed) == ([ids[1]], [ids[2]])
    assert _status(engine, ids[0])[0] == "running"  # its lease is still valid
    assert _status(engine, ids[1]) == ("pending", 1, "attempt 1: lease expired (worker dead-worker stopped)")
    assert _status(engine, ids[2]) == ("failed", 2, "attempt 2: lease expired (worker dead-worker stopped)")
    with engine.begin() as conn:
        assert transitions.reap_expired(conn, max_attempts=2) == transitions.Reaped([], [])


def test_the_error_history_keeps_the_newest_attempts_within_its_cap() -> None:
    from farm.store.transitions import _ERROR_MAX_CHARS, _with_attempt

    text = None
    for attempt in range(1, 200):
        text = _with_attempt(text, f"attempt {attempt}: " + "x" * 60)
    assert text is not None and len(text) <= _ERROR_MAX_CHARS
    assert text.splitlines()[-1].startswith("attempt 199: ")
    assert text.splitlines()[0].startswith("attempt ")  # cut at a line boundary, never mid-line

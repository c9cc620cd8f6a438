"""The guarded state transitions, on SQLite and on PostgreSQL."""

from __future__ import annotations

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
from farm.store.schema import Job, JobStatus, utcnow
from tests.support.jobs import insert_jobs


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
    return insert_jobs(engine, n)


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
        assert transitions.mark_queued(conn, ids[:1], queue="render") == ids[:1]
        assert transitions.cancel(conn, job_ids=ids[2:]) == 1
    claimed = _claim(engine, ids)
    assert [c.id for c in claimed] == ids[:2]
    assert _status(engine, ids[2])[0] == "canceled"


def test_mark_queued_never_moves_a_running_job_back(engine: Engine) -> None:
    ids = _jobs(engine, 1)
    _claim(engine, ids)
    with engine.begin() as conn:
        assert transitions.mark_queued(conn, ids, queue="render") == []
    assert _status(engine, ids[0])[0] == "running"


def test_only_the_holding_worker_can_mark_succeeded_and_only_once(engine: Engine) -> None:
    ids = _jobs(engine, 1)
    _claim(engine, ids, "w1")
    with engine.begin() as conn:
        assert not transitions.mark_succeeded(conn, ids[0], worker="w2", seq=1, stored=STORED, render_ms=5)
        assert not transitions.mark_succeeded(conn, ids[0], worker="w1", seq=2, stored=STORED, render_ms=5)
        assert transitions.mark_succeeded(conn, ids[0], worker="w1", seq=1, stored=STORED, render_ms=5)
        assert not transitions.mark_succeeded(conn, ids[0], worker="w1", seq=1, stored=STORED, render_ms=5)
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
            state = transitions.mark_attempt_failed(
                conn, ids[0], worker="w1", seq=attempt, error="boom", max_attempts=3
            )
        assert state is JobStatus.QUEUED
    _claim(engine, ids, max_attempts=3)
    with engine.begin() as conn:
        assert transitions.mark_attempt_failed(conn, ids[0], worker="w1", seq=3, error="boom 3", max_attempts=3) is (
            JobStatus.FAILED
        )
    assert _status(engine, ids[0]) == ("failed", 3, "attempt 1: boom\nattempt 2: boom\nattempt 3: boom 3")
    assert _claim(engine, ids, max_attempts=3) == []


def test_a_canceled_job_is_not_marked_by_its_late_worker(engine: Engine) -> None:
    ids = _jobs(engine, 2)
    _claim(engine, ids, "w1")
    with engine.begin() as conn:
        assert transitions.cancel(conn, job_ids=ids) == 2
        assert not transitions.mark_succeeded(conn, ids[0], worker="w1", seq=1, stored=STORED, render_ms=1)
        assert transitions.mark_attempt_failed(conn, ids[1], worker="w1", seq=1, error="x", max_attempts=3) is None
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
        assert not transitions.mark_succeeded(conn, ids[0], worker="dead-worker", seq=1, stored=STORED, render_ms=1)


def test_mark_pending_returns_queued_jobs_for_redispatch(engine: Engine) -> None:
    ids = _jobs(engine, 2)
    with engine.begin() as conn:
        transitions.mark_queued(conn, ids, queue="render")
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


# ---- the fence: issue 10's numbered problems, each on the transitions that fix it ------------------------


def _expire(engine: Engine, job_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_a_duplicate_message_to_the_incarnation_rendering_the_job_claims_nothing(engine: Engine) -> None:
    # Problem 2: claim used to accept jobs running under this very worker name, so a second message (pause and
    # resume, two dispatchers) made the same worker render every job again.
    ids = _jobs(engine, 2)
    assert [c.claim_seq for c in _claim(engine, ids, "w1#aaaa")] == [1, 1]
    assert _claim(engine, ids, "w1#aaaa") == []
    assert [_status(engine, i)[:2] for i in ids] == [("running", 1), ("running", 1)]


def test_a_late_attempt_can_never_mark_a_job_a_newer_attempt_holds_or_finished(engine: Engine) -> None:
    # Problem 3: a worker whose lease expired (frozen, partitioned) finished after another attempt.
    ids = _jobs(engine, 1)
    (late,) = _claim(engine, ids, "w1#aaaa")
    _expire(engine, ids[0])
    (newer,) = _claim(engine, ids, "w2#bbbb")
    assert (late.claim_seq, newer.claim_seq) == (1, 2)
    other = StoredObject(uri="file:///late.png", key="late.png", sha256="cd" * 32, bytes=11)
    with engine.begin() as conn:
        assert not transitions.mark_succeeded(conn, ids[0], worker="w1#aaaa", seq=1, stored=other, render_ms=1)
        assert transitions.mark_attempt_failed(conn, ids[0], worker="w1#aaaa", seq=1, error="x", max_attempts=3) is None
        assert transitions.mark_succeeded(conn, ids[0], worker="w2#bbbb", seq=2, stored=STORED, render_ms=1)
        assert not transitions.mark_succeeded(conn, ids[0], worker="w1#aaaa", seq=1, stored=other, render_ms=1)
    with engine.connect() as conn:
        row = conn.execute(select(Job.output_uri, Job.sha256).where(Job.id == ids[0])).one()
    assert (row.output_uri, row.sha256) == (STORED.uri, STORED.sha256)


def test_the_same_incarnation_claiming_again_cannot_write_with_its_older_attempt(engine: Engine) -> None:
    ids = _jobs(engine, 1)
    _claim(engine, ids, "w1#aaaa")
    _expire(engine, ids[0])
    assert [c.claim_seq for c in _claim(engine, ids, "w1#aaaa")] == [2]
    with engine.begin() as conn:
        assert not transitions.mark_succeeded(conn, ids[0], worker="w1#aaaa", seq=1, stored=STORED, render_ms=1)
        assert transitions.mark_succeeded(conn, ids[0], worker="w1#aaaa", seq=2, stored=STORED, render_ms=1)


def test_retry_restores_the_attempt_budget_but_never_the_sequence(engine: Engine) -> None:
    ids = _jobs(engine, 1)
    for seq in (1, 2):
        _claim(engine, ids, "w1#aaaa", max_attempts=2)
        with engine.begin() as conn:
            transitions.mark_attempt_failed(conn, ids[0], worker="w1#aaaa", seq=seq, error="e", max_attempts=2)
    assert _status(engine, ids[0])[:2] == ("failed", 2)
    with engine.connect() as conn:
        ds_id = conn.execute(select(Job.dataset_id).where(Job.id == ids[0])).scalar_one()
    with engine.begin() as conn:
        assert transitions.retry_finished(conn, ds_id, JobStatus.FAILED) == 1
    (again,) = _claim(engine, ids, "w1#aaaa", max_attempts=2)
    assert (again.attempts, again.claim_seq) == (1, 3)


def test_canceled_jobs_can_be_run_again(engine: Engine) -> None:
    # Problem 8: a canceled job could never run again.
    ids = _jobs(engine, 2)
    _claim(engine, ids[:1], "w1#aaaa")
    with engine.begin() as conn:
        assert transitions.cancel(conn, job_ids=ids) == 2
        ds_id = conn.execute(select(Job.dataset_id).where(Job.id == ids[0])).scalar_one()
        assert transitions.retry_finished(conn, ds_id, JobStatus.CANCELED) == 2
    assert [c.claim_seq for c in _claim(engine, ids, "w2#bbbb")] == [2, 1]


def test_only_held_leases_are_renewed_and_lost_ones_are_reported(engine: Engine) -> None:
    # Problems 5 and 6: renewing by name kept a dead incarnation's jobs, and unrecorded ones, leased for ever.
    ids = _jobs(engine, 3)
    held = [c.held for c in _claim(engine, ids, "w1#aaaa")]
    with engine.begin() as conn:
        transitions.cancel(conn, job_ids=ids[1:2])
        renewed = transitions.renew_leases(conn, worker="w1#aaaa", held=[held[0], held[1]], lease_s=60)
        assert renewed == {ids[0]}  # ids[1] canceled; ids[2] is running but no longer held in memory
        assert transitions.renew_leases(conn, worker="w1#bbbb", held=held, lease_s=60) == set()  # same label
    _expire(engine, ids[2])
    with engine.begin() as conn:
        assert transitions.reap_expired(conn, max_attempts=3).requeued == [ids[2]]


def test_release_hands_a_job_back_without_spending_an_attempt(engine: Engine) -> None:
    ids = _jobs(engine, 2)
    held = [c.held for c in _claim(engine, ids, "w1#aaaa")]
    with engine.begin() as conn:
        assert transitions.release(conn, worker="w2#bbbb", held=held) == []
        assert transitions.release(conn, worker="w1#aaaa", held=[(ids[0], 1), (ids[1], 7)]) == [ids[0]]
    assert _status(engine, ids[0])[:2] == ("pending", 0)
    assert _status(engine, ids[1])[:2] == ("running", 1)


def test_queued_jobs_sent_too_long_ago_are_taken_for_resending_once(engine: Engine) -> None:
    # Problem 4: a queued job whose message was lost waited for ever.
    ids = _jobs(engine, 3)
    with engine.begin() as conn:
        assert transitions.mark_queued(conn, ids, queue="render") == ids
        assert transitions.mark_queued(conn, ids, queue="render") == []  # a second dispatcher takes nothing
    _claim(engine, ids[2:])
    later = utcnow() + timedelta(seconds=5)
    with engine.begin() as conn:
        assert sorted(transitions.resend_stale(conn, queue="render", sent_before=later, limit=10)) == sorted(ids[:2])
        assert (
            transitions.resend_stale(conn, queue="render", sent_before=utcnow() - timedelta(seconds=1), limit=10) == []
        )
        assert transitions.resend_stale(conn, queue="other", sent_before=later, limit=10) == []

"""Lease renewal: a live worker keeps the jobs it holds; a dead one's leases expire; the beat survives errors."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from farm.store import fleet, transitions
from farm.store.engine import ensure_schema, make_engine
from farm.store.schema import Job, utcnow
from tests.support.jobs import insert_jobs
from workers.heartbeat import LeaseKeeper
from workers.runtime import Holdings


def test_renewal_keeps_a_live_workers_jobs_from_the_reaper(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    ids = insert_jobs(engine, 3)
    with engine.begin() as conn:
        alive = transitions.claim(conn, ids[:2], worker="alive#1", lease_s=30, max_attempts=3)
        transitions.claim(conn, ids[2:], worker="dead#2", lease_s=30, max_attempts=3)
        # Time passes: every lease is about to run out.
        conn.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))

    holdings = Holdings()
    holdings.add([job.held for job in alive])
    keeper = LeaseKeeper(engine, worker="alive#1", lease_s=30, holdings=holdings)
    assert keeper.renew() == 2
    with engine.begin() as conn:
        reaped = transitions.reap_expired(conn, max_attempts=3)
        leases = dict(conn.execute(select(Job.id, Job.lease_expires_at).where(Job.id.in_(ids[:2]))).all())
    assert (reaped.requeued, reaped.failed) == ([ids[2]], [])
    assert all(expires > utcnow() + timedelta(seconds=20) for expires in leases.values())


def test_the_keeper_thread_renews_periodically(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    keeper = LeaseKeeper(engine, worker="w#1", lease_s=1, holdings=Holdings()).start()  # renews every 1/3 s
    try:
        import time

        deadline = time.monotonic() + 10
        while keeper.renewals < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        keeper.stop()
    assert keeper.renewals >= 2


def test_the_beat_survives_any_error_and_a_worker_that_cannot_beat_stops_claiming(tmp_path: Path) -> None:
    # Problem 7: the heartbeat thread died on the first exception that was not SQLAlchemy's.
    import time

    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    failing = {"on": True}

    def describe(current_jobs: int) -> fleet.Heartbeat:
        if failing["on"]:
            raise RuntimeError("a bug in the heartbeat's description")
        return fleet.Heartbeat("w#1", None, "host", 1, "cpu", None, {}, current_jobs, 0.0, utcnow())

    keeper = LeaseKeeper(engine, worker="w#1", lease_s=1, holdings=Holdings())
    keeper._thread.start()  # the thread alone: start() beats once first, which would raise here
    try:
        deadline = time.monotonic() + 10
        keeper.describe = describe
        while keeper.healthy() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not keeper.healthy()  # no beat for half a lease: the worker claims nothing new
        failing["on"] = False
        while (keeper.renewals == 0 or not keeper.healthy()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert keeper.renewals >= 1 and keeper.healthy()  # the same thread beats again
    finally:
        keeper.stop()


def test_the_beat_reports_held_jobs_that_were_canceled(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    [job_id] = insert_jobs(engine, 1)
    with engine.begin() as conn:
        (job,) = transitions.claim(conn, [job_id], worker="w#1", lease_s=30, max_attempts=3)
    holdings = Holdings()
    holdings.add([job.held])
    lost: list[set[str]] = []
    keeper = LeaseKeeper(engine, worker="w#1", lease_s=30, holdings=holdings)
    keeper.on_lost = lost.append
    assert keeper.renew() == 1 and lost == []
    with engine.begin() as conn:
        transitions.cancel(conn, job_ids=[job_id])
    assert keeper.renew() == 0
    assert lost == [{job_id}] and holdings.is_lost(job_id)

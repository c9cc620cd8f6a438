"""Lease renewal: a live worker keeps its jobs; only a dead worker's leases expire and get reaped."""

from __future__ import annotations

import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select, update

from farm.store import transitions
from farm.store.engine import ensure_schema, make_engine
from farm.store.schema import Dataset, Job, utcnow
from workers.heartbeat import LeaseKeeper


def test_renewal_keeps_a_live_workers_jobs_from_the_reaper(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    ids = [uuid.uuid4().hex for _ in range(3)]
    with engine.begin() as conn:
        conn.execute(Dataset.__table__.insert().values(id=1, name="d", created_at=utcnow()))
        conn.execute(
            Job.__table__.insert(),
            [
                dict(
                    id=i,
                    dataset_id=1,
                    prompt="p",
                    seed=n,
                    width=64,
                    height=64,
                    num_inference_steps=4,
                    guidance_scale=0.0,
                    model="tiny",
                    status="pending",
                    attempts=0,
                    created_at=utcnow(),
                )
                for n, i in enumerate(ids)
            ],
        )
        transitions.claim(conn, ids[:2], worker="alive", lease_s=30, max_attempts=3)
        transitions.claim(conn, ids[2:], worker="dead", lease_s=30, max_attempts=3)
        # Time passes: every lease is about to run out.
        conn.execute(update(Job).values(lease_expires_at=utcnow() - timedelta(seconds=1)))

    keeper = LeaseKeeper(engine, worker="alive", lease_s=30)
    assert keeper.renew() == 2
    with engine.begin() as conn:
        reaped = transitions.reap_expired(conn, max_attempts=3)
        leases = dict(conn.execute(select(Job.id, Job.lease_expires_at).where(Job.id.in_(ids[:2]))).all())
    assert (reaped.requeued, reaped.failed) == ([ids[2]], [])
    assert all(expires > utcnow() + timedelta(seconds=20) for expires in leases.values())


def test_the_keeper_thread_renews_periodically(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    keeper = LeaseKeeper(engine, worker="w", lease_s=1).start()  # renews every 1/3 s
    try:
        import time

        deadline = time.monotonic() + 10
        while keeper.renewals < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        keeper.stop()
    assert keeper.renewals >= 2

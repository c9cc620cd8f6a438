"""Dispatch as a window, on PostgreSQL and a real Redis: bounded per queue, topped up as workers drain it, two
dispatchers never sending one job twice, messages a broker lost sent again; and the control loop's leader lease."""

from __future__ import annotations

import base64
import json
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from farm.dispatch.broker import make_celery
from farm.dispatch.publish import dispatch_pending, resend_lost
from farm.settings import Settings, load_settings
from farm.store import control, transitions
from farm.store.engine import make_engine
from farm.store.schema import Control, Dataset, Job, JobStatus, utcnow
from tests.support.jobs import insert_jobs

pytestmark = pytest.mark.integration


@pytest.fixture()
def engine(own_pg_url: str) -> Iterator[Engine]:
    eng = make_engine(own_pg_url)
    yield eng
    eng.dispose()


def _settings(tmp_path: Path, url: str, redis_url: str, queue: str, **extra: object) -> Settings:
    return load_settings(
        {}, home=str(tmp_path), database_url=url, broker_url=redis_url, queue=queue, batch_size=4, **extra
    )


def _jobs(engine: Engine, n: int) -> list[str]:
    return insert_jobs(engine, n, dataset="d")


def _queued_ids(redis_url: str, queue: str) -> Counter[str]:
    """Every job id in the messages waiting on a Redis queue (all priority levels), counted."""
    client = redis.Redis.from_url(redis_url)
    found: Counter[str] = Counter()
    for key in client.keys(f"{queue}*"):
        if client.type(key) != b"list":
            continue
        for raw in client.lrange(key, 0, -1):
            message = json.loads(raw)
            args = json.loads(base64.b64decode(message["body"]))[0]
            found.update(args[0])
    return found


def _statuses(engine: Engine) -> Counter[str]:
    with engine.connect() as conn:
        return Counter(conn.execute(select(Job.status)).scalars())


def test_the_broker_holds_a_window_and_dispatch_tops_it_up(
    tmp_path: Path, engine: Engine, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    settings = _settings(tmp_path, own_pg_url, redis_url, queue_name, dispatch_window=6)
    ids = _jobs(engine, 20)
    app = make_celery(settings)
    sent = dispatch_pending(engine, app, settings)
    assert (sent.jobs, sent.waiting) == (6, True)
    assert _statuses(engine) == {"pending": 14, "queued": 6}
    assert sum(_queued_ids(redis_url, queue_name).values()) == 6
    assert dispatch_pending(engine, app, settings).jobs == 0  # full: nothing more until workers drain it
    with engine.begin() as conn:  # a worker takes four of them
        queued = conn.execute(select(Job.id).where(Job.status == "queued")).scalars().all()
        assert len(transitions.claim(conn, queued[:4], worker="w#1", lease_s=60, max_attempts=3)) == 4
    assert dispatch_pending(engine, app, settings).jobs == 4
    assert _statuses(engine) == {"pending": 10, "queued": 6, "running": 4}
    assert set(_queued_ids(redis_url, queue_name)) <= set(ids)


def test_two_dispatchers_at_once_never_send_one_job_twice(
    tmp_path: Path, engine: Engine, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    settings = _settings(tmp_path, own_pg_url, redis_url, queue_name)
    ids = _jobs(engine, 3000)
    barrier = threading.Barrier(2)
    results: list[int] = []

    def dispatcher() -> None:
        own = make_engine(own_pg_url)
        barrier.wait()
        results.append(dispatch_pending(own, make_celery(settings), settings).jobs)
        own.dispose()

    threads = [threading.Thread(target=dispatcher) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    sent = _queued_ids(redis_url, queue_name)
    assert sum(results) == sum(sent.values()) == settings.dispatch_window  # the window, taken once between them
    assert set(sent.values()) == {1} and set(sent) <= set(ids)


def test_messages_a_broker_lost_are_sent_again_and_a_duplicate_claims_nothing(
    tmp_path: Path, engine: Engine, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    settings = _settings(tmp_path, own_pg_url, redis_url, queue_name)
    ids = _jobs(engine, 8)
    app = make_celery(settings)
    assert dispatch_pending(engine, app, settings).jobs == 8
    with engine.begin() as conn:  # one job is claimed meanwhile; it is not sent again
        transitions.claim(conn, ids[:1], worker="w#1", lease_s=60, max_attempts=3)
    assert resend_lost(engine, app, settings, grace_s=0) == 0  # the queue still holds its messages
    client = redis.Redis.from_url(redis_url)
    for key in client.keys(f"{queue_name}*"):
        client.delete(key)  # what a Redis restart without persistence does
    assert resend_lost(engine, app, settings, grace_s=0) == 7
    assert sorted(_queued_ids(redis_url, queue_name)) == sorted(ids[1:])
    assert resend_lost(engine, app, settings, grace_s=5) == 0  # just sent: not again before the grace
    with engine.begin() as conn:
        assert transitions.claim(conn, ids[:1], worker="w#2", lease_s=60, max_attempts=3) == []


def test_a_queued_job_unclaimed_for_a_lease_is_sent_again_even_beside_other_messages(
    tmp_path: Path, engine: Engine, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    settings = _settings(tmp_path, own_pg_url, redis_url, queue_name, lease_s=30)
    ids = _jobs(engine, 2)
    app = make_celery(settings)
    dispatch_pending(engine, app, settings)
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == ids[0]).values(queued_at=utcnow() - timedelta(seconds=31)))
    assert resend_lost(engine, app, settings, grace_s=0) == 1
    assert _queued_ids(redis_url, queue_name)[ids[0]] == 2


def test_paused_datasets_stay_out_of_the_window(
    tmp_path: Path, engine: Engine, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    settings = _settings(tmp_path, own_pg_url, redis_url, queue_name)
    _jobs(engine, 4)
    with engine.begin() as conn:
        ds = conn.execute(select(Dataset.id)).scalar_one()
        transitions.set_paused(conn, ds, True)
    assert dispatch_pending(engine, make_celery(settings), settings).jobs == 0
    assert _statuses(engine) == {JobStatus.PENDING.value: 4}


def test_one_leader_at_a_time_and_another_takes_over_when_it_stops_renewing(engine: Engine) -> None:
    with engine.begin() as conn:
        assert control.acquire(conn, control.REAPER, holder="a#1", ttl_s=30)
        assert not control.acquire(conn, control.REAPER, holder="b#2", ttl_s=30)
        assert control.acquire(conn, control.REAPER, holder="a#1", ttl_s=30)  # renewing
        control.ran(conn, control.REAPER, holder="a#1", note="reaped 0")
        conn.execute(update(Control).values(expires_at=utcnow() - timedelta(seconds=1)))  # a#1 died
        assert control.acquire(conn, control.REAPER, holder="b#2", ttl_s=30)
        control.ran(conn, control.REAPER, holder="a#1", note="a late round")  # not the holder: not recorded
    state = control.duty_state(engine)
    assert (state.holder, state.note) == ("b#2", "reaped 0")
    assert control.silence_warning(engine, 600, unfinished=True) is None
    with engine.begin() as conn:
        conn.execute(update(Control).values(last_run_at=utcnow() - timedelta(minutes=10)))
    warning = control.silence_warning(engine, 600, unfinished=True)
    assert warning is not None and "has not run for 6" in warning
    assert control.silence_warning(engine, 600, unfinished=False) is None

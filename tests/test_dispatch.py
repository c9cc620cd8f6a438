"""Dispatch as a window, on PostgreSQL and a real Redis: bounded per queue, topped up as workers drain it, two
dispatchers never sending one job twice, messages a broker lost sent again; and the control loop's leader lease."""

from __future__ import annotations

import base64
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from farm.dispatch.broker import make_celery
from farm.dispatch.publish import dispatch_pending, resend_lost
from farm.dispatch.routing import REFILL_S, WINDOW_TASKS, Router
from farm.settings import Settings, load_settings
from farm.store import control, fleet, transitions
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
    # The window (one worker's share: no worker is alive), taken once between them.
    assert sum(results) == sum(sent.values()) == Router.load(engine, settings).window(queue_name, 4, 1024)
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


def _beat(engine: Engine, name: str, *, pool: str | None = None, images_per_s: float = 0.0) -> None:
    with engine.begin() as conn:
        fleet.beat(conn, fleet.Heartbeat(name, pool, "host", 1, "cpu", None, {}, 0, images_per_s, utcnow()))


def test_the_window_is_sized_from_the_live_workers(
    tmp_path: Path, engine: Engine, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    settings = _settings(tmp_path, own_pg_url, redis_url, queue_name)  # tasks of 4 jobs
    _jobs(engine, 200)
    app = make_celery(settings)
    # No live worker: one worker's share, WINDOW_TASKS tasks.
    assert dispatch_pending(engine, app, settings).jobs == WINDOW_TASKS * 4
    # Two workers: two shares; one renders 10 images/s, so it gets what it renders in REFILL_S seconds and a task.
    _beat(engine, "slow#1")
    _beat(engine, "fast#2", images_per_s=10.0)
    router = Router.load(engine, settings)
    fast = 4 * (1 + math.ceil(10.0 * REFILL_S / 4))
    assert router.window(queue_name, 4, settings.dispatch_window) == WINDOW_TASKS * 4 + fast
    assert dispatch_pending(engine, app, settings).jobs == fast  # topped up to the larger window
    assert _statuses(engine)["queued"] == WINDOW_TASKS * 4 + fast
    # FARM_DISPATCH_WINDOW caps it.
    assert router.window(queue_name, 4, 10) == 10
    # A queue the leader saw drain faster than the heartbeats say (they lag by a beat) gets what it drains in
    # REFILL_S seconds and a task.
    router.drains = {queue_name: 25.0}
    assert router.window(queue_name, 4, 1024) == 4 * (1 + math.ceil(25.0 * REFILL_S / 4))


def test_the_leader_sends_new_jobs_and_refills_the_window_between_rounds(
    tmp_path: Path, engine: Engine, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    from workers.control import ControlLoop

    settings = _settings(tmp_path, own_pg_url, redis_url, queue_name)
    loop = ControlLoop(engine, make_celery(settings), settings, holder="leader#1")
    assert loop.run_once()  # leads; nothing to send yet
    assert loop.tick() == 0  # nothing new, nothing waiting: a tick sends nothing (and costs one index probe)
    low = insert_jobs(engine, 20, dataset="low")  # what `farm submit` records
    assert loop.tick() == WINDOW_TASKS * 4  # sent at the next tick, not the next round
    assert loop.tick() == 0  # the window is full
    high = insert_jobs(engine, 20, dataset="high")
    with engine.begin() as conn:
        conn.execute(update(Dataset).where(Dataset.name == "high").values(priority=9))
        queued = conn.execute(select(Job.id).where(Job.status == "queued")).scalars().all()
        assert set(queued) <= set(low)
        assert len(transitions.claim(conn, queued[:4], worker="w#1", lease_s=60, max_attempts=3)) == 4
    # Room for a task (and, the queue having drained 4 jobs since the last look, a larger window): the higher
    # priority goes first.
    sent = loop.tick()
    assert sent >= 4 and loop.drains[queue_name] > 0
    with engine.connect() as conn:
        queued = set(conn.execute(select(Job.id).where(Job.status == "queued")).scalars())
    assert len(queued & set(high)) == sent and len(queued & set(low)) == 4


def test_the_leader_counts_pending_jobs_per_pool_for_status(
    tmp_path: Path, engine: Engine, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    from farm.dispatch.backlog import refresh_backlog
    from farm.store.queries import all_statuses

    pools = {"small": {"models": ["tiny"], "max_pixels": 64 * 64}, "big": {}}
    settings = replace(_settings(tmp_path, own_pg_url, redis_url, queue_name), pools=pools)
    insert_jobs(engine, 5, dataset="d")  # 64 px tiny jobs: both pools serve them
    assert [s.pending_per_pool for s in all_statuses(engine)] == [None]  # nobody has counted them
    _beat(engine, "w#1", pool="big")  # only "big" is alive: it takes them
    assert refresh_backlog(engine, settings, holder="leader#1", ttl_s=30) is not None
    [status] = all_statuses(engine)
    assert status.pending_per_pool == {"big": 5} and status.as_dict()["pending_per_pool"] == {"big": 5}
    assert control.pending_per_pool(engine) == {"big": 5, "small": 0}
    with engine.begin() as conn:
        conn.execute(update(Dataset).values(paused=True))
    refresh_backlog(engine, settings, holder="leader#1", ttl_s=30)
    assert control.pending_per_pool(engine) == {"big": 0, "small": 0}  # paused work is not waiting for a pool
    assert refresh_backlog(engine, settings, holder="other#2", ttl_s=30) is None  # one counter at a time
    with engine.begin() as conn:  # the counter stopped long ago
        conn.execute(
            update(Control).where(Control.name == control.BACKLOG).values(last_run_at=utcnow() - timedelta(hours=1))
        )
    assert control.pending_per_pool(engine) is None


def test_a_starting_worker_s_loop_sends_at_once_not_after_a_round(
    tmp_path: Path, engine: Engine, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    from workers.control import ControlLoop

    settings = _settings(tmp_path, own_pg_url, redis_url, queue_name)  # rounds every 10 s, ticks every second
    insert_jobs(engine, 4, dataset="waiting")  # recorded while no worker ran
    loop = ControlLoop(engine, make_celery(settings), settings, holder="starting#1")
    assert loop.interval_s == 10.0 and loop.tick_s == 1.0
    started = time.monotonic()
    loop.start()
    try:
        while _statuses(engine).get("queued", 0) < 4 and time.monotonic() - started < 8:
            time.sleep(0.1)
        assert _statuses(engine) == {"queued": 4}, "the first round runs as the loop starts"
        insert_jobs(engine, 3, dataset="later")  # recorded between rounds: sent at a tick
        while _statuses(engine).get("queued", 0) < 7 and time.monotonic() - started < 9:
            time.sleep(0.1)
        assert _statuses(engine) == {"queued": 7} and loop.rounds == 1 and loop.top_ups == 1
    finally:
        loop.stop()

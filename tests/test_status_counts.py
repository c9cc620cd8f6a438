"""job_counts: `farm status` reads per-dataset counts that triggers on jobs keep exact, on SQLite and PostgreSQL.

After every kind of transition, under concurrent transitions on PostgreSQL, after `farm db recount` and after the
0010 migration of an existing store, the counts equal a GROUP BY over the jobs.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from click.testing import CliRunner
from sqlalchemy import create_engine, delete, func, inspect, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import OperationalError

from farm.cli import main
from farm.job import Claimed
from farm.storage import StoredObject
from farm.store import counts, transitions
from farm.store.counts import UNROUTABLE, counted_jobs, recount, stored_counts
from farm.store.engine import current_revision, head_revision, make_engine, normalize_url, upgrade
from farm.store.queries import all_statuses, dataset_status
from farm.store.schema import Dataset, Job, JobCount, JobStatus, utcnow
from farm.submit.inputs import rows_from_records
from farm.submit.plan import SubmitOptions, plan_rows
from farm.submit.record import record
from tests.support.jobs import insert_jobs

STORED = StoredObject(uri="file:///x.png", key="x.png", sha256="ab" * 32, bytes=10)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A store at the current schema: SQLite (sqlite_engine) or a PostgreSQL database of this test's own."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_engine")
        return
    eng = make_engine(request.getfixturevalue("own_pg_url"))
    yield eng
    eng.dispose()


@pytest.fixture()
def pg(own_pg_url: str) -> Iterator[Engine]:
    eng = make_engine(own_pg_url)
    yield eng
    eng.dispose()


def _ds(engine: Engine, name: str) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar_one())


def assert_exact(engine: Engine) -> dict[str, dict[str, int]]:
    """Every dataset's job_counts equal a GROUP BY over its jobs, and `farm status` shows them; returns them."""
    found: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for ds_id, name, ready in conn.execute(select(Dataset.id, Dataset.name, Dataset.counts_ready)):
            truth = counted_jobs(conn, ds_id)
            assert ready, name
            assert stored_counts(conn, ds_id) == truth, name
            found[name] = truth
        orphans = conn.execute(
            select(func.count()).select_from(JobCount).where(JobCount.dataset_id.not_in(select(Dataset.id)))
        ).scalar_one()
    assert orphans == 0
    for status in all_statuses(engine):
        expected = {s.value: found[status.name].get(s.value, 0) for s in JobStatus}
        assert status.counts == expected
        assert sum(status.unroutable.values()) == found[status.name].get(UNROUTABLE, 0)
    return found


def _corrupt(engine: Engine, name: str, rows: list[tuple[str, int, int]]) -> None:
    """Replace a dataset's job_counts with these (key, stripe, n) rows."""
    ds = _ds(engine, name)
    with engine.begin() as conn:
        conn.execute(delete(JobCount).where(JobCount.dataset_id == ds))
        for key, stripe, n in rows:
            conn.execute(JobCount.__table__.insert().values(dataset_id=ds, status=key, stripe=stripe, n=n))


def _plan(dataset: str, prompts: list[str], images: int = 2) -> Any:
    return plan_rows(
        rows_from_records(prompts),
        SubmitOptions(dataset=dataset, model="tiny", images_per_prompt=images),
        base_dir=None,
    )


def _expire(engine: Engine, job_ids: list[str]) -> None:
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id.in_(job_ids)).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


def test_every_transition_keeps_the_counts_exact(engine: Engine) -> None:
    first = record(engine, _plan("d", ["a", "b", "c", "d", "e", "f"]))
    assert first.new_jobs == 12
    assert assert_exact(engine)["d"] == {"pending": 12}
    # A duplicate submit inserts nothing (ON CONFLICT DO NOTHING) and counts nothing; an appended line adds 2.
    again = record(engine, _plan("d", ["a", "b", "c", "d", "e", "f", "g"]))
    assert (again.new_jobs, again.already_present) == (2, 12)
    assert assert_exact(engine)["d"] == {"pending": 14}
    other = insert_jobs(engine, 3, dataset="other")  # a plain INSERT counts the same way
    with engine.connect() as conn:
        ids = sorted(conn.execute(select(Job.id).where(Job.dataset_id == first.dataset_id)).scalars())

    def step(change: Any) -> dict[str, int]:
        with engine.begin() as conn:
            change(conn)
        return assert_exact(engine)["d"]

    # Dispatch: queued, a message that never reached the broker back to pending, resent, unroutable noted.
    assert step(lambda c: transitions.mark_queued(c, ids[:8], queue="q")) == {"pending": 6, "queued": 8}
    assert step(lambda c: transitions.mark_pending(c, ids[6:8])) == {"pending": 8, "queued": 6}
    assert step(lambda c: transitions.resend_stale(c, queue="q", sent_before=utcnow(), limit=10)) == {
        "pending": 8,
        "queued": 6,
    }
    assert step(lambda c: transitions.note_unroutable(c, ids[12:], "no pool serves tiny")) == {
        "pending": 8,
        "queued": 6,
        UNROUTABLE: 2,
    }
    assert dataset_status(engine, "d").unroutable == {"no pool serves tiny": 2}
    # The leader notes them again every round: the same reason rewrites nothing, a new one each note.
    with engine.begin() as conn:
        assert transitions.note_unroutable(conn, ids[12:], "no pool serves tiny") == 0
        assert transitions.note_unroutable(conn, ids[12:], "no pool serves tiny at 64x64") == 2
    assert dataset_status(engine, "d").unroutable == {"no pool serves tiny at 64x64": 2}
    # Claims: queued and pending (an unroutable one too: it leaves the unroutable count).
    claimed = {}

    def claim(c: Connection) -> None:
        for job in transitions.claim(c, [*ids[:6], ids[13]], worker="w#1", lease_s=60, max_attempts=2):
            claimed[job.id] = job.claim_seq

    assert step(claim) == {"pending": 7, "running": 7, UNROUTABLE: 1}
    assert step(lambda c: transitions.renew_leases(c, worker="w#1", held=list(claimed.items()), lease_s=60)) == {
        "pending": 7,
        "running": 7,
        UNROUTABLE: 1,
    }
    # A batch recorded in one transaction: two successes, a failure that is retried, one out of attempts.
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == ids[3]).values(attempts=2))

    def batch(c: Connection) -> None:
        done = [(ids[0], claimed[ids[0]], STORED, 5), (ids[1], claimed[ids[1]], STORED, 5)]
        assert transitions.mark_succeeded_many(c, done, worker="w#1", recipes={ids[0]: "{}"}) == set(ids[:2])
        assert (
            transitions.mark_attempt_failed(c, ids[2], worker="w#1", seq=claimed[ids[2]], error="x", max_attempts=2)
            == JobStatus.QUEUED
        )
        assert (
            transitions.mark_attempt_failed(c, ids[3], worker="w#1", seq=claimed[ids[3]], error="x", max_attempts=2)
            == JobStatus.FAILED
        )

    after_batch = {"pending": 7, "queued": 1, "running": 3, "succeeded": 2, "failed": 1, UNROUTABLE: 1}
    assert step(batch) == after_batch
    # A late duplicate of the same results changes nothing.

    def late(c: Connection) -> None:
        assert not transitions.mark_succeeded(c, ids[0], worker="w#1", seq=claimed[ids[0]], stored=STORED, render_ms=1)

    assert step(late) == after_batch
    # A SIGTERM's release, then a lease that expires: the reaper sends one back and fails the other.
    assert step(lambda c: transitions.release(c, worker="w#1", held=[(ids[4], claimed[ids[4]])])) == {
        "pending": 8,
        "queued": 1,
        "running": 2,
        "succeeded": 2,
        "failed": 1,
        UNROUTABLE: 1,
    }
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == ids[13]).values(attempts=2))
    _expire(engine, [ids[5], ids[13]])
    reaped: list[transitions.Reaped] = []
    assert step(lambda c: reaped.append(transitions.reap_expired(c, max_attempts=2))) == {
        "pending": 9,
        "queued": 1,
        "succeeded": 2,
        "failed": 2,
        UNROUTABLE: 1,
    }
    assert (reaped[0].requeued, reaped[0].failed) == ([ids[5]], [ids[13]])
    # Pause (queued back to pending), cancel one job, then the whole dataset.
    assert step(lambda c: transitions.requeue_queued(c, first.dataset_id)) == {
        "pending": 10,
        "succeeded": 2,
        "failed": 2,
        UNROUTABLE: 1,
    }
    assert step(lambda c: transitions.cancel(c, job_ids=[ids[12]])) == {
        "pending": 9,
        "succeeded": 2,
        "failed": 2,
        "canceled": 1,
    }
    assert step(lambda c: transitions.cancel(c, dataset_id=first.dataset_id)) == {
        "succeeded": 2,
        "failed": 2,
        "canceled": 10,
    }
    # Retry: failed, then canceled, back to pending.
    # (A retried job keeps its routing note until dispatch sends it: unroutable again, as `farm status` said before.)
    assert step(lambda c: transitions.retry_finished(c, first.dataset_id, JobStatus.FAILED)) == {
        "pending": 2,
        "succeeded": 2,
        "canceled": 10,
        UNROUTABLE: 1,
    }
    assert step(lambda c: transitions.retry_finished(c, first.dataset_id, JobStatus.CANCELED)) == {
        "pending": 12,
        "succeeded": 2,
        UNROUTABLE: 2,
    }
    assert dataset_status(engine, "d").counts["pending"] == 12
    # Deleting jobs, then a dataset with its jobs (CASCADE): its counts go, the other dataset's stay.
    assert step(lambda c: c.execute(delete(Job).where(Job.id.in_(ids[:3])))) == {"pending": 11, UNROUTABLE: 2}
    with engine.begin() as conn:
        conn.execute(delete(Dataset).where(Dataset.id == first.dataset_id))
    assert assert_exact(engine) == {"other": {"pending": 3}}
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(JobCount)).scalar_one() == 1
    assert len(other) == 3


def test_a_rolled_back_transition_leaves_the_counts_alone(engine: Engine) -> None:
    ids = insert_jobs(engine, 5, dataset="d")
    with pytest.raises(RuntimeError), engine.begin() as conn:
        transitions.claim(conn, ids, worker="w#1", lease_s=60, max_attempts=3)
        raise RuntimeError("the worker died before commit")
    assert assert_exact(engine)["d"] == {"pending": 5}


def test_status_reads_the_counts_and_recount_repairs_them(engine: Engine) -> None:
    ids = insert_jobs(engine, 6, dataset="d")
    insert_jobs(engine, 2, dataset="e")
    with engine.begin() as conn:
        transitions.claim(conn, ids[:2], worker="w#1", lease_s=60, max_attempts=3)
    # Corrupt: a wrong count, a count in another stripe, a state that does not exist, unroutable jobs that are not.
    _corrupt(
        engine, "d", [("pending", 0, 100), ("running", 3, 2), ("running", 7, 3), ("bogus", 2, 4), (UNROUTABLE, 1, 1)]
    )
    status = dataset_status(engine, "d")
    assert (status.counts["pending"], status.counts["running"], status.counts["bogus"]) == (100, 5, 4)
    (fixed,) = recount(engine, "d")
    assert fixed.changes == {"pending": -96, "running": -3, "bogus": -4, UNROUTABLE: -1}
    assert fixed.describe() == "d: 6 jobs, fixed bogus -4, pending -96, running -3, unroutable -1"
    assert assert_exact(engine) == {"d": {"pending": 4, "running": 2}, "e": {"pending": 2}}
    assert [r.describe() for r in recount(engine)] == ["d: 6 jobs, counts were right", "e: 2 jobs, counts were right"]
    assert dataset_status(engine, "d").counts == {
        "pending": 4,
        "queued": 0,
        "running": 2,
        "succeeded": 0,
        "failed": 0,
        "canceled": 0,
    }


def _cli(engine: Engine, tmp_path: Path, *args: str) -> Any:
    url = engine.url.render_as_string(hide_password=False)
    env = {"FARM_DATABASE_URL": url} if engine.dialect.name == "postgresql" else {"FARM_HOME": str(tmp_path)}
    return CliRunner().invoke(main, list(args), env=env)


def test_farm_db_recount_repairs_a_corrupted_counts_table(engine: Engine, tmp_path: Path) -> None:
    if engine.dialect.name == "sqlite":  # the embedded default: its store under FARM_HOME
        engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
        upgrade(engine)
    ids = insert_jobs(engine, 4, dataset="doors")
    insert_jobs(engine, 1, dataset="windows")
    with engine.begin() as conn:
        transitions.cancel(conn, job_ids=ids[:1])
    _corrupt(engine, "doors", [("pending", 0, 4), ("pending", 9, 4)])  # canceled lost, pending +5
    _corrupt(engine, "windows", [("pending", 4, 6)])
    result = _cli(engine, tmp_path, "db", "recount", "--dataset", "doors")
    assert result.exit_code == 0, result.output
    assert result.output == "doors: 4 jobs, fixed canceled +1, pending -5\n"
    result = _cli(engine, tmp_path, "db", "recount")
    assert result.exit_code == 0, result.output
    assert result.output == "doors: 4 jobs, counts were right\nwindows: 1 jobs, fixed pending -5\n"
    assert assert_exact(engine) == {"doors": {"pending": 3, "canceled": 1}, "windows": {"pending": 1}}
    result = _cli(engine, tmp_path, "db", "recount", "--dataset", "nope")
    assert result.exit_code == 2 and "no dataset named 'nope'" in result.output
    engine.dispose()


def test_a_copy_and_a_truncate_are_counted_on_postgresql(pg: Engine) -> None:
    """A bulk load by COPY (as `farm bench submit` does) fires the insert trigger once for all its rows."""
    insert_jobs(pg, 1, dataset="d")
    ds = _ds(pg, "d")
    with pg.begin() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        columns = "id, dataset_id, prompt, seed, width, height, num_inference_steps, guidance_scale, model, status"
        with cursor.copy(f"COPY jobs ({columns}, attempts, created_at, routing_note) FROM STDIN") as copy:
            for k in range(500):
                state = ("pending", "queued", "succeeded", "failed")[k % 4]
                note = "no pool" if k % 8 == 0 else None
                copy.write_row((f"c{k}", ds, "p", k, 64, 64, 4, 0.0, "tiny", state, 0, utcnow(), note))
    assert assert_exact(pg)["d"] == {"pending": 126, "queued": 125, "succeeded": 125, "failed": 125, UNROUTABLE: 63}
    with pg.begin() as conn:
        conn.execute(text("TRUNCATE jobs"))
    assert assert_exact(pg) == {"d": {}}


# ---- the 0010 migration ---------------------------------------------------------------------------------------


def _config(engine: Engine) -> Config:
    import migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.attributes["engine"] = engine
    return config


def _fill_a_0009_store(engine: Engine) -> None:
    """Datasets in every state, as a store of revision 0009 holds them (no job_counts yet)."""
    states = ["pending"] * 5 + ["queued"] * 3 + ["running"] * 2 + ["succeeded"] * 7 + ["failed", "canceled"]
    with engine.begin() as conn:
        for ds_id, name, jobs in ((1, "a", states), (2, "b", states[:4] + states[-3:]), (3, "empty", [])):
            conn.execute(
                text("INSERT INTO datasets (id, name, created_at) VALUES (:id, :name, :at)"),
                {"id": ds_id, "name": name, "at": utcnow()},
            )
            for k, state in enumerate(jobs):
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, dataset_id, prompt, seed, width, height, num_inference_steps,"
                        " guidance_scale, model, status, attempts, created_at, routing_note) VALUES (:id, :ds, 'p',"
                        " :k, 64, 64, 4, 0.0, 'tiny', :state, 0, :at, :note)"
                    ),
                    {
                        "id": f"{name}-{k}",
                        "ds": ds_id,
                        "k": k,
                        "state": state,
                        "at": utcnow(),
                        "note": "no pool" if k == 0 else None,
                    },
                )


def _store_at_0009(engine: Engine) -> None:
    """The fixture's store is at head: 0010's downgrade takes it back to 0009 (so that is tested too)."""
    command.downgrade(_config(engine), "0009")
    assert current_revision(engine) == "0009"
    tables = inspect(engine).get_table_names()
    assert "jobs" in tables and "job_counts" not in tables
    assert "counts_ready" not in {c["name"] for c in inspect(engine).get_columns("datasets")}


def test_the_migration_backfills_an_existing_store(engine: Engine) -> None:
    _store_at_0009(engine)
    _fill_a_0009_store(engine)
    upgrade(engine)
    assert current_revision(engine) == head_revision() == "0011"
    found = assert_exact(engine)
    assert found == {
        "a": {"pending": 5, "queued": 3, "running": 2, "succeeded": 7, "failed": 1, "canceled": 1, UNROUTABLE: 1},
        "b": {"pending": 4, "succeeded": 1, "failed": 1, "canceled": 1, UNROUTABLE: 1},
        "empty": {},
    }
    # And the triggers count from there on.
    with engine.begin() as conn:
        transitions.claim(conn, ["a-0", "a-5"], worker="w#1", lease_s=60, max_attempts=3)
        transitions.cancel(conn, dataset_id=2)
    assert assert_exact(engine)["b"] == {"succeeded": 1, "failed": 1, "canceled": 5}


def test_a_large_postgresql_store_is_counted_after_the_migration_without_blocking_writers(
    pg: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above INLINE_BACKFILL_MAX_JOBS the migration only marks the datasets; status counts their jobs until
    `farm db recount` backfills them, while transitions go on in between."""
    _store_at_0009(pg)
    _fill_a_0009_store(pg)
    monkeypatch.setattr(counts, "INLINE_BACKFILL_MAX_JOBS", 10)
    upgrade(pg)
    with pg.connect() as conn:
        ready = dict(conn.execute(select(Dataset.name, Dataset.counts_ready)).all())
        assert conn.execute(select(func.count()).select_from(JobCount)).scalar_one() == 0
    assert ready == {"a": False, "b": False, "empty": True}
    assert dataset_status(pg, "a").counts == {
        "pending": 5,
        "queued": 3,
        "running": 2,
        "succeeded": 7,
        "failed": 1,
        "canceled": 1,
    }
    assert dataset_status(pg, "a").unroutable == {"no pool": 1}
    with pg.begin() as conn:  # counted by the triggers already: the backfill must not count them twice
        transitions.claim(conn, ["a-0", "a-5", "b-1"], worker="w#1", lease_s=60, max_attempts=3)
        transitions.cancel(conn, job_ids=["a-1"])
    assert dataset_status(pg, "a").counts["running"] == 4
    done = {r.dataset: r for r in recount(pg)}
    # What it adds is what the jobs were at the migration: the claims and the cancel were counted by the triggers.
    assert done["a"].changes == {
        "pending": 5,
        "queued": 3,
        "running": 2,
        "succeeded": 7,
        "failed": 1,
        "canceled": 1,
        UNROUTABLE: 1,
    }
    assert done["empty"].changes == {}
    assert assert_exact(pg)["a"] == {
        "pending": 3,
        "queued": 2,
        "running": 4,
        "succeeded": 7,
        "failed": 1,
        "canceled": 2,
    }


# ---- concurrency on PostgreSQL ------------------------------------------------------------------------------------


def _run_threads(targets: list[Any]) -> list[BaseException]:
    errors: list[BaseException] = []

    def run(target: Any) -> None:
        try:
            target()
        except BaseException as exc:  # reported by the test
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return errors


T = TypeVar("T")


def _transaction(engine: Engine, change: Callable[[Connection], T]) -> T:
    """``change`` in a transaction of its own, run again after a deadlock, as the farm's callers do (a claim's
    message comes again, a batch is recorded with the next heartbeat).

    The transitions' UPDATEs of jobs rows can deadlock with each other (a bulk cancel locks a dataset's rows in
    another order than a claim's id list); that is older than job_counts and happens without its triggers too.
    The counts add no deadlock: each transaction adds into a stripe that no other one writes, so nothing waits on
    a counts row here (fewer than 16 transactions at once). Checked: every deadlock is on a jobs row.
    """
    while True:
        try:
            with engine.begin() as conn:
                return change(conn)
        except OperationalError as exc:
            if not isinstance(exc.orig, psycopg.errors.DeadlockDetected):
                raise
            assert 'in relation "jobs"' in str(exc.orig), exc.orig


def _worker(engine: Engine, ids: list[str], name: str, seed: int, rounds: int = 0, until: Any = None) -> Any:
    """A worker: claims random (overlapping) jobs, then records a batch in one transaction: successes, failures
    (retried or final) and releases. ``rounds`` times, or until the event ``until`` is set."""

    def loop() -> None:
        rng = random.Random(seed)
        done = 0
        while (done < rounds) if until is None else not until.is_set():
            done += 1
            wanted = sorted(rng.sample(ids, 12))
            claim = partial(transitions.claim, job_ids=wanted, worker=name, lease_s=60, max_attempts=3)
            held = _transaction(engine, claim)
            outcomes = [(job, rng.random()) for job in held]

            def record_batch(conn: Connection, outcomes: list[tuple[Claimed, float]] = outcomes) -> None:
                for job, roll in outcomes:
                    if roll < 0.4:
                        transitions.mark_succeeded(
                            conn, job.id, worker=name, seq=job.claim_seq, stored=STORED, render_ms=1
                        )
                    elif roll < 0.8:
                        transitions.mark_attempt_failed(
                            conn, job.id, worker=name, seq=job.claim_seq, error="x", max_attempts=3
                        )
                    else:
                        transitions.release(conn, worker=name, held=[job.held])

            _transaction(engine, record_batch)

    return loop


def test_concurrent_workers_keep_the_counts_exact(pg: Engine) -> None:
    a = insert_jobs(pg, 200, dataset="a")
    b = insert_jobs(pg, 200, dataset="b")
    ds_a = _ds(pg, "a")
    every = a + b

    def dispatcher() -> None:
        rng = random.Random(99)
        for _ in range(40):
            offered = sorted(rng.sample(every, 40))
            _transaction(pg, partial(transitions.mark_queued, job_ids=offered, queue="q"))
            _transaction(pg, lambda c: transitions.retry_finished(c, ds_a, JobStatus.FAILED))

    workers = [_worker(pg, every, f"w#{k}", seed=k, rounds=30) for k in range(7)]
    errors = _run_threads([*workers, dispatcher])
    assert errors == []
    found = assert_exact(pg)
    assert sum(found["a"].values()) == sum(found["b"].values()) == 200
    with pg.connect() as conn:
        stripes = conn.execute(select(func.count(func.distinct(JobCount.stripe)))).scalar_one()
    assert stripes > 1  # concurrent transactions added to different rows


def test_bulk_cancel_and_retry_racing_with_claims(pg: Engine) -> None:
    ids = insert_jobs(pg, 300, dataset="d")
    ds = _ds(pg, "d")
    stop = threading.Event()

    def canceller() -> None:
        try:
            for _ in range(25):
                _transaction(pg, lambda c: transitions.cancel(c, dataset_id=ds))
                _transaction(pg, lambda c: transitions.retry_finished(c, ds, JobStatus.CANCELED))
                _transaction(pg, lambda c: transitions.retry_finished(c, ds, JobStatus.FAILED))
        finally:
            stop.set()

    def claimer(name: str, seed: int) -> Any:
        def loop() -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                wanted = sorted(rng.sample(ids, 20))
                _transaction(pg, partial(transitions.claim, job_ids=wanted, worker=name, lease_s=60, max_attempts=3))

        return loop

    errors = _run_threads([canceller, *(claimer(f"w#{k}", k) for k in range(6))])
    assert errors == []
    assert sum(assert_exact(pg)["d"].values()) == 300


def test_recount_while_transitions_run_is_exact(pg: Engine) -> None:
    """The recount reads jobs and job_counts in one snapshot: a transition before it is in both, one after in
    neither, so it fixes exactly the corruption and nothing else, with no lock held against the workers."""
    ids = insert_jobs(pg, 300, dataset="d")
    ds = _ds(pg, "d")
    with pg.begin() as conn:
        conn.execute(JobCount.__table__.insert().values(dataset_id=ds, status="succeeded", stripe=15, n=1000))
    done = threading.Event()
    fixes: list[dict[str, int]] = []

    def recounter() -> None:
        try:
            for _ in range(15):
                fixes.append(recount(pg, "d")[0].changes)
                time.sleep(0.01)
        finally:
            done.set()

    errors = _run_threads([recounter, *(_worker(pg, ids, f"w#{k}", seed=k, until=done) for k in range(6))])
    assert errors == []
    assert fixes[0] == {"succeeded": -1000}
    assert all(fix == {} for fix in fixes[1:])
    assert sum(assert_exact(pg)["d"].values()) == 300


def test_more_concurrent_transactions_than_stripes_share_one_and_stay_exact(own_pg_url: str) -> None:
    """16 open transactions hold the 16 stripes; a 17th shares one and waits on its row locks, then goes on."""
    engine = create_engine(normalize_url(own_pg_url), pool_size=20, max_overflow=0)
    try:
        ids = insert_jobs(engine, 17, dataset="d")
        holders = [engine.connect() for _ in range(16)]
        stripes = set()
        for conn, job_id in zip(holders, ids, strict=False):
            conn.begin()
            assert len(transitions.claim(conn, [job_id], worker="w#1", lease_s=60, max_attempts=3)) == 1
            stripes.add(conn.execute(text("SELECT current_setting('farm.job_counts_stripe')")).scalar_one())
        assert len(stripes) == 16
        errors: list[BaseException] = []
        last = threading.Thread(target=lambda: errors.extend(_run_threads([lambda: _claim_one(engine, ids[16])])))
        last.start()
        time.sleep(0.5)
        assert last.is_alive()  # waiting for a stripe row an open transaction holds
        for conn in holders:
            conn.commit()
            conn.close()
        last.join(timeout=30)
        assert not last.is_alive() and errors == []
        assert assert_exact(engine)["d"] == {"running": 17}
    finally:
        engine.dispose()


def _claim_one(engine: Engine, job_id: str) -> None:
    with engine.begin() as conn:
        assert len(transitions.claim(conn, [job_id], worker="w#2", lease_s=60, max_attempts=3)) == 1

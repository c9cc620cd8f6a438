"""farm.store.queries: counts per state, throughput and ETA, and job listings, read from a real SQLite store."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import insert, update
from sqlalchemy.engine import Engine

from farm.errors import UnknownDataset
from farm.store.engine import ensure_schema, make_engine
from farm.store.queries import (
    RATE_SAMPLE,
    RATE_WINDOW_S,
    REASON_SAMPLE,
    all_statuses,
    dataset_id,
    dataset_status,
    list_jobs,
)
from farm.store.schema import Dataset, Job, JobStatus, utcnow

# pending 3, queued 2, running 1, succeeded 5 (4 of them recent), failed 1, canceled 1
LAYOUT = (
    [JobStatus.PENDING] * 3
    + [JobStatus.QUEUED] * 2
    + [JobStatus.RUNNING]
    + [JobStatus.SUCCEEDED] * 5
    + [JobStatus.FAILED, JobStatus.CANCELED]
)


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A real SQLite job store, upgraded to the current schema by alembic."""
    eng = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(eng, auto_upgrade=True)
    yield eng
    eng.dispose()


def _add_dataset(engine: Engine, name: str, statuses: list[JobStatus], now: datetime) -> int:
    """Insert a dataset and one job per status; succeeded jobs finish 60, 45, 30, 15 s and 1 h before now."""
    finish_offsets_s = iter([60, 45, 30, 15, 3600])
    with engine.begin() as conn:
        ds_id = conn.execute(insert(Dataset).values(name=name, created_at=now).returning(Dataset.id)).scalar_one()
        rows: list[dict[str, Any]] = []
        for line, state in enumerate(statuses, start=1):
            finished = None
            if state is JobStatus.SUCCEEDED:
                finished = now - timedelta(seconds=next(finish_offsets_s))
            elif state in (JobStatus.FAILED, JobStatus.CANCELED):
                finished = now - timedelta(seconds=5)
            rows.append(
                {
                    "id": f"{name}-{line:04d}",
                    "dataset_id": ds_id,
                    "source_line": line,
                    "prompt": f"prompt {line}",
                    "seed": line,
                    "width": 128,
                    "height": 128,
                    "num_inference_steps": 4,
                    "guidance_scale": 0.0,
                    "model": "tiny",
                    "status": state.value,
                    "attempts": 1 if state is not JobStatus.PENDING else 0,
                    "created_at": now - timedelta(hours=2),
                    "finished_at": finished,
                    "output_uri": f"file:///x/{line}.png" if state is JobStatus.SUCCEEDED else None,
                    "error": "boom" if state is JobStatus.FAILED else None,
                }
            )
        if rows:
            conn.execute(insert(Job), rows)
    return int(ds_id)


def test_counts_rate_and_eta(engine: Engine) -> None:
    now = utcnow()
    _add_dataset(engine, "d", LAYOUT, now)
    status = dataset_status(engine, "d", now=now)
    assert status.counts == {
        "pending": 3,
        "queued": 2,
        "running": 1,
        "succeeded": 5,
        "failed": 1,
        "canceled": 1,
    }
    assert set(status.counts) == {s.value for s in JobStatus}
    assert status.total == 13
    assert status.finished == 7
    assert not status.done
    # 4 successes in the window, the first 60 s ago: 4/60 images/s; 6 unfinished jobs left.
    assert status.images_per_s == pytest.approx(4 / 60)
    assert status.eta_s == pytest.approx(6 / (4 / 60))


def test_rate_with_the_real_clock(engine: Engine) -> None:
    _add_dataset(engine, "d", LAYOUT, utcnow())
    status = dataset_status(engine, "d")
    assert status.images_per_s > 0
    assert status.eta_s is not None
    assert status.eta_s > 0


def test_old_successes_do_not_count_towards_the_rate(engine: Engine) -> None:
    now = utcnow()
    _add_dataset(engine, "d", [JobStatus.PENDING] + [JobStatus.SUCCEEDED] * 5, now)
    later = now + timedelta(seconds=RATE_WINDOW_S + 120)  # every success is now outside the window
    status = dataset_status(engine, "d", now=later)
    assert status.counts["succeeded"] == 5
    assert status.images_per_s == 0.0
    assert status.eta_s is None  # work left, no recent progress: unknown


def test_done_once_nothing_is_unfinished(engine: Engine) -> None:
    now = utcnow()
    ds_id = _add_dataset(engine, "d", LAYOUT, now)
    with engine.begin() as conn:
        conn.execute(
            update(Job)
            .where(Job.dataset_id == ds_id, Job.status.in_(["pending", "queued", "running"]))
            .values(status=JobStatus.CANCELED.value, finished_at=now)
        )
    status = dataset_status(engine, "d", now=now)
    assert status.done
    assert status.counts["canceled"] == 7
    assert status.counts["pending"] == status.counts["queued"] == status.counts["running"] == 0
    assert status.eta_s == 0.0
    payload = status.as_dict()
    assert payload["done"] is True
    assert payload["total"] == 13
    assert payload["counts"] == status.counts


def test_empty_dataset_has_all_six_states_at_zero(engine: Engine) -> None:
    now = utcnow()
    _add_dataset(engine, "empty", [], now)
    status = dataset_status(engine, "empty", now=now)
    assert status.counts == {s.value: 0 for s in JobStatus}
    assert status.images_per_s == 0.0


def test_counts_are_per_dataset(engine: Engine) -> None:
    now = utcnow()
    _add_dataset(engine, "a", [JobStatus.PENDING] * 2, now)
    _add_dataset(engine, "b", [JobStatus.QUEUED] * 5, now)
    assert dataset_status(engine, "a", now=now).counts["pending"] == 2
    assert dataset_status(engine, "a", now=now).counts["queued"] == 0
    assert dataset_status(engine, "b", now=now).total == 5
    assert [s.name for s in all_statuses(engine)] == ["a", "b"]


def test_unknown_dataset(engine: Engine) -> None:
    with pytest.raises(UnknownDataset, match="'missing'"):
        dataset_status(engine, "missing")
    with pytest.raises(UnknownDataset):
        list_jobs(engine, "missing")
    with pytest.raises(UnknownDataset):
        dataset_id(engine, "missing")


def test_list_jobs_filters_by_state(engine: Engine) -> None:
    _add_dataset(engine, "d", LAYOUT, utcnow())
    pending = list_jobs(engine, "d", state="pending")
    assert [j.status for j in pending] == ["pending"] * 3
    assert [j.source_line for j in pending] == [1, 2, 3]  # file order
    failed = list_jobs(engine, "d", state="failed")
    assert len(failed) == 1
    assert failed[0].error == "boom"
    succeeded = list_jobs(engine, "d", state="succeeded")
    assert len(succeeded) == 5
    assert all(j.output_uri and j.output_uri.endswith(".png") for j in succeeded)
    assert list_jobs(engine, "d", state="nonsense") == []


def test_list_jobs_all_states_in_file_order_with_limit(engine: Engine) -> None:
    _add_dataset(engine, "d", LAYOUT, utcnow())
    every = list_jobs(engine, "d")
    assert [j.source_line for j in every] == list(range(1, 14))
    assert [j.status for j in every] == [s.value for s in LAYOUT]
    assert [j.source_line for j in list_jobs(engine, "d", limit=4)] == [1, 2, 3, 4]


def test_a_finished_dataset_keeps_its_rate_after_the_run(engine: Engine) -> None:
    """Once nothing remains, the rate spans first to last image, not first image to now."""
    now = utcnow()
    _add_dataset(engine, "done", [JobStatus.SUCCEEDED] * 4, now)  # finished 60, 45, 30 and 15 s ago
    finished = dataset_status(engine, "done", now=now)
    later = dataset_status(engine, "done", now=now + timedelta(seconds=50))
    assert finished.done and finished.eta_s == 0.0
    assert finished.images_per_s == pytest.approx(4 / 45)
    assert later.images_per_s == pytest.approx(4 / 45)


def _bulk_jobs(engine: Engine, name: str, rows: list[dict[str, Any]], now: datetime) -> None:
    """A dataset with the given jobs (each dict: status, and finished_at or routing_note)."""
    with engine.begin() as conn:
        ds_id = conn.execute(insert(Dataset).values(name=name, created_at=now).returning(Dataset.id)).scalar_one()
        base = {"width": 64, "height": 64, "num_inference_steps": 1, "guidance_scale": 0.0, "model": "tiny",
                "finished_at": None, "routing_note": None}  # fmt: skip
        conn.execute(
            insert(Job),
            [
                {**base, "id": f"{name}-{i}", "dataset_id": ds_id, "source_line": i + 1, "prompt": "p", "seed": i,
                 "created_at": now - timedelta(hours=1), **row}
                for i, row in enumerate(rows)
            ],
        )  # fmt: skip


def test_the_rate_reads_the_newest_images_only_when_many_finished_in_the_window(engine: Engine) -> None:
    """A fleet finishing more than RATE_SAMPLE images in the window: the rate is the newest RATE_SAMPLE's, so the
    read stays bounded and shows the current speed (here 1,000 images 100 s ago, then RATE_SAMPLE + 500 in the last
    10 s: over the whole window that would be ≈ 35 images/s)."""
    now = utcnow()
    burst = RATE_SAMPLE + 500
    old = [{"status": "succeeded", "finished_at": now - timedelta(seconds=100)}] * 1000
    fast = [{"status": "succeeded", "finished_at": now - timedelta(seconds=10 * i / burst)} for i in range(burst)]
    _bulk_jobs(engine, "fleet", [*old, *fast, {"status": "pending"}], now)
    status = dataset_status(engine, "fleet", now=now)
    oldest_counted = 10 * (RATE_SAMPLE - 1) / burst
    assert status.images_per_s == pytest.approx(RATE_SAMPLE / oldest_counted, rel=1e-3)
    assert status.counts["succeeded"] == 1000 + burst


def test_unroutable_reasons_beyond_the_sample_are_shares_of_the_exact_total(engine: Engine) -> None:
    now = utcnow()
    total = REASON_SAMPLE + 2000
    notes = ["no pool has model a" if i % 4 else "no pool renders 2048x2048" for i in range(total)]
    _bulk_jobs(engine, "stuck", [{"status": "pending", "routing_note": note} for note in notes], now)
    status = dataset_status(engine, "stuck", now=now)
    assert status.reasons_estimated
    assert sum(status.unroutable.values()) == total
    assert status.unroutable["no pool renders 2048x2048"] == pytest.approx(total / 4, rel=0.01)
    payload = status.as_dict()
    assert payload["unroutable"] == total and payload["unroutable_reasons_estimated"] is True


def test_unroutable_reasons_are_exact_within_the_sample(engine: Engine) -> None:
    now = utcnow()
    notes = ["a" if i % 3 else "b" for i in range(30)]
    _bulk_jobs(engine, "few", [{"status": "pending", "routing_note": note} for note in notes], now)
    status = dataset_status(engine, "few", now=now)
    assert status.unroutable == {"a": 20, "b": 10} and not status.reasons_estimated

"""`farm bench submit` at small sizes: the figures are complete, the counts right, and nothing is left behind."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from benchmarks.submit import bench_submit
from farm.dispatch.routing import WINDOW_TASKS
from farm.settings import Settings, load_settings
from farm.store.engine import make_engine
from farm.store.schema import Dataset, Job

PROMPTS = 500
STATUS_JOBS = 5_000
RUNS = 3


def _run(
    settings: Settings, workdir: Path, keep: bool = False, backlog_jobs: int = 0
) -> tuple[dict[str, Any], list[str]]:
    lines: list[str] = []
    result = bench_submit(
        settings,
        prompts=PROMPTS,
        status_jobs=STATUS_JOBS,
        status_runs=RUNS,
        backlog_jobs=backlog_jobs,
        workdir=workdir,
        keep=keep,
        progress=lines.append,
    )
    return result, lines


def _check_figures(result: dict[str, Any], settings: Settings) -> None:
    assert {"store", "broker", "submit", "status", "machine"} <= set(result) <= {*result, "backlog"}
    submit, status = result["submit"], result["status"]
    assert submit["prompts"] == submit["jobs"] == PROMPTS
    # Submit records; the leader's first top-up sends a window: with no live worker, one worker's share.
    assert submit["dispatched_jobs"] == WINDOW_TASKS * settings.batch_size
    assert submit["tasks"] == WINDOW_TASKS
    assert submit["purged_messages"] == submit["tasks"]
    for key in ("plan_s", "record_s", "dispatch_s", "total_s", "prompts_per_s", "dispatch_us_per_message"):
        assert submit[key] >= 0
    assert status["jobs"] == status["cli_total"] == STATUS_JOBS
    assert status["counts"]["succeeded"] == STATUS_JOBS * 55 // 100
    assert status["counts"]["failed"] == STATUS_JOBS * 5 // 100
    assert status["counts"]["running"] == STATUS_JOBS * 10 // 100
    assert status["counts"]["queued"] == STATUS_JOBS * 30 // 100
    assert status["runs"] == RUNS
    assert 0 <= status["min_ms"] <= status["median_ms"] <= status["p95_ms"]
    assert status["cli_ms"] > 0 and status["insert_s"] >= 0
    assert result["machine"]["cpus"] >= 1 and result["machine"]["python"]


def _bench_datasets(url: str) -> dict[str, int]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                select(Dataset.name, func.count(Job.id))
                .outerjoin(Job, Job.dataset_id == Dataset.id)
                .where(Dataset.name.like("bench-%"))
                .group_by(Dataset.name)
            ).all()
    finally:
        engine.dispose()
    return {name: int(n) for name, n in rows}


def _sqlite_queue_size(broker_url: str, queue: str) -> int:
    engine = make_engine(broker_url.removeprefix("sqla+"))
    try:
        with engine.connect() as conn:
            return int(
                conn.exec_driver_sql(
                    "SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id WHERE q.name = ?",
                    (queue,),
                ).scalar_one()
            )
    finally:
        engine.dispose()


def test_embedded_default(tmp_path: Path) -> None:
    settings = load_settings({}, home=str(tmp_path / "home"))
    result, lines = _run(settings, tmp_path / "work", backlog_jobs=600)
    _check_figures(result, settings)
    backlog = result["backlog"]
    assert backlog["jobs"] == 600 and len(backlog["count_ms"]) == 3 and backlog["cli_ms"] > 0
    assert result["store"].startswith("sqlite:///") and result["broker"].startswith("sqla+sqlite:///")
    assert lines, "progress was never called"
    assert _bench_datasets(settings.database_url) == {}
    queue = f"bench-{result['submit']['dataset'].removeprefix('bench-submit-')}"
    assert _sqlite_queue_size(settings.broker_url, queue) == 0
    assert not list((tmp_path / "work").iterdir()), "the prompt file was left behind"


def test_embedded_keep(tmp_path: Path) -> None:
    settings = load_settings({}, home=str(tmp_path / "home"))
    result, _ = _run(settings, tmp_path / "work", keep=True)
    assert _bench_datasets(settings.database_url) == {
        result["submit"]["dataset"]: PROMPTS,
        result["status"]["dataset"]: STATUS_JOBS,
    }


@pytest.mark.integration
def test_postgres_and_redis(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    import redis

    settings = load_settings({}, home=str(tmp_path / "home"), database_url=pg_url, broker_url=redis_url)
    result, _ = _run(settings, tmp_path / "work")
    _check_figures(result, settings)
    assert result["store"].startswith("postgresql") and result["broker"].startswith("redis://")
    assert _bench_datasets(pg_url) == {}
    queue = f"bench-{result['submit']['dataset'].removeprefix('bench-submit-')}"
    client = redis.Redis.from_url(redis_url)
    assert client.llen(queue) == 0
    assert not client.keys(f"*{queue}*"), "the benchmark queue left keys in Redis"

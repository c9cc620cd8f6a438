"""The render task with real parts: tiny pipeline, SQLite or PostgreSQL, local storage, real brokers."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from sqlalchemy import select

from farm.dispatch.broker import make_celery
from farm.settings import load_settings
from farm.store.engine import make_engine, open_store
from farm.store.schema import Dataset, Job
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.record import record
from tests.support.processes import Worker, farm_env, run_farm, wait_until
from workers.runtime import WorkerRuntime
from workers.tasks import render_jobs


def _broken_copy(model: Path, where: Path) -> Path:
    """A model folder that passes submit's check but cannot be loaded: a poison job's model."""
    broken = shutil.copytree(model, where)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return broken


def _submit(engine, tmp_path: Path, dataset: str, prompts: list[str], model: Path) -> list[str]:  # type: ignore[no-untyped-def]
    path = tmp_path / f"{dataset}.txt"
    path.write_text("\n".join(prompts))
    plan = plan_submission(path, SubmitOptions(dataset=dataset, model=str(model), width=64, height=64))
    record(engine, plan)
    return [spec.id_in(dataset) for spec in plan.specs]


def _rows(engine, ids: list[str]) -> dict[str, object]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(select(Job.__table__).where(Job.id.in_(ids)))}


def test_duplicate_delivery_renders_and_stores_nothing_twice(tmp_path: Path, tiny_model: Path) -> None:
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://")
    engine = open_store(settings)
    ids = _submit(engine, tmp_path, "dup", ["a cat", "a dog", "a cow"], tiny_model)
    runtime = WorkerRuntime.build(settings, make_celery(settings), name="w-test")

    # As the production task runs it: render_jobs returns while its uploads are still on the pool, and the
    # broker delivers the same message again at once (pause and resume, two dispatchers, a redelivery).
    first = render_jobs(runtime, ids)
    second = render_jobs(runtime, ids)
    assert runtime.uploader.drain(timeout_s=60)

    assert (first.rendered, first.skipped) == (3, 0)
    assert (second.claimed, second.rendered, second.skipped) == (0, 0, 3)
    assert runtime.stats.succeeded == 3
    rows = _rows(engine, ids)
    files = sorted((tmp_path / "home" / "images" / "dup").iterdir())
    assert [f.as_uri() for f in files] == sorted(row.output_uri for row in rows.values())  # type: ignore[attr-defined]
    for row in rows.values():
        data = Path(unquote(urlsplit(row.output_uri).path)).read_bytes()  # type: ignore[attr-defined]
        assert (row.attempts, row.claim_seq, row.status) == (1, 1, "succeeded")  # type: ignore[attr-defined]
        assert hashlib.sha256(data).hexdigest() == row.sha256  # type: ignore[attr-defined]
        assert row.render_ms is not None and row.render_ms >= 0  # type: ignore[attr-defined]
    assert runtime.pipelines.misses == 1  # loaded once per process
    runtime.leases.stop()


def test_a_failing_job_is_retried_then_failed_without_blocking_others(tmp_path: Path, tiny_model: Path) -> None:
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://", max_attempts=2, retry_backoff_s=0)
    engine = open_store(settings)
    good = _submit(engine, tmp_path, "mixed", ["fine one", "fine two"], tiny_model)
    bad = _submit(engine, tmp_path, "mixed", ["poison"], _broken_copy(tiny_model, tmp_path / "broken"))
    runtime = WorkerRuntime.build(settings, make_celery(settings), name="w-test")

    first = render_jobs(runtime, [*bad, *good])
    assert runtime.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    assert (first.rendered, first.render_failed) == (2, 1)
    assert (runtime.stats.succeeded, runtime.stats.retried, runtime.stats.failed) == (2, 1, 0)
    row = _rows(engine, bad)[bad[0]]
    assert row.status == "queued" and row.attempts == 1  # type: ignore[attr-defined]
    assert row.error.startswith("attempt 1: ModelLoadError")  # type: ignore[attr-defined]

    render_jobs(runtime, bad)  # the retry message
    assert runtime.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    assert (runtime.stats.failed, runtime.stats.retried) == (1, 1)
    row = _rows(engine, bad)[bad[0]]
    assert row.status == "failed" and row.attempts == 2 and "ModelLoadError" in row.error  # type: ignore[attr-defined]
    assert render_jobs(runtime, bad).skipped == 1  # out of attempts: never claimed again
    assert runtime.uploader.drain(timeout_s=120)  # its uploads stored and recorded


@pytest.mark.integration
def test_poison_job_through_a_real_worker_and_redis(
    tmp_path: Path, own_pg_url: str, redis_url: str, tiny_model: Path, queue_name: str
) -> None:
    dataset = f"poison-{queue_name}"
    env = farm_env(
        FARM_HOME=str(tmp_path / "home"),
        FARM_DATABASE_URL=own_pg_url,
        FARM_BROKER_URL=redis_url,
        FARM_QUEUE=queue_name,
        FARM_STORAGE_URL=(tmp_path / "images").as_uri(),
        FARM_MAX_ATTEMPTS="3",
        FARM_RETRY_BACKOFF_S="1",
    )
    good = tmp_path / "good.txt"
    good.write_text("one\ntwo\nthree\n")
    bad = tmp_path / "bad.txt"
    bad.write_text("poison\n")
    broken = _broken_copy(tiny_model, tmp_path / "broken")
    assert run_farm(["submit", str(bad), "--dataset", dataset, "--model", str(broken)], env).returncode == 0
    assert run_farm(["submit", str(good), "--dataset", dataset, "--model", str(tiny_model)], env).returncode == 0

    worker = Worker(env, tmp_path / "worker.log")
    try:
        wait_until(
            lambda: json.loads(run_farm(["status", dataset, "--json"], env).stdout)[0]["done"],
            timeout_s=240,
            what="poison dataset to finish",
            worker=worker,
        )
    finally:
        worker.stop()
    counts = json.loads(run_farm(["status", dataset, "--json"], env).stdout)[0]["counts"]
    assert (counts["succeeded"], counts["failed"]) == (3, 1)
    failed = run_farm(["jobs", dataset, "--state", "failed", "--json"], env)
    [row] = [json.loads(line) for line in failed.stdout.splitlines()]
    assert row["attempts"] == 3
    lines = row["error"].splitlines()  # every attempt's error, in order
    assert [line.split(":")[0] for line in lines] == ["attempt 1", "attempt 2", "attempt 3"]
    assert all(line.split(": ", 1)[1].startswith("ModelLoadError") for line in lines)
    log = worker.log()
    assert "attempt 1 failed" in log and "attempt 2 failed" in log and "failed after 3 attempts" in log
    engine = make_engine(own_pg_url)
    with engine.connect() as conn:
        n = conn.execute(select(Job.id).join(Dataset).where(Dataset.name == dataset)).all()
    assert len(n) == 4

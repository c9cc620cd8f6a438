"""Fault tests with real processes and services: nothing lost, nothing rendered or stored twice."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import uuid
from pathlib import Path
from typing import Any
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
from tests.support.proxy import FaultProxy
from tests.support.s3 import S3Server
from workers.runtime import WorkerRuntime
from workers.tasks import render_jobs

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bench_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FARM_HOME holding bench-small: ≈ 0.3 s a render here, slow enough to be caught mid-batch."""
    from models.bench_small import make_bench_small

    home = tmp_path_factory.mktemp("faults-home")
    make_bench_small(home / "models" / "bench-small")
    return home


def _jobs(engine, dataset: str) -> list:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return list(conn.execute(select(Job.__table__).join(Dataset).where(Dataset.name == dataset)))


def _counts(env: dict[str, str], dataset: str) -> dict[str, int]:
    return json.loads(run_farm(["status", dataset, "--json"], env).stdout)[0]["counts"]


def _one_object_per_job(images: Path, jobs: list, env: dict[str, str] | None = None) -> None:  # type: ignore[no-untyped-def]
    """After `farm gc` (which removes what unrecorded attempts left), exactly the object each row names."""
    if env is not None:
        assert run_farm(["gc"], env).returncode == 0
    files = sorted(images.glob("*.png"))
    assert sorted(f.as_uri() for f in files) == sorted(j.output_uri for j in jobs)  # exactly one object per job
    for job in jobs:
        path = Path(unquote(urlsplit(job.output_uri).path))
        assert hashlib.sha256(path.read_bytes()).hexdigest() == job.sha256


def test_worker_killed_mid_batch_loses_nothing(
    tmp_path: Path, bench_home: Path, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    dataset = f"kill-{queue_name}"
    env = _kill_env(tmp_path, bench_home, own_pg_url, redis_url, queue_name)
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a lighthouse, take {i}\n" for i in range(12)))
    assert run_farm(["submit", str(prompts), "--dataset", dataset, "--model", "bench-small"], env).returncode == 0

    victim = Worker(env, tmp_path / "victim.log")
    wait_until(
        lambda: _counts(env, dataset)["running"] > 0,
        timeout_s=180,
        what="a batch in progress",
        worker=victim,
        poll_s=0.1,
    )
    os.kill(victim.proc.pid, signal.SIGKILL)  # no warm shutdown, no acks, no drained uploads
    victim.proc.wait(timeout=30)
    victim.stop()
    stranded = _counts(env, dataset)["running"]
    assert stranded > 0
    jobs, rescuer_log = _rescue(env, dataset, tmp_path, own_pg_url, stranded)
    assert all(j.attempts in (1, 2) for j in jobs)
    assert "reaper:" in rescuer_log


def _kill_env(
    tmp_path: Path, bench_home: Path, own_pg_url: str, redis_url: str, queue_name: str, **extra: str
) -> dict[str, str]:
    """A worker's settings for the kill tests: 10 s leases, batches of 4, 3 attempts, images under tmp_path."""
    return farm_env(
        FARM_HOME=str(bench_home),
        FARM_DATABASE_URL=own_pg_url,
        FARM_BROKER_URL=redis_url,
        FARM_QUEUE=queue_name,
        FARM_STORAGE_URL=(tmp_path / "images").as_uri(),
        FARM_LEASE_S="10",
        FARM_BATCH_SIZE="4",
        FARM_MAX_ATTEMPTS="3",
        **extra,
    )


def _rescue(env: dict[str, str], dataset: str, tmp_path: Path, own_pg_url: str, stranded: int) -> tuple[list[Any], str]:
    """After a kill: a new worker (any worker runs the reaper) finishes the dataset once the dead worker's leases
    expire. Checks every one of the 12 jobs succeeded with exactly one object, and the stranded ones took a second
    attempt each; returns the jobs and the rescuer's log."""
    rescuer = Worker(env, tmp_path / "rescuer.log")
    try:
        wait_until(
            lambda: json.loads(run_farm(["status", dataset, "--json"], env).stdout)[0]["done"],
            timeout_s=240,
            what="every job after the kill",
            worker=rescuer,
        )
    finally:
        rescuer.stop()
    jobs = _jobs(make_engine(own_pg_url), dataset)
    assert {j.status for j in jobs} == {"succeeded"} and len(jobs) == 12
    _one_object_per_job(tmp_path / "images" / dataset, jobs, env)
    assert sum(1 for j in jobs if j.attempts == 2) == stranded  # the killed batches: a second attempt each
    return jobs, rescuer.log()


def _stored_not_recorded(env: dict[str, str], dataset: str, worker: Worker, tmp_path: Path) -> None:
    """Wait until the worker has stored a batch that its group holds back: objects exist, no job succeeded."""
    wait_until(
        lambda: "event=upload_end" in worker.log() and _counts(env, dataset)["succeeded"] == 0,
        timeout_s=180,
        what="a stored batch waiting for its group",
        worker=worker,
        poll_s=0.1,
    )
    assert list((tmp_path / "images" / dataset).glob("*.png"))


def test_worker_killed_with_a_group_waiting_loses_nothing(
    tmp_path: Path, bench_home: Path, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    """SIGKILL while stored batches wait for their group commit: their rows still say running, so the reaper
    hands them out again; `farm gc` removes the objects the dead attempt stored; every job ends with one image."""
    dataset = f"group-kill-{queue_name}"
    env = _kill_env(
        tmp_path, bench_home, own_pg_url, redis_url, queue_name, FARM_RECORD_GROUP_S="3"
    )  # a third of the lease
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a harbour, take {i}\n" for i in range(12)))
    assert run_farm(["submit", str(prompts), "--dataset", dataset, "--model", "bench-small"], env).returncode == 0
    victim = Worker(env, tmp_path / "victim.log")
    _stored_not_recorded(env, dataset, victim, tmp_path)
    os.kill(victim.proc.pid, signal.SIGKILL)
    victim.proc.wait(timeout=30)
    victim.stop()
    stranded = _counts(env, dataset)["running"]
    assert stranded > 0 and "event=recorded" not in victim.log()
    _rescue(env, dataset, tmp_path, own_pg_url, stranded)


def test_sigterm_records_the_waiting_group_before_the_worker_exits(
    tmp_path: Path, bench_home: Path, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    """A warm shutdown hands the waiting group over at once: what was stored is recorded, not handed back."""
    dataset = f"group-term-{queue_name}"
    env = _kill_env(
        tmp_path, bench_home, own_pg_url, redis_url, queue_name, FARM_RECORD_GROUP_S="3"
    )  # a third of the lease
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a quay, take {i}\n" for i in range(12)))
    assert run_farm(["submit", str(prompts), "--dataset", dataset, "--model", "bench-small"], env).returncode == 0
    worker = Worker(env, tmp_path / "worker.log")
    _stored_not_recorded(env, dataset, worker, tmp_path)
    stored = {f.stem.rsplit("-", 1)[0] for f in (tmp_path / "images" / dataset).glob("*.png")}
    worker.stop(timeout_s=60)  # SIGTERM
    jobs = {j.id: j for j in _jobs(make_engine(own_pg_url), dataset)}
    assert stored and all(jobs[job_id].status == "succeeded" for job_id in stored)
    assert _counts(env, dataset)["running"] == 0  # the rest went back to pending, none left held
    for job_id in stored:
        assert f"event=recorded job={job_id}" in worker.log()


def test_storage_503s_and_dropped_connections_are_retried(
    tmp_path: Path, bench_home: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    settings_kw = dict(home=str(tmp_path / "home"), broker_url="memory://", storage_url=f"s3://{s3_bucket}/flaky")
    # boto3 retries each request up to 5 times: 3 faults in a row are absorbed inside one upload.
    proxy = FaultProxy("127.0.0.1", s3_server.port, faults=3).start()
    try:
        settings = load_settings({}, s3_endpoint_url=proxy.endpoint_url, **settings_kw)
        (settings.home / "models").mkdir(parents=True, exist_ok=True)
        (settings.home / "models" / "bench-small").symlink_to(bench_home / "models" / "bench-small")
        engine = open_store(settings)
        path = tmp_path / "p.txt"
        path.write_text("a flaky bucket\nanother flaky bucket\n")
        plan = plan_submission(path, SubmitOptions(dataset="flaky", model="bench-small"))
        record(engine, plan)
        rt = WorkerRuntime.build(settings, make_celery(settings), name="w-flaky", max_batch=2)
        render_jobs(rt, plan.ids)
        assert rt.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    finally:
        proxy.stop()
    assert proxy.injected == 3
    assert rt.stats.succeeded == 2 and rt.stats.retried == 0
    client = s3_server.client()
    for job in _jobs(engine, "flaky"):
        body = client.get_object(Bucket=s3_bucket, Key=f"flaky/flaky/{job.id}-1.png")["Body"].read()
        assert job.status == "succeeded" and hashlib.sha256(body).hexdigest() == job.sha256


def test_storage_down_longer_than_retries_fails_the_attempt_not_the_job(
    tmp_path: Path, bench_home: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    proxy = FaultProxy("127.0.0.1", s3_server.port, faults=1000).start()  # the store is away
    settings = load_settings(
        {},
        home=str(tmp_path / "home"),
        broker_url="memory://",
        storage_url=f"s3://{s3_bucket}/down",
        s3_endpoint_url=proxy.endpoint_url,
    )
    (settings.home / "models").mkdir(parents=True, exist_ok=True)
    (settings.home / "models" / "bench-small").symlink_to(bench_home / "models" / "bench-small")
    engine = open_store(settings)
    path = tmp_path / "p.txt"
    path.write_text("an unreachable bucket\n")
    plan = plan_submission(path, SubmitOptions(dataset="down", model="bench-small"))
    record(engine, plan)
    rt = WorkerRuntime.build(settings, make_celery(settings), name="w-down")
    try:
        render_jobs(rt, plan.ids)
        assert rt.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    finally:
        proxy.stop()
    [job] = _jobs(engine, "down")
    # Never succeeded without its object: the attempt failed and the job waits for its retry.
    assert (job.status, job.sha256, job.attempts) == ("queued", None, 1)
    assert "TransientStorageError" in job.error
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="down/")
    assert listed.get("KeyCount", 0) == 0


def test_worker_reconnects_when_postgres_drops_its_connections(
    tmp_path: Path, bench_home: Path, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    dataset = f"pgdrop-{queue_name}"
    env = farm_env(
        FARM_HOME=str(bench_home),
        FARM_DATABASE_URL=own_pg_url,
        FARM_BROKER_URL=redis_url,
        FARM_QUEUE=queue_name,
        FARM_STORAGE_URL=(tmp_path / "images").as_uri(),
        FARM_BATCH_SIZE="2",
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a harbour at dusk, take {i}\n" for i in range(16)))
    assert run_farm(["submit", str(prompts), "--dataset", dataset, "--model", "bench-small"], env).returncode == 0
    worker = Worker(env, tmp_path / "worker.log")
    url = make_url(own_pg_url)
    try:
        wait_until(
            lambda: _counts(env, dataset)["succeeded"] >= 2,
            timeout_s=180,
            what="the first images",
            worker=worker,
            poll_s=0.1,
        )
        with psycopg.connect(
            f"host={url.host} port={url.port or 5432} user={url.username} dbname=test", autocommit=True
        ) as admin:
            dropped = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = %s",
                (url.database,),
            ).fetchone()
        assert dropped is not None and dropped[0] > 0
        wait_until(
            lambda: json.loads(run_farm(["status", dataset, "--json"], env).stdout)[0]["done"],
            timeout_s=240,
            what="every job after the drop",
            worker=worker,
        )
        assert worker.proc.poll() is None  # it carried on rather than dying
    finally:
        worker.stop()
    jobs = _jobs(make_engine(own_pg_url), dataset)
    assert {j.status for j in jobs} == {"succeeded"} and len(jobs) == 16
    _one_object_per_job(tmp_path / "images" / dataset, jobs, env)


def test_redis_restart_without_persistence_loses_nothing(tmp_path: Path, bench_home: Path, own_pg_url: str) -> None:
    """A broker of the test's own, run as docker/compose.yaml runs Redis (nothing persists), restarted mid-run:
    every queued message is gone, and the workers' control loop sends those jobs again."""
    import shutil

    from tests.support.chaos import RedisServer

    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is not installed")
        pytest.skip("redis-server is not installed")
    (tmp_path / "redis").mkdir()
    broker = RedisServer(tmp_path / "redis").start()
    dataset = f"redis-{uuid.uuid4().hex[:8]}"
    env = farm_env(
        FARM_HOME=str(bench_home),
        FARM_DATABASE_URL=own_pg_url,
        FARM_BROKER_URL=broker.url,
        FARM_QUEUE="render",
        FARM_STORAGE_URL=(tmp_path / "images").as_uri(),
        FARM_BATCH_SIZE="2",
        FARM_LEASE_S="12",
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"a windmill, take {i}\n" for i in range(16)))
    worker = None
    try:
        assert run_farm(["submit", str(prompts), "--dataset", dataset, "--model", "bench-small"], env).returncode == 0
        worker = Worker(env, tmp_path / "worker.log")
        wait_until(
            lambda: _counts(env, dataset)["succeeded"] >= 2,
            timeout_s=180,
            what="the first images",
            worker=worker,
            poll_s=0.1,
        )
        queued_before = _counts(env, dataset)["queued"]
        broker.restart()  # SIGKILL and start again on the same port: the queue is empty
        assert queued_before > 0
        wait_until(
            lambda: json.loads(run_farm(["status", dataset, "--json"], env).stdout)[0]["done"],
            timeout_s=240,
            what="every job after the restart",
            worker=worker,
        )
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()
    jobs = _jobs(make_engine(own_pg_url), dataset)
    assert {j.status for j in jobs} == {"succeeded"} and len(jobs) == 16
    _one_object_per_job(tmp_path / "images" / dataset, jobs, env)
    assert "were not claimed in time (broker queue" in worker.log()  # the lost messages were sent again

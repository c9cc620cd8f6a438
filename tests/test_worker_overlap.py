"""Batching and overlap in the worker: images per pipeline call, uploads behind rendering, bounded memory."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import select

from farm.dispatch.broker import make_celery
from farm.settings import load_settings
from farm.store.engine import open_store
from farm.store.schema import Job
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.record import record
from tests.support.proxy import SlowProxy
from tests.support.s3 import S3Server
from workers.runtime import WorkerRuntime
from workers.tasks import render_jobs


def _submit(engine, tmp_path: Path, n: int, model: Path) -> list[str]:  # type: ignore[no-untyped-def]
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"overlap prompt {i}\n" for i in range(n)))
    plan = plan_submission(prompts, SubmitOptions(dataset="overlap", model=str(model), width=64, height=64))
    record(engine, plan)
    return plan.ids


def test_slow_storage_applies_back_pressure_instead_of_growing_memory(
    tmp_path: Path, tiny_model: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    proxy = SlowProxy("127.0.0.1", s3_server.port, delay_s=0.15).start()
    try:
        settings = load_settings(
            {},
            home=str(tmp_path / "home"),
            broker_url="memory://",
            storage_url=f"s3://{s3_bucket}/slow",
            s3_endpoint_url=proxy.endpoint_url,
        )
        assert os.environ["AWS_ACCESS_KEY_ID"]  # from the s3_bucket fixture
        engine = open_store(settings)
        ids = _submit(engine, tmp_path, 12, tiny_model)
        rt = WorkerRuntime.build(settings, make_celery(settings), name="w-slow", max_batch=2, io_threads=1)
        outcome = render_jobs(rt, ids)  # returns once everything is rendered and handed over
        assert outcome.rendered == 12
        assert rt.uploader.in_flight > 0  # uploads still running behind the render loop
        assert rt.uploader.drain(timeout_s=120)
    finally:
        proxy.stop()
    # The bound held: never more than two batches of images waiting for the slow store …
    assert rt.uploader.max_in_flight == 4
    assert rt.uploader.peak_images_held == 4
    # … and nothing was dropped for it: one confirmed object per job, all marked in batch transactions.
    listed = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="slow/overlap/")
    assert sorted(o["Key"] for o in listed["Contents"]) == sorted(f"slow/overlap/{i}-1.png" for i in ids)
    with engine.connect() as conn:
        states = conn.execute(select(Job.status, Job.sha256).where(Job.id.in_(ids))).all()
    assert {s for s, _ in states} == {"succeeded"} and all(sha for _, sha in states)
    assert rt.stats.succeeded == 12 and rt.stats.rendered == 12


def test_a_task_renders_its_jobs_in_batches_of_the_workers_limit(tmp_path: Path, tiny_model: Path) -> None:
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://")
    engine = open_store(settings)
    ids = _submit(engine, tmp_path, 7, tiny_model)
    rt = WorkerRuntime.build(settings, make_celery(settings), name="w-batch", max_batch=3)
    calls: list[int] = []
    pipe = rt.pipelines.get(str(tiny_model))  # loaded once; count pipeline calls by VAE decodes
    handle = pipe.vae.decoder.register_forward_hook(lambda _m, args, _o: calls.append(int(args[0].shape[0])))
    try:
        outcome = render_jobs(rt, ids)
        assert rt.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    finally:
        handle.remove()
    assert outcome.rendered == 7
    assert sorted(calls, reverse=True) == [3, 3, 1]  # one decode per pipeline call, batch sizes 3, 3, 1
    assert rt.stats.succeeded == 7


def test_upload_threads_run_below_the_render_threads_priority(tmp_path: Path) -> None:
    import threading

    from farm.storage.local import LocalStorage
    from workers.uploads import Uploader

    uploader = Uploader(LocalStorage(tmp_path), threads=1, max_in_flight=1)
    seen: list[int] = []
    uploader._pool.submit(lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))).result()
    uploader.close()
    assert seen == [os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) + 10]


def test_group_commit_records_the_stored_batches_together(tmp_path: Path, tiny_model: Path) -> None:
    """FARM_RECORD_GROUP_S: three stored batches wait (their jobs still held by the upload pool, their rows still
    running) and are recorded in one transaction, on the grouping thread; drain hands them over at once."""
    import threading

    from sqlalchemy import event

    settings = load_settings({"FARM_RECORD_GROUP_S": "60"}, home=str(tmp_path / "home"), broker_url="memory://")
    engine = open_store(settings)
    ids = _submit(engine, tmp_path, 7, tiny_model)
    rt = WorkerRuntime.build(settings, make_celery(settings), name="w-group", max_batch=3)
    commits: list[str] = []
    event.listen(rt.engine, "commit", lambda _conn: commits.append(threading.current_thread().name))
    outcome = render_jobs(rt, ids)
    assert outcome.rendered == 7
    with rt.uploader._lock:  # every image stored: the pool's threads are done with them …
        assert rt.uploader._idle.wait_for(lambda: rt.uploader.in_flight == 0, timeout=120)
    assert rt.uploader.holding() == set(ids)  # … yet the jobs are held until recorded
    with engine.connect() as conn:
        assert set(conn.execute(select(Job.status).where(Job.id.in_(ids))).scalars()) == {"running"}
    assert "farm-record" not in commits and rt.stats.succeeded == 0
    assert rt.uploader.drain(timeout_s=30)  # long before the 60 s the group would wait
    assert commits.count("farm-record") == 1  # three batches, one transaction
    with engine.connect() as conn:
        assert set(conn.execute(select(Job.status).where(Job.id.in_(ids))).scalars()) == {"succeeded"}
    assert rt.stats.succeeded == 7 and rt.uploader.holding() == set()
    rt.uploader.close()


def test_a_group_is_handed_over_when_full_or_when_its_time_is_up(tmp_path: Path) -> None:
    import threading
    import time

    import numpy as np
    from PIL import Image

    from farm.job import Claimed
    from farm.storage.local import LocalStorage
    from workers.uploads import Rendered, Uploader

    calls: list[list[str]] = []
    called = threading.Event()

    def done(ok: list, failed: list) -> None:  # type: ignore[type-arg]
        calls.append(sorted(job.id for job, *_rest in ok))
        called.set()

    def batch(first: int, n: int) -> list[Rendered]:
        pixels = Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8))
        jobs = [
            Claimed(
                prompt="p",
                seed=i,
                width=16,
                height=16,
                num_inference_steps=1,
                guidance_scale=0.0,
                model="tiny",
                source_line=i,
                id=f"j{i:02d}",
                dataset_id=1,
                attempts=1,
                claim_seq=1,
            )
            for i in range(first, first + n)
        ]
        return [Rendered(job, "d", pixels, 1) for job in jobs]

    full = Uploader(LocalStorage(tmp_path / "a"), threads=2, on_done=done, group_s=60, group_jobs=4)
    for start in (0, 2, 4):
        full.submit(batch(start, 2))
    assert called.wait(30)  # four jobs waited: handed over without waiting the 60 s
    assert len(calls[0]) == 4
    assert full.drain(timeout_s=30)
    assert sorted(j for call in calls for j in call) == [f"j{i:02d}" for i in range(6)]
    full.close()

    calls.clear()
    called.clear()
    timed = Uploader(LocalStorage(tmp_path / "b"), threads=1, on_done=done, group_s=0.3)
    started = time.monotonic()
    timed.submit(batch(0, 2))
    assert called.wait(30) and time.monotonic() - started >= 0.3  # alone, after its 0.3 s, without a drain
    assert calls == [["j00", "j01"]]
    timed.close()

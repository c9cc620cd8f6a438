"""The whole farm with real parts: submit → SQL → Celery → `farm worker` process → storage → status."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from farm.store.engine import make_engine
from farm.store.schema import Dataset, Job
from tests.support.processes import Worker, farm_env, run_farm, wait_until
from tests.support.s3 import S3Server, free_port

pytestmark = pytest.mark.integration

PROMPTS = [
    f"test prompt number {i}: a {color} cube on a table"
    for i, color in enumerate(["red", "green", "blue", "yellow", "white"] * 4)
]


def _bare_render(model_dir: Path, job: Job) -> np.ndarray:
    """What a bare PixArtAlphaPipeline call gives for a job, without any farm code."""
    import torch
    from diffusers import PixArtAlphaPipeline

    pipe = _bare_pipeline(model_dir)
    image = pipe(
        prompt=job.prompt,
        num_inference_steps=job.num_inference_steps,
        guidance_scale=job.guidance_scale,
        width=job.width,
        height=job.height,
        generator=torch.Generator().manual_seed(job.seed),
        use_resolution_binning=False,
        clean_caption=False,
        output_type="pil",
    ).images[0]
    assert isinstance(pipe, PixArtAlphaPipeline)
    return np.asarray(image)


_PIPES: dict[Path, object] = {}


def _bare_pipeline(model_dir: Path) -> object:
    from diffusers import PixArtAlphaPipeline

    if model_dir not in _PIPES:
        pipe = PixArtAlphaPipeline.from_pretrained(model_dir)
        pipe.set_progress_bar_config(disable=True)
        _PIPES[model_dir] = pipe
    return _PIPES[model_dir]


def test_twenty_prompts_on_postgres_redis_and_s3(
    tmp_path: Path,
    own_pg_url: str,
    redis_url: str,
    s3_server: S3Server,
    s3_bucket: str,
    tiny_model: Path,
    queue_name: str,
) -> None:
    import os

    dataset = f"e2e-{queue_name}"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    env = farm_env(
        FARM_HOME=str(tmp_path / "home"),
        FARM_DATABASE_URL=own_pg_url,
        FARM_BROKER_URL=redis_url,
        FARM_QUEUE=queue_name,
        FARM_STORAGE_URL=f"s3://{s3_bucket}/renders",
        FARM_S3_ENDPOINT_URL=s3_server.endpoint_url,
        # One image per pipeline call: then each image is bit-identical to a bare single call.
        # (Batched calls round differently; the embedded test below checks them within one level.)
        FARM_BATCH_SIZE="1",
        AWS_ACCESS_KEY_ID=os.environ["AWS_ACCESS_KEY_ID"],
        AWS_SECRET_ACCESS_KEY=os.environ["AWS_SECRET_ACCESS_KEY"],
        AWS_DEFAULT_REGION="us-east-1",
    )
    submitted = run_farm(
        ["submit", str(prompts), "--dataset", dataset, "--model", str(tiny_model), "--width", "128", "--height", "96"],
        env,
    )
    assert submitted.returncode == 0, submitted.stderr
    assert "20 new jobs" in submitted.stdout
    assert "dispatched" not in submitted.stdout  # recorded only: the worker's dispatcher sends them
    assert json.loads(run_farm(["status", dataset, "--json"], env).stdout)[0]["counts"]["pending"] == 20

    engine = make_engine(own_pg_url)
    worker = Worker(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: _dataset_done(env, dataset), timeout_s=240, what="all 20 jobs to finish", worker=worker)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]

    [status] = json.loads(run_farm(["status", dataset, "--json"], env).stdout)
    assert status["counts"]["succeeded"] == 20 and status["total"] == 20, status

    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=s3_bucket, Prefix=f"renders/{dataset}/")
    keys = sorted(o["Key"] for o in listed.get("Contents", []))
    with engine.connect() as conn:
        jobs = list(conn.execute(select(Job.__table__).join(Dataset).where(Dataset.name == dataset)))
    assert len(jobs) == 20
    # One object per job, at the job's key, with the recorded sha256 and size.
    assert keys == sorted(f"renders/{dataset}/{job.id}-1.png" for job in jobs)
    for job in jobs:
        assert job.status == "succeeded" and job.attempts == 1
        body = client.get_object(Bucket=s3_bucket, Key=f"renders/{dataset}/{job.id}-1.png")["Body"].read()
        assert hashlib.sha256(body).hexdigest() == job.sha256
        assert len(body) == job.bytes
        assert job.output_uri == f"s3://{s3_bucket}/renders/{dataset}/{job.id}-1.png"
        image = Image.open(io.BytesIO(body))
        assert image.size == (128, 96)
        assert image.text["prompt"] == job.prompt and int(image.text["seed"]) == job.seed
        # Pixel-identical to a bare diffusers call with the same seed.
        np.testing.assert_array_equal(np.asarray(image.convert("RGB")), _bare_render(tiny_model, job))
    assert len({job.seed for job in jobs}) == 20


def _dataset_done(env: dict[str, str], dataset: str) -> bool:
    result = run_farm(["status", dataset, "--json"], env)
    return result.returncode == 0 and json.loads(result.stdout)[0]["done"]


def test_embedded_default_runs_the_same_path(tmp_path: Path) -> None:
    """Nothing configured: SQLite job store, SQLite broker, local folder, the `tiny` profile."""
    home = tmp_path / "home"
    env = farm_env(FARM_HOME=str(home))
    made = run_farm(["models", "make-tiny"], env)
    assert made.returncode == 0, made.stderr
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "seed": i}) for i, p in enumerate(PROMPTS[:6])))
    submitted = run_farm(["submit", str(prompts), "--dataset", "embedded", "--model", "tiny"], env)
    assert submitted.returncode == 0, submitted.stderr
    assert "6 new jobs" in submitted.stdout

    worker = Worker(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: _dataset_done(env, "embedded"), timeout_s=240, what="embedded dataset", worker=worker)
    finally:
        worker.stop()
    [status] = json.loads(run_farm(["status", "embedded", "--json"], env).stdout)
    assert status["counts"]["succeeded"] == 6

    files = sorted((home / "images" / "embedded").glob("*.png"))
    assert len(files) == 6
    engine = make_engine(f"sqlite:///{home / 'farm.db'}")
    with engine.connect() as conn:
        jobs = list(conn.execute(select(Job.__table__)).all())
    assert sorted(p.as_uri() for p in files) == sorted(j.output_uri for j in jobs)
    for job in jobs:
        data = (home / "images" / "embedded" / f"{job.id}-1.png").read_bytes()
        assert hashlib.sha256(data).hexdigest() == job.sha256
        # The default batch is 8: one pipeline call for all six. Same noise per seed as a single call;
        # GEMMs round differently by batch size, so pixels may differ by one level, never more.
        farm_pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)
        bare_pixels = _bare_render(home / "models" / "tiny", job).astype(int)
        assert np.abs(farm_pixels - bare_pixels).max() <= 1
        assert (farm_pixels != bare_pixels).mean() < 0.01
    assert sorted(j.seed for j in jobs) == list(range(6))


def test_broker_down_at_submit_keeps_jobs_pending_until_dispatch(
    tmp_path: Path, own_pg_url: str, redis_url: str, tiny_model: Path, queue_name: str
) -> None:
    dataset = f"brokerdown-{queue_name}"
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:5]))
    base = dict(
        FARM_HOME=str(tmp_path / "home"),
        FARM_DATABASE_URL=own_pg_url,
        FARM_QUEUE=queue_name,
        FARM_STORAGE_URL=(tmp_path / "images").as_uri(),
    )
    dead = farm_env(**base, FARM_BROKER_URL=f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0")
    down = run_farm(["submit", str(prompts), "--dataset", dataset, "--model", str(tiny_model), "--dispatch"], dead)
    assert down.returncode == 3, down.stdout + down.stderr
    assert "5 new jobs" in down.stdout
    assert "farm dispatch" in down.stderr and "nothing is lost" in down.stderr
    assert "hunter2-secret" not in down.stdout + down.stderr
    [status] = json.loads(run_farm(["status", dataset, "--json"], dead).stdout)
    assert status["counts"]["pending"] == 5

    live = farm_env(**base, FARM_BROKER_URL=redis_url)
    sent = run_farm(["dispatch", "--dataset", dataset], live)
    assert sent.returncode == 0, sent.stderr
    assert "dispatched 5 jobs" in sent.stdout
    assert json.loads(run_farm(["status", dataset, "--json"], live).stdout)[0]["counts"]["queued"] == 5
    again = run_farm(["dispatch", "--dataset", dataset], live)
    assert "dispatched 0 jobs" in again.stdout  # queued jobs are not sent twice

    worker = Worker(live, tmp_path / "worker.log")
    try:
        wait_until(lambda: _dataset_done(live, dataset), timeout_s=240, what="dispatched jobs", worker=worker)
    finally:
        worker.stop()
    [final] = json.loads(run_farm(["status", dataset, "--json"], live).stdout)
    assert final["counts"]["succeeded"] == 5
    assert len(list((tmp_path / "images" / dataset).glob("*.png"))) == 5

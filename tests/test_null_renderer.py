"""The null renderer (models/null.py): synthetic images at once, chosen explicitly, and labelled as such."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from PIL import Image
from sqlalchemy import select

from farm.dispatch.broker import make_celery
from farm.errors import ConfigError
from farm.settings import load_settings
from farm.store.engine import make_engine, open_store
from farm.store.schema import Job
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.record import record
from models.null import null_image
from tests.support.processes import Worker, farm_env, run_farm, wait_until
from workers.runtime import WorkerRuntime
from workers.tasks import render_jobs


def _path(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path))


def test_a_null_worker_renders_a_dataset_of_distinct_images_of_the_asked_size_that_say_null(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = farm_env(FARM_HOME=str(home))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na lighthouse at dusk\na bowl of ramen\n")
    submitted = run_farm(
        ["submit", str(prompts), "--dataset", "ceiling", "--model", "tiny", "--width", "96", "--height", "64",
         "--images-per-prompt", "2"],
        env,
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    worker = Worker(env, tmp_path / "worker.log", extra_args=("--renderer", "null"))
    try:

        def done() -> bool:
            status = json.loads(run_farm(["status", "ceiling", "--json"], env).stdout)
            return bool(status and status[0]["counts"]["succeeded"] == 6)

        wait_until(done, timeout_s=120, what="6 null renders", worker=worker)
        beat = [json.loads(line) for line in run_farm(["workers", "--json"], env).stdout.splitlines()]
    finally:
        worker.stop()
    log = worker.log()
    assert "renderer null" in log
    assert [w["loaded"]["renderer"] for w in beat] == ["null"]  # the heartbeat says so
    assert not (home / "models" / "tiny").exists()  # no model was needed, or made

    engine = make_engine(f"sqlite:///{home / 'farm.db'}")
    with engine.connect() as conn:
        rows = conn.execute(select(Job.output_uri, Job.sha256, Job.recipe, Job.status)).all()
    engine.dispose()
    assert len(rows) == 6 and {row.status for row in rows} == {"succeeded"}
    pixels = set()
    for row in rows:
        recipe = json.loads(row.recipe)
        assert (recipe["renderer"], recipe["sampler"]) == ("null", "null")
        data = _path(row.output_uri).read_bytes()
        assert hashlib.sha256(data).hexdigest() == row.sha256
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (96, 64) and image.mode == "RGB"
            assert json.loads(image.text["recipe"])["renderer"] == "null"  # the PNG says it too
            assert json.loads(image.text["parameters"])["scheduler"] == "null"
            pixels.add(image.tobytes())
            assert len(set(image.tobytes()[::3])) > 50  # not flat
    assert len(pixels) == 6  # every image its own


def test_null_images_are_deterministic_distinct_and_compress_like_photographs() -> None:
    first = null_image("a fox", 7, 256, 256)
    assert first.tobytes() == null_image("a fox", 7, 256, 256).tobytes()
    assert first.tobytes() != null_image("a fox", 8, 256, 256).tobytes()
    assert first.tobytes() != null_image("a cat", 7, 256, 256).tobytes()
    buffer = io.BytesIO()
    first.save(buffer, format="PNG", compress_level=6)
    # Photographs and PixArt renders: PNGs of 0.35-0.75 of the raw size; a flat image would be ≈ 0.
    assert 0.3 < len(buffer.getvalue()) / (256 * 256 * 3) < 0.75
    wide = null_image("a fox", 7, 2112, 64)  # wider than the grain tile: tiled
    assert wide.size == (2112, 64) and wide.mode == "RGB"


def test_a_worker_without_the_option_never_uses_the_null_renderer(tmp_path: Path, tiny_model: Path) -> None:
    assert load_settings({}).renderer == "pixart"
    with pytest.raises(ConfigError, match="renderer"):
        load_settings({"FARM_RENDERER": "fast"})
    toml = tmp_path / "farm.toml"
    toml.write_text('[pools.bench]\nrenderer = "null"\n[pools.real]\ndevice = "cpu"\n')
    pools = load_settings({}, config_file=toml)
    assert pools.pool("bench") == {"renderer": "null"} and "renderer" not in pools.pool("real")

    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://")
    engine = open_store(settings)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    plan = plan_submission(prompts, SubmitOptions(dataset="real", model=str(tiny_model), width=64, height=64))
    record(engine, plan)
    runtime = WorkerRuntime.build(settings, make_celery(settings), name="w-real")
    try:
        assert not runtime.caches.null
        assert render_jobs(runtime, [spec.id_in("real") for spec in plan.specs]).rendered == 2
        assert runtime.uploader.drain(timeout_s=60)
        assert runtime.heartbeat(0).loaded["renderer"] == "pixart"
    finally:
        runtime.leases.stop()
    with engine.connect() as conn:
        rows = conn.execute(select(Job.recipe, Job.prompt, Job.seed)).all()
    for row in rows:
        recipe = json.loads(row.recipe)
        assert "renderer" not in recipe and recipe["sampler"] == "lcm"
    engine.dispose()


def test_the_ceiling_benchmark_measures_the_upload_pool_and_reads_a_profile(tmp_path: Path) -> None:
    from benchmarks.ceiling import bench_uploads, postgres_cpu_delta, summarize_profile

    pool = bench_uploads(size=64, images=8, rate=1000.0, workdir=tmp_path, progress=lambda _line: None)
    assert pool["top_speed"]["images_per_s"] > 0 and pool["one_thread"]["encode_png_ms"] > 0
    assert pool["top_speed"]["peak_images_held"] <= 16
    raw = tmp_path / "profile.txt"
    raw.write_text(
        "thread (11): MainThread;render_jobs (workers/tasks.py:60);claim (farm/store/transitions.py:90) 3\n"
        "thread (12): farm-upload_0;Uploader._store (workers/uploads.py:115);encode_png (workers/png.py:60) 5\n"
        "thread (12): farm-upload_0;Uploader.submit (workers/uploads.py:100);Condition.wait (threading.py:327) 2\n"
    )
    profile = summarize_profile(raw)
    assert profile["thread_names"] == {11: "MainThread", 12: "farm-upload_0"}
    assert profile["by_thread_step"][12]["PNG encode"] == 5 and profile["by_thread_step"][11] == {"claim (SQL)": 3}
    assert sum(profile["by_step"].values()) == 10
    before = {1: ("/usr/lib/postgresql/15/bin/postgres -D /var/lib/x", 1.0), 2: ("postgres: 15/main: walwriter", 0.5)}
    after = {1: (before[1][0], 1.5), 2: (before[2][0], 0.75), 3: ("postgres: 15/main: me db [local] idle", 2.0)}
    assert postgres_cpu_delta(before, after, {3}) == {
        "own_backends_s": 2.0,
        "background_s": 0.75,
        "other_clients_s": 0.0,
    }


def test_the_fleet_generator_replays_the_workers_claim_record_and_heartbeat(own_pg_url: str, tmp_path: Path) -> None:
    from benchmarks.ceiling import bench_fleet

    settings = load_settings({}, home=str(tmp_path / "home"), database_url=own_pg_url, broker_url="memory://")
    result = bench_fleet(settings, jobs=64, processes=2, beats=3, progress=lambda _line: None)
    assert result["mixed"]["images"] == 64 and result["phases"]["images"] == 64  # every job claimed and recorded
    for step in ("claim", "record"):
        assert result["phases"][step]["images_per_s"] > 0
    assert result["phases"]["beats"] == 6 and result["phases"]["beat"]["beats_per_s"] > 0
    # Group commit: tasks of 8 claimed, recorded 24 at a time (and the rest at the end): every job still recorded.
    grouped = bench_fleet(
        settings, jobs=80, processes=2, record_jobs=24, phases=False, beats=1, progress=lambda _line: None
    )
    assert grouped["record_jobs"] == 24 and grouped["mixed"]["images"] == 80
    engine = make_engine(own_pg_url)
    with engine.connect() as conn:  # its datasets are gone, and its incarnations listed as stopped
        assert conn.execute(select(Job.id).limit(1)).first() is None
    engine.dispose()

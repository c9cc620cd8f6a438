"""Routing: each job goes to a live pool that can serve it; the rest wait, with the reason shown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import select

from farm.dispatch.routing import Needs, PoolSpec, Router
from farm.store.engine import make_engine
from farm.store.schema import Dataset, Job
from farm.store.schema import Worker as WorkerRow
from tests.support.processes import Worker, farm_env, run_farm, wait_until

INT8 = PoolSpec("int8", "render.int8", models=("tiny",), controlnets=(), quantize=("int8",))
CONTROL = PoolSpec(
    "control",
    "render.control",
    models=("tiny",),
    controlnets=("tiny-controlnet",),
    max_pixels=256 * 256,
    quantize=("none",),
)


def test_pools_say_why_they_refuse() -> None:
    assert INT8.refuses(Needs("tiny", None, 128 * 128, "int8")) is None
    assert INT8.refuses(Needs("tiny", None, 128 * 128, None)) == "quantize none"
    assert INT8.refuses(Needs("tiny", "tiny-controlnet", 128 * 128, "int8")) == "controlnet tiny-controlnet"
    assert CONTROL.refuses(Needs("tiny", None, 512 * 512, None)) == "262144 pixels (max 65536)"
    assert CONTROL.refuses(Needs("pixart-lcm-1024", None, 128 * 128, None)) == "model pixart-lcm-1024"


def test_routes_to_a_live_pool_and_prefers_one_holding_the_controlnet() -> None:
    needs = Needs("tiny", "tiny-controlnet", 128 * 128, None)
    other = PoolSpec("other", "render.other")  # serves anything
    router = Router("render", [CONTROL, other], {"control": 1, "other": 3}, {"control": {"tiny-controlnet"}})
    assert router.route(needs).queue == "render.control"  # holds the adapter, despite fewer workers
    assert Router("render", [CONTROL, other], {"control": 1, "other": 3}, {}).route(needs).queue == "render.other"
    assert Router("render", [], {}, {}).route(needs).queue == "render"  # no pools: the one queue


def test_a_low_memory_pool_gets_large_tasks() -> None:
    """One T5 load per task: a low-memory pool takes 64 jobs a message (rendered max_batch at a time)."""
    small = PoolSpec.from_options("small", {"low_memory": True, "max_batch": 2})
    sized = PoolSpec.from_options("sized", {"low_memory": True, "task_jobs": 16})
    plain = PoolSpec.from_options("plain", {"max_batch": 8})
    router = Router("render", [small, sized, plain], {}, {})
    assert (small.task_jobs, sized.task_jobs, plain.task_jobs) == (64, 16, None)
    assert router.task_jobs("render.small", 8) == 64
    assert router.task_jobs("render.sized", 8) == 16
    assert router.task_jobs("render.plain", 8) == 8  # FARM_BATCH_SIZE
    assert router.largest_task(8) == 64


def test_unroutable_jobs_carry_the_reason() -> None:
    router = Router("render", [INT8, CONTROL], {"int8": 1}, {})
    refused = router.route(Needs("bench-small", None, 256 * 256, None))
    assert refused.queue is None
    assert refused.reason == "no pool serves these jobs (int8: model bench-small; control: model bench-small)"
    dead = router.route(Needs("tiny", "tiny-controlnet", 128 * 128, None))
    assert dead.queue is None and dead.reason == "no live worker in the pools that can serve these jobs (control)"


POOLS = """
[pools.int8]
models = ["tiny"]
controlnets = []
quantize = ["int8"]
max_batch = 2

[pools.control]
models = ["tiny"]
controlnets = ["tiny-controlnet"]
quantize = ["none"]
max_batch = 2
"""


@pytest.mark.integration
def test_two_pools_each_job_on_a_pool_that_can_serve_it(tmp_path: Path, own_pg_url: str, redis_url: str) -> None:
    (tmp_path / "farm.toml").write_text(POOLS)
    home = tmp_path / "home"
    env = farm_env(
        FARM_HOME=str(home),
        FARM_DATABASE_URL=own_pg_url,
        FARM_BROKER_URL=redis_url,
        FARM_LEASE_S="30",
        FARM_STORAGE_URL=(tmp_path / "images").as_uri(),
    )

    def farm(*args: str) -> str:
        result = run_farm(list(args), env, cwd=tmp_path)
        assert result.returncode in (0, 3), result.stdout + result.stderr
        return result.stdout

    farm("models", "make-tiny")
    farm("models", "make-tiny-controlnet")
    edges = tmp_path / "edges.png"
    Image.fromarray((np.random.default_rng(0).random((128, 128, 3)) > 0.8).astype(np.uint8) * 255).save(edges)
    (tmp_path / "p.txt").write_text("a barn\na silo\na tractor\n")
    pools = [
        Worker(env, tmp_path / f"{name}.log", cwd=tmp_path, extra_args=("--pool", name)) for name in ("int8", "control")
    ]
    try:

        def live() -> int:
            return len([w for w in map(json.loads, farm("workers", "--json").splitlines()) if w["state"] == "alive"])

        wait_until(lambda: live() == 2, timeout_s=120, what="both pools alive", worker=pools[0])
        farm("submit", "p.txt", "--dataset", "eight-bit", "--model", "tiny", "--quantize", "int8")
        farm(
            "submit",
            "p.txt",
            "--dataset",
            "controlled",
            "--controlnet",
            "tiny-controlnet",
            "--control-image",
            str(edges),
        )
        farm("submit", "p.txt", "--dataset", "nobody", "--model", "bench-small", "--no-dispatch")
        assert "3 jobs unroutable" in farm("dispatch", "--dataset", "nobody")
        for name in ("eight-bit", "controlled"):
            wait_until(
                lambda name=name: json.loads(farm("status", name, "--json"))[0]["done"],
                timeout_s=180,
                what=f"dataset {name}",
                worker=pools[1],
            )
    finally:
        for process in pools:
            process.stop()
    engine = make_engine(own_pg_url)
    with engine.connect() as conn:
        placed = conn.execute(
            select(Dataset.name, WorkerRow.pool, Job.status)
            .select_from(Job)
            .join(Dataset)
            .join(WorkerRow, WorkerRow.name == Job.worker, isouter=True)
            .where(Dataset.name.in_(["eight-bit", "controlled", "nobody"]))
        ).all()
    assert sorted(set(map(tuple, placed))) == [
        ("controlled", "control", "succeeded"),
        ("eight-bit", "int8", "succeeded"),
        ("nobody", None, "pending"),
    ]
    [nobody] = json.loads(farm("status", "nobody", "--json"))
    assert nobody["unroutable"] == 3
    assert "no pool serves these jobs" in next(iter(nobody["unroutable_reasons"]))
    assert "unroutable 3: no pool serves these jobs (int8: model bench-small" in farm("status", "nobody")


@pytest.mark.integration
def test_higher_priority_datasets_render_first(
    tmp_path: Path, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    """Both datasets are recorded before the worker starts; its dispatcher sends the urgent one first, on Redis
    priority queues, so the urgent one is claimed first."""
    env = farm_env(
        FARM_HOME=str(tmp_path / "home"),
        FARM_DATABASE_URL=own_pg_url,
        FARM_BROKER_URL=redis_url,
        FARM_QUEUE=queue_name,
        FARM_BATCH_SIZE="2",
        FARM_STORAGE_URL=(tmp_path / "images").as_uri(),
    )
    assert run_farm(["models", "make-tiny"], env).returncode == 0
    (tmp_path / "p.txt").write_text("".join(f"a lamp, take {i}\n" for i in range(6)))
    low, urgent = f"low-{queue_name}", f"urgent-{queue_name}"
    assert run_farm(["submit", str(tmp_path / "p.txt"), "--dataset", low], env).returncode == 0
    assert run_farm(["submit", str(tmp_path / "p.txt"), "--dataset", urgent, "--priority", "9"], env).returncode == 0
    worker = Worker(env, tmp_path / "worker.log", extra_args=("--max-batch", "2"))
    try:
        for name in (low, urgent):
            wait_until(
                lambda name=name: json.loads(run_farm(["status", name, "--json"], env).stdout)[0]["done"],
                timeout_s=180,
                what=f"dataset {name}",
                worker=worker,
            )
    finally:
        worker.stop()
    with make_engine(own_pg_url).connect() as conn:
        rows = conn.execute(
            select(Dataset.name, Job.started_at).join(Dataset).where(Dataset.name.in_([low, urgent]))
        ).all()
    urgent_starts = [r.started_at for r in rows if r.name == urgent]
    low_starts = [r.started_at for r in rows if r.name == low]
    assert len(urgent_starts) == len(low_starts) == 6
    assert max(urgent_starts) <= min(low_starts)  # submitted second, rendered first


def test_lines_with_a_bar_go_only_to_pools_that_load_their_scorer() -> None:
    scoring = PoolSpec.from_options("scoring", {"scorers": ["clip-l14"]})
    plain = PoolSpec.from_options("plain", {})
    needs = Needs("tiny", None, 128 * 128, None, "clip-l14")
    assert plain.refuses(needs) == "scorer clip-l14"  # a pool without `scorers` scores nothing
    assert scoring.refuses(needs) is None
    assert scoring.refuses(Needs("tiny", None, 128 * 128, None, "tiny-scorer")) == "scorer tiny-scorer"
    assert Router("render", [plain, scoring], {"plain": 4, "scoring": 1}, {}).route(needs).queue == "render.scoring"
    assert plain.refuses(Needs("tiny", None, 128 * 128, None)) is None  # jobs without a bar go anywhere

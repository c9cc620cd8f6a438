"""`farm bench`: the farm against bare diffusers on the same machine, model, prompts and seeds.

(a) a bare PixArtAlphaPipeline loop, one prompt per call; (b) the same in batches of B; (c) the whole farm:
submit → the workers' dispatcher → broker → `farm worker` process(es) → storage → every job succeeded. Each side
loads its model and renders a warm-up first, so start-up is not counted; the farm's clock starts when the submit
starts (reading and validating the prompts included) and stops when the last job's object is confirmed.

--model takes any model the farm takes: a profile (bench-small and tiny are built offline on first use), a local
diffusers folder or a hub id. Both sides sample it the way the worker does: a released profile with its release
sampler, anything else with the scheduler its folder ships, at the sampler's default guidance.

The farm side runs its own workers, whose control loop must lead the store's dispatcher: use a store no other
`farm worker` uses (the embedded default, or a database of its own).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from sqlalchemy import select

from farm.errors import UserError
from farm.profiles import PROFILES, model_source, resolve_model
from farm.secrets import redact
from farm.settings import Settings
from farm.store.control import leader_alive
from farm.store.engine import open_store
from farm.store.schema import Job, JobStatus
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.run import submit_plan

Progress = Callable[[str], None]


def bench_prompts(n: int) -> list[tuple[str, int]]:
    """N distinct prompts with fixed seeds, the same for every side of the comparison."""
    subjects = ["lighthouse", "fox", "bakery", "ramen", "tram", "island", "spider web", "astronaut"]
    styles = ["oil painting", "photograph", "watercolor", "isometric render"]
    return [(f"{subjects[i % 8]} number {i}, {styles[i % 4]}", 1000 + i) for i in range(n)]


def ensure_model(settings: Settings, model: str) -> str:
    """The folder or hub id to load; the offline profiles are built on first use."""
    source = model_source(model, settings)
    if model in ("bench-small", "tiny") and not (Path(source) / "model_index.json").is_file():
        if model == "bench-small":
            from models.bench_small import make_bench_small

            make_bench_small(source)
        else:
            from models.tiny import make_tiny

            make_tiny(source)
    return source


def run_bench(
    settings: Settings,
    *,
    model: str = "bench-small",
    prompts: int = 32,
    batch_size: int = 4,
    workers: int = 1,
    width: int | None = None,
    height: int | None = None,
    num_inference_steps: int = 4,
    progress: Progress = print,
) -> dict[str, Any]:
    """Measure (a), (b) and (c) in one run; returns every figure (farm bench --json writes it)."""
    source = ensure_model(settings, model)
    choice = resolve_model(source if model not in PROFILES else model, settings)
    profile = PROFILES.get(model)
    # As the worker loads it (workers/caches.py): a released profile's sampler, else the folder's own scheduler.
    sampler = profile.sampler.name if profile is not None and profile.sampler is not None else None
    guidance = choice.sampler.default_guidance
    items = bench_prompts(prompts)
    bare = _bare(source, sampler, guidance, items, batch_size, width, height, num_inference_steps, progress)
    farm = _farm(settings, model, guidance, items, batch_size, workers, width, height, num_inference_steps, progress)
    a, b, c = bare["a_images_per_s"], bare["b_images_per_s"], farm["images_per_s"]
    return {
        "model": model,
        "source": source,
        "sampler": sampler or "the folder's own",
        "guidance_scale": guidance,
        "prompts": prompts,
        "batch_size": batch_size,
        "workers": workers,
        "size": [bare["width"], bare["height"]],
        "num_inference_steps": num_inference_steps,
        "store": redact(settings.database_url),
        "broker": redact(settings.broker_url),
        "storage": redact(settings.storage_url),
        "a_bare_loop": {"seconds": bare["a_s"], "images_per_s": a},
        "b_bare_batched": {"seconds": bare["b_s"], "images_per_s": b},
        "c_farm": farm,
        "c_over_a": c / a,
        "c_over_b": c / b,
        "overhead_ms_per_image": (farm["seconds"] - bare["b_s"]) / prompts * 1000,
        "machine": _machine(),
    }


def _bare(
    source: str,
    sampler: str | None,
    guidance: float,
    items: list[tuple[str, int]],
    batch: int,
    width: int | None,
    height: int | None,
    steps: int,
    progress: Progress,
) -> dict[str, Any]:
    import torch
    from diffusers import PixArtAlphaPipeline

    from models.scheduler import release_scheduler

    # Bare diffusers, as a user would write it: no farm code on this side but the released scheduler's settings.
    pipe = PixArtAlphaPipeline.from_pretrained(source)
    if sampler is not None:
        pipe.scheduler = release_scheduler(sampler)
    pipe.set_progress_bar_config(disable=True)
    native = pipe.transformer.config.sample_size * 8
    w, h = width or native, height or native
    binning = pipe.transformer.config.sample_size in (32, 64, 128)

    def call(chunk: list[tuple[str, int]]) -> None:
        with torch.inference_mode():
            pipe(
                prompt=[p for p, _ in chunk],
                generator=[torch.Generator().manual_seed(s) for _, s in chunk],
                num_inference_steps=steps,
                guidance_scale=guidance,
                width=w,
                height=h,
                use_resolution_binning=binning,
                clean_caption=False,
                output_type="pil",
            )

    call(items[:batch])  # warm-up: kernels, allocator
    progress(f"(a) bare loop: {len(items)} images, one per call")
    started = time.perf_counter()
    for item in items:
        call([item])
    a_s = time.perf_counter() - started
    progress(f"(b) bare batched: {len(items)} images, {batch} per call")
    started = time.perf_counter()
    for start in range(0, len(items), batch):
        call(items[start : start + batch])
    b_s = time.perf_counter() - started
    return {
        "a_s": a_s,
        "b_s": b_s,
        "a_images_per_s": len(items) / a_s,
        "b_images_per_s": len(items) / b_s,
        "width": w,
        "height": h,
    }


def _farm(
    settings: Settings,
    model: str,
    guidance: float,
    items: list[tuple[str, int]],
    batch: int,
    workers: int,
    width: int | None,
    height: int | None,
    steps: int,
    progress: Progress,
) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:8]
    settings = replace(settings, queue=f"bench-{tag}", batch_size=batch)
    engine = open_store(settings)
    if leader_alive(engine):
        raise UserError(
            "another `farm worker` leads this job store's dispatcher, so it would send the benchmark's jobs to its "
            "own queue: run `farm bench` on a store of its own (FARM_HOME for the embedded default, or another "
            "FARM_DATABASE_URL)"
        )
    workdir = settings.home / "bench" / tag
    workdir.mkdir(parents=True, exist_ok=True)
    env = _worker_env(settings)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "farm", "worker", "--loglevel", "INFO", "--max-batch", str(batch)],
            env=env,
            stdout=(workdir / f"worker{i}.log").open("w"),
            stderr=subprocess.STDOUT,
        )
        for i in range(workers)
    ]
    try:
        # Warm-up: each worker loads the model and renders once before the clock starts.
        progress(f"(c) farm: starting {workers} worker process(es) and warming them up")
        warm = _submit(
            engine,
            settings,
            workdir,
            f"bench-warmup-{tag}",
            model,
            guidance,
            [(f"warm-up {i}", i) for i in range(batch * workers)],
            width,
            height,
            steps,
        )
        _wait(engine, warm, timeout_s=900, procs=procs)
        progress(f"(c) farm: {len(items)} images through submit → broker → worker → storage")
        started = time.perf_counter()
        dataset_id = _submit(engine, settings, workdir, f"bench-{tag}", model, guidance, items, width, height, steps)
        _wait(engine, dataset_id, timeout_s=3600, procs=procs)
        seconds = time.perf_counter() - started
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=120)
    with engine.connect() as conn:
        rows = conn.execute(select(Job.created_at, Job.finished_at, Job.render_ms).where(Job.dataset_id == dataset_id))
        latencies = sorted((r.finished_at - r.created_at).total_seconds() for r in rows)
    return {
        "seconds": seconds,
        "images_per_s": len(items) / seconds,
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p95_s": _percentile(latencies, 95),
        "worker_logs": str(workdir),
    }


def _submit(
    engine: Any,
    settings: Settings,
    workdir: Path,
    name: str,
    model: str,
    guidance: float,
    items: list[tuple[str, int]],
    width: int | None,
    height: int | None,
    steps: int,
) -> int:
    """What `farm submit` does (read, validate, record); the workers' dispatcher sends the jobs."""
    path = workdir / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "seed": s}) + "\n" for p, s in items))
    options = SubmitOptions(
        dataset=name, model=model, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance
    )
    result = submit_plan(settings, plan_submission(path, options), engine=engine)
    assert result.dataset_id is not None
    return result.dataset_id


def _wait(engine: Any, dataset_id: int, *, timeout_s: float, procs: list[subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + timeout_s
    finished = [JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELED.value]
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            left = conn.execute(
                select(Job.id).where(Job.dataset_id == dataset_id, Job.status.not_in(finished)).limit(1)
            ).first()
        if left is None:
            return
        if any(p.poll() is not None for p in procs):
            raise RuntimeError("a benchmark worker exited early; see its log under FARM_HOME/bench/")
        time.sleep(0.05)
    raise TimeoutError(f"benchmark dataset {dataset_id} did not finish in {timeout_s} s")


def _worker_env(settings: Settings) -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    for key, value in (
        ("HOME", settings.home),
        ("DATABASE_URL", settings.database_url),
        ("BROKER_URL", settings.broker_url),
        ("STORAGE_URL", settings.storage_url),
        ("S3_ENDPOINT_URL", settings.s3_endpoint_url),
        ("S3_REGION", settings.s3_region),
        ("QUEUE", settings.queue),
        ("BATCH_SIZE", settings.batch_size),
        ("DEVICE", settings.device),
        ("DTYPE", settings.dtype),
    ):
        if value is not None:
            env[f"FARM_{key}"] = str(value)
    return env


def _percentile(values: list[float], pct: float) -> float:
    if not values:
        return math.nan
    index = min(len(values) - 1, max(0, math.ceil(pct / 100 * len(values)) - 1))
    return values[index]


def _machine() -> dict[str, Any]:
    import os
    import platform

    import torch

    return {
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def summary(result: dict[str, Any]) -> str:
    """The figures as a few lines of text."""
    c = result["c_farm"]
    return "\n".join(
        [
            f"model {result['model']} {result['size'][0]}x{result['size'][1]}, {result['num_inference_steps']} steps, "
            f"{result['prompts']} images, batch {result['batch_size']}, {result['workers']} worker(s)",
            f"(a) bare loop      {result['a_bare_loop']['images_per_s']:.3f} img/s",
            f"(b) bare batched   {result['b_bare_batched']['images_per_s']:.3f} img/s",
            f"(c) farm           {c['images_per_s']:.3f} img/s   latency p50 {c['latency_p50_s']:.2f} s, "
            f"p95 {c['latency_p95_s']:.2f} s",
            f"c/a {result['c_over_a']:.3f}   c/b {result['c_over_b']:.3f}   "
            f"farm overhead {result['overhead_ms_per_image']:.1f} ms/image",
        ]
    )

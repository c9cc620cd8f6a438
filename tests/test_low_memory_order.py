"""The worker's low-memory mode in the paper's order: T5 alone on the device for a whole task's new prompts, at the
jobs' T5 precision, freed before the transformer and VAE are placed; and what `quantize` means to a worker."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from sqlalchemy import select, update

from farm.dispatch.broker import make_celery
from farm.job import Claimed
from farm.settings import Settings, load_settings
from farm.storage import open_storage, storage_for
from farm.store.engine import open_store
from farm.store.schema import Job
from farm.submit.plan import SubmitOptions, plan_submission, store_conditions
from farm.submit.record import record
from models.pipeline import load_pipeline
from models.quantize import encode_prompts, load_text_encoder_8bit, load_tokenizer
from models.tiny import make_tiny
from workers.caches import PipelineCache, RenderCaches
from workers.runtime import WorkerRuntime
from workers.tasks import render_jobs

# What the worker logs for each step of the order (workers/runtime.py wires RenderCaches.on_event to it).
_STEP = re.compile(r"event=(\w+) detail=(\S+) worker=(\S+)")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FARM_HOME with the tiny model (the `tiny` profile)."""
    root = tmp_path_factory.mktemp("lowmem-home")
    make_tiny(root / "models" / "tiny", seed=0)
    return root


def _settings(home: Path, tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings(
        {}, home=str(home), broker_url="memory://", database_url=f"sqlite:///{tmp_path}/f.db", **overrides
    )


def _runtime(settings: Settings, **kw: Any) -> WorkerRuntime:
    return WorkerRuntime.build(settings, make_celery(settings), name="w-lowmem", **kw)


def _submit(settings: Settings, tmp_path: Path, name: str, rows: list[dict[str, object]], **options: Any) -> list[str]:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_submission(path, SubmitOptions(dataset=name, model="tiny", **options))
    record(open_store(settings), store_conditions(plan, open_storage(settings.storage_url)))
    return plan.ids


def _steps(caplog: pytest.LogCaptureFixture) -> list[tuple[str, str]]:
    """(name, detail) of every model-level step the worker logged, in order."""
    found = [_STEP.search(r.getMessage()) for r in caplog.records if r.name == "farm.worker"]
    return [(m.group(1), m.group(2)) for m in found if m is not None]


def _names(steps: list[tuple[str, str]]) -> list[str]:
    return [name for name, _detail in steps]


def _claimed(
    prompt: str, *, quantize: str | None = None, guidance: float = 0.0, negative: str | None = None
) -> Claimed:
    return Claimed(
        prompt=prompt,
        seed=0,
        width=128,
        height=128,
        num_inference_steps=2,
        guidance_scale=guidance,
        model="tiny",
        source_line=None,
        quantize=quantize,
        negative_prompt=negative,
        id=f"{abs(hash((prompt, quantize, guidance, negative))):032x}"[:32],
        dataset_id=1,
        attempts=1,
        claim_seq=1,
    )


def _caches(settings: Settings, *, low_memory: bool = True) -> tuple[RenderCaches, list[tuple[str, str]]]:
    caches = RenderCaches(settings, storage_for(settings), PipelineCache(settings, low_memory=low_memory))
    steps: list[tuple[str, str]] = []
    caches.on_event = lambda name, detail: steps.append((name, detail))
    return caches, steps


def test_a_low_memory_worker_encodes_a_task_with_one_t5_freed_before_the_pipeline_is_placed(
    home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="farm.worker")
    settings = _settings(home, tmp_path)
    prompts = [f"a {thing} in the rain" for thing in ("kite", "boat", "cat", "dog", "house", "bird")]
    ids = _submit(settings, tmp_path, "first", [{"prompt": p} for p in prompts], images_per_prompt=2)
    rt = _runtime(settings, low_memory=True, max_batch=2)

    render_jobs(rt, ids)  # 12 jobs, 6 batches of 2
    assert rt.uploader.drain(timeout_s=120)
    assert rt.stats.succeeded == 12

    steps = _steps(caplog)
    # The order of the 8 GB recipe: T5 loaded at the jobs' precision (full here: no --quantize), every new prompt
    # encoded, T5 freed, and only then the transformer and VAE loaded onto the device. Once for the task, not per batch.
    assert _names(steps) == ["t5_loaded", "t5_released", "pipeline_placed"], steps
    assert steps[0][1] == "tiny|full" and steps[2][1] == "cpu"
    assert all(worker.startswith("w-lowmem#") for worker in re.findall(r"detail=\S+ worker=(\S+)", caplog.text))
    assert rt.caches.t5_loads == 1
    assert rt.caches.prompts.misses == 0  # filled before rendering, so the pipeline only ever hits
    pipe = rt.pipelines.get("tiny")
    assert pipe.text_encoder is None  # never resident
    # Low-memory mode decodes a batch one image at a time; tiling would change pixels, so it stays off.
    assert pipe.vae.use_slicing and not pipe.vae.use_tiling

    # A second task whose prompts are all cached (other seeds) loads no T5 and moves nothing.
    caplog.clear()
    again = _submit(settings, tmp_path, "again", [{"prompt": p, "seed": 99} for p in prompts[:3]])
    render_jobs(rt, again)
    assert rt.uploader.drain(timeout_s=120)
    assert rt.stats.succeeded == 15
    assert _steps(caplog) == []
    assert rt.caches.t5_loads == 1


def test_the_order_moves_a_placed_pipeline_off_the_device_first(home: Path, tmp_path: Path) -> None:
    """With a pipeline already on an accelerator: off (pipeline_offloaded), T5, T5 freed, then back on."""
    settings = _settings(home, tmp_path)
    caches, steps = _caches(settings)

    class OnAccelerator:
        """Stands in for a pipeline on a GPU: records where it is moved (this machine may have none)."""

        def __init__(self, eight_bit: bool = False) -> None:
            self.device = torch.device("cuda", 0)
            self.transformer = SimpleNamespace(is_loaded_in_8bit=eight_bit)
            self.moves: list[str] = []

        def to(self, device: str) -> OnAccelerator:
            self.moves.append(str(device))
            self.device = torch.device(device)
            return self

    placed = OnAccelerator()
    caches.pipelines.loaded[("tiny", None)] = placed
    caches.prepare([_claimed("a lighthouse")])
    assert _names(steps) == ["pipeline_offloaded", "t5_loaded", "t5_released", "pipeline_placed"], steps
    assert placed.moves == ["cpu", "cpu"]  # off, then back to the worker's device (the CPU here)
    assert caches.pipelines.get("tiny") is placed and not caches.pipelines.offloaded

    # An 8-bit transformer cannot be moved: the pipeline is dropped and loaded again after T5 is freed.
    steps.clear()
    caches.pipelines.loaded.clear()
    caches.pipelines.loaded[("tiny", None)] = OnAccelerator(eight_bit=True)
    caches.prepare([_claimed("a windmill")])
    assert _names(steps) == ["pipeline_offloaded", "t5_loaded", "t5_released", "pipeline_placed"], steps
    assert steps[0][1].endswith("|dropped")
    assert not isinstance(caches.pipelines.get("tiny"), OnAccelerator)  # the real pipeline, loaded afterwards
    assert caches.t5_loads == 2


def test_prepare_gathers_prompts_and_negative_prompts_per_t5_precision(home: Path, tmp_path: Path) -> None:
    settings = _settings(home, tmp_path)
    caches, steps = _caches(settings)
    jobs = [
        _claimed("a kite"),
        _claimed("a kite", guidance=4.5, negative="blurry"),
        _claimed("a boat", guidance=4.5),  # no negative prompt: PixArt's ""
        _claimed("a boat", quantize="int8"),
        _claimed("a tram", quantize="int8-transformer"),  # shares the 8-bit T5 and its cache entries with int8
    ]
    assert caches.prompt_key(jobs[3]) == caches.prompt_key(jobs[4]) == "tiny|int8"
    assert caches.prompt_key(jobs[0]) == "tiny|full"
    caches.prepare(jobs)
    # One T5 load per (model, T5 precision) for the whole task, both before the pipeline is placed.
    assert [s for s in steps if s[0] == "t5_loaded"] == [("t5_loaded", "tiny|full"), ("t5_loaded", "tiny|int8")]
    assert _names(steps)[-1] == "pipeline_placed" and caches.t5_loads == 2
    cached = set(caches.prompts.cached_keys())
    assert cached == {
        ("tiny|full", "a kite"),
        ("tiny|full", "blurry"),
        ("tiny|full", "a boat"),
        ("tiny|full", ""),
        ("tiny|int8", "a boat"),
        ("tiny|int8", "a tram"),
    }
    # Everything cached: a second prepare (or the per-batch fallback) loads nothing.
    steps.clear()
    caches.prepare(jobs)
    caches.encode_missing_prompts(jobs[3], ["a boat", "a tram"])
    assert steps == [] and caches.t5_loads == 2


def test_a_low_memory_worker_encodes_each_job_at_its_own_t5_precision(home: Path, tmp_path: Path) -> None:
    settings = _settings(home, tmp_path)
    prompt = "a teapot on a table"
    full = _submit(settings, tmp_path, "full", [{"prompt": prompt, "seed": 3}])
    int8 = _submit(settings, tmp_path, "int8", [{"prompt": prompt, "seed": 3}], quantize="int8")
    rt = _runtime(settings, low_memory=True, max_batch=2)
    steps: list[tuple[str, str]] = []
    rt.caches.on_event = lambda name, detail: steps.append((name, detail))

    render_jobs(rt, full + int8)  # one task, two T5 precisions
    assert rt.uploader.drain(timeout_s=120)
    assert rt.stats.succeeded == 2
    loads = [detail for name, detail in steps if name == "t5_loaded"]
    assert sorted(loads) == ["tiny|full", "tiny|int8"] and rt.caches.t5_loads == 2
    first_placed = _names(steps).index("pipeline_placed")
    assert _names(steps)[:first_placed] == ["t5_loaded", "t5_released"] * 2  # both encoded before any placing

    got_full, mask_full = rt.caches.prompts.get(("tiny|full", prompt))
    got_int8, mask_int8 = rt.caches.prompts.get(("tiny|int8", prompt))
    assert not torch.equal(got_full, got_int8.to(got_full.dtype))  # different precisions, different embeddings
    assert torch.equal(mask_full, mask_int8)

    source = home / "models" / "tiny"
    # Full precision: what a worker with a resident T5 (not low-memory) encodes, exactly.
    expected_full, _ = encode_prompts(load_pipeline(str(source), device="cpu"), [prompt])
    assert got_full.dtype == torch.float32 and torch.equal(got_full, expected_full)
    # 8-bit: what the 8-bit T5 encodes (fp16 non-int8 parts), in the worker's dtype.
    expected_int8, _ = encode_prompts((load_tokenizer(source), load_text_encoder_8bit(source)), [prompt])
    assert torch.equal(got_int8, expected_int8.to(torch.float32))
    # The 8-bit T5 stays close to full precision: a quantization, not another model.
    error = float((got_int8 - got_full).norm() / got_full.norm())
    assert 0 < error < 5e-2


def test_an_8bit_transformer_job_fails_on_the_cpu_naming_cuda(
    home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: an 8-bit transformer loads here")
    caplog.set_level(logging.INFO, logger="farm.worker")
    settings = _settings(home, tmp_path, max_attempts=1)
    [job_id] = _submit(settings, tmp_path, "int8t", [{"prompt": "a lamp", "seed": 1}], quantize="int8")
    engine = open_store(settings)
    with engine.begin() as conn:  # what `--quantize int8-transformer` stores
        conn.execute(update(Job).where(Job.id == job_id).values(quantize="int8-transformer"))
    rt = _runtime(settings, low_memory=True)

    outcome = render_jobs(rt, [job_id])
    assert rt.uploader.drain(timeout_s=120)
    assert outcome.render_failed == 1 and rt.stats.succeeded == 0
    with engine.connect() as conn:
        status, error = conn.execute(select(Job.status, Job.error).where(Job.id == job_id)).one()
    assert status == "failed"
    assert error is not None and "CUDA" in error and "8-bit transformer" in error
    assert ("tiny", "int8-transformer") not in rt.pipelines.loaded

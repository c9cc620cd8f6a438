"""The worker's PixArt-δ paths with real parts: ControlNet-Transformer, caches, 8-bit T5, the 8 GB recipe."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sqlalchemy import select

from farm.dispatch.broker import make_celery
from farm.settings import Settings, load_settings
from farm.storage import open_storage
from farm.store.engine import open_store
from farm.store.schema import Job
from farm.submit.plan import SubmitOptions, plan_submission, store_conditions
from farm.submit.record import record
from models.controlnet import make_tiny_controlnet
from models.pipeline import RenderRequest, render_batch
from models.tiny import make_tiny
from tests.support.processes import Worker, farm_env, run_farm, wait_until
from workers.runtime import WorkerRuntime
from workers.tasks import render_jobs


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A FARM_HOME with the tiny model and a tiny adapter built from it (the `tiny`, `tiny-controlnet` profiles)."""
    root = tmp_path_factory.mktemp("control-home")
    make_tiny(root / "models" / "tiny", seed=0)
    make_tiny_controlnet(root / "models" / "tiny-controlnet", root / "models" / "tiny", seed=0)
    return root


def _condition(path: Path, seed: int) -> Path:
    """A soft-edge-like condition: random strokes on black."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((128, 128, 3), np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, 120, size=2)
        pixels[y : y + 4, x : x + 60] = 255
    Image.fromarray(pixels).save(path)
    return path


def _runtime(settings: Settings, **kw: object) -> WorkerRuntime:
    return WorkerRuntime.build(settings, make_celery(settings), name="w-control", **kw)  # type: ignore[arg-type]


def _submit(
    settings: Settings, tmp_path: Path, name: str, rows: list[dict[str, object]], **options: object
) -> list[str]:
    path = tmp_path / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plan = plan_submission(path, SubmitOptions(dataset=name, model="tiny", **options))  # type: ignore[arg-type]
    storage = open_storage(settings.storage_url)
    record(open_store(settings), store_conditions(plan, storage))
    return plan.ids


def _image(settings: Settings, name: str, job_id: str) -> np.ndarray:
    data = (settings.home / "images" / name / f"{job_id}-1.png").read_bytes()
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(int)


def test_controlled_jobs_render_with_their_own_conditions_and_caches_count(home: Path, tmp_path: Path) -> None:
    settings = load_settings({}, home=str(home), broker_url="memory://", database_url=f"sqlite:///{tmp_path}/f.db")
    edges = [_condition(tmp_path / f"edges{i}.png", i) for i in range(2)]
    rows = [
        {"prompt": "a cabin in the woods", "seed": 7, "control_image": str(edges[0])},
        {"prompt": "a cabin in the woods", "seed": 8, "control_image": str(edges[0])},
        {"prompt": "a cabin in the woods", "seed": 7, "control_image": str(edges[1])},
    ]
    ids = _submit(settings, tmp_path, "ctl", rows, controlnet="tiny-controlnet")
    rt = _runtime(settings, max_batch=3)

    outcome = render_jobs(rt, ids)
    assert rt.uploader.drain(timeout_s=120)  # its uploads stored and recorded

    assert outcome.rendered == 3 and rt.stats.succeeded == 3
    stats = rt.caches.stats()
    assert (stats["conditions"]["misses"], stats["conditions"]["hits"]) == (2, 1)  # edges0 encoded once
    assert (stats["prompts"]["misses"], stats["prompts"]["hits"]) == (1, 2)  # one prompt, encoded once
    assert stats["adapters"]["misses"] == 1
    # Every controlled image differs from the uncontrolled render with the same prompt and seed.
    pipe = rt.pipelines.get("tiny")
    plain = render_batch(pipe, [RenderRequest(r["prompt"], r["seed"], 128, 128) for r in rows])  # type: ignore[arg-type]
    for job_id, uncontrolled in zip(ids, plain, strict=True):
        controlled = _image(settings, "ctl", job_id)
        assert np.abs(controlled - np.asarray(uncontrolled).astype(int)).mean() > 1.0
    # Same prompt and seed, different condition → different image: each image gets its own condition.
    other_condition = np.abs(_image(settings, "ctl", ids[0]) - _image(settings, "ctl", ids[2]))
    # Far above batching noise (a few pixels off by one level, mean ≈ 0.005), far below the adapter's
    # full effect: with random weights most of the residual is position embedding, the same for both.
    assert other_condition.mean() > 0.1 and other_condition.max() > 2


def test_one_prompt_with_eight_seeds_runs_t5_once(home: Path, tmp_path: Path) -> None:
    settings = load_settings({}, home=str(home), broker_url="memory://", database_url=f"sqlite:///{tmp_path}/f.db")
    ids = _submit(settings, tmp_path, "seeds", [{"prompt": "a red bicycle"}], images_per_prompt=8)
    rt = _runtime(settings, max_batch=3)
    pipe = rt.pipelines.get("tiny")
    calls: list[int] = []
    hook = pipe.text_encoder.register_forward_hook(lambda _m, args, _o: calls.append(len(args[0])))
    try:
        render_jobs(rt, ids)
        assert rt.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    finally:
        hook.remove()
    assert rt.stats.succeeded == 8
    assert calls == [1]  # one encoder call, for one prompt, across three pipeline calls
    assert (rt.caches.prompts.misses, rt.caches.prompts.hits) == (1, 7)


def test_int8_jobs_use_an_8bit_t5_on_the_cpu(home: Path, tmp_path: Path) -> None:
    settings = load_settings({}, home=str(home), broker_url="memory://", database_url=f"sqlite:///{tmp_path}/f.db")
    ids = _submit(settings, tmp_path, "int8", [{"prompt": "a teapot", "seed": 3}], quantize="int8")
    rt = _runtime(settings)
    render_jobs(rt, ids)
    assert rt.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    assert rt.stats.succeeded == 1
    pipe = rt.pipelines.get("tiny", "int8")
    _tokenizer, encoder = rt.pipelines.encoders[("tiny", "int8")]
    assert pipe.text_encoder is None  # kept beside the pipeline, which would cast embeddings to fp16
    int8 = [m for m in encoder.modules() if m.__class__.__name__ == "Linear8bitLt"]
    assert int8, "T5's linear layers should be bitsandbytes int8"
    assert pipe.transformer.dtype == torch.float32  # "int8" is the T5 only ("int8-transformer": CUDA only)
    with open_store(settings).connect() as conn:
        assert conn.execute(select(Job.quantize).where(Job.id == ids[0])).scalar_one() == "int8"


def test_low_memory_mode_encodes_with_a_transient_8bit_t5(home: Path, tmp_path: Path) -> None:
    settings = load_settings({}, home=str(home), broker_url="memory://", database_url=f"sqlite:///{tmp_path}/f.db")
    rows = [{"prompt": "a kite"}, {"prompt": "a boat"}]
    # The T5 precision is the job's: --quantize int8 (the paper's recipe); without it T5 runs at full precision.
    ids = _submit(settings, tmp_path, "lowmem", rows, images_per_prompt=2, quantize="int8")
    rt = _runtime(settings, low_memory=True, max_batch=2)
    render_jobs(rt, ids)
    assert rt.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    assert rt.stats.succeeded == 4
    assert rt.pipelines.get("tiny", "int8").text_encoder is None  # never resident
    assert not rt.pipelines.encoders  # nor kept beside the pipeline: loaded for the task's prompts, then freed
    assert set(rt.caches.prompts.cached_keys()) == {("tiny|int8", "a kite"), ("tiny|int8", "a boat")}
    assert rt.caches.t5_loads == 1  # once for the task's prompts (RenderCaches.prepare), not once per batch
    assert rt.caches.prompts.misses == 0  # filled before rendering, so the pipeline only ever hits


@pytest.mark.integration
def test_controlled_dataset_through_a_real_worker_process(tmp_path: Path) -> None:
    """End to end on the embedded default with the CLI: canny conditions, tiny model, tiny adapter."""
    env = farm_env(FARM_HOME=str(tmp_path / "home"))
    assert run_farm(["models", "make-tiny"], env).returncode == 0
    assert run_farm(["models", "make-tiny-controlnet"], env).returncode == 0
    rows = []
    for i in range(3):
        source = _condition(tmp_path / f"photo{i}.png", 10 + i)
        edges = tmp_path / f"edges{i}.png"
        made = run_farm(["condition", "canny", str(source), str(edges)], env)
        assert made.returncode == 0, made.stderr
        rows.append({"prompt": f"a house number {i}", "seed": 100 + i, "control_image": edges.name})
    prompts = tmp_path / "controlled.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    submitted = run_farm(
        [
            "submit",
            str(prompts),
            "--dataset",
            "controlled",
            "--controlnet",
            "tiny-controlnet",
            "--conditioning-scale",
            "1.0",
        ],
        env,
    )
    assert submitted.returncode == 0, submitted.stderr

    worker = Worker(env, tmp_path / "worker.log")
    try:
        wait_until(
            lambda: json.loads(run_farm(["status", "controlled", "--json"], env).stdout)[0]["done"],
            timeout_s=240,
            what="controlled dataset",
            worker=worker,
        )
    finally:
        worker.stop()
    [status] = json.loads(run_farm(["status", "controlled", "--json"], env).stdout)
    assert status["counts"]["succeeded"] == 3, worker.log()[-3000:]
    assert "caches:" in worker.log()

    from diffusers import PixArtAlphaPipeline

    bare = PixArtAlphaPipeline.from_pretrained(tmp_path / "home" / "models" / "tiny")
    bare.set_progress_bar_config(disable=True)
    images = sorted((tmp_path / "home" / "images" / "controlled").glob("*.png"))
    assert len(images) == 3
    for path in images:
        image = Image.open(path)
        seed = int(image.text["seed"])
        uncontrolled = bare(
            prompt=image.text["prompt"],
            num_inference_steps=4,
            guidance_scale=0.0,
            width=128,
            height=128,
            generator=torch.Generator().manual_seed(seed),
            use_resolution_binning=False,
            clean_caption=False,
        ).images[0]
        diff = np.abs(np.asarray(image.convert("RGB")).astype(int) - np.asarray(uncontrolled).astype(int))
        assert diff.mean() > 1.0, f"{path.name} looks uncontrolled"

"""The released ControlNet's recipe at submit and on a worker: base model, sampler, pinned steps, HED, geometry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from farm.dispatch.broker import make_celery
from farm.errors import InvalidSubmission
from farm.settings import load_settings
from farm.storage import storage_for
from farm.store.engine import open_store
from farm.store.schema import Job
from farm.submit.plan import SubmitOptions, file_sha256, plan_submission, store_conditions
from farm.submit.record import record
from models.controlnet import make_tiny_controlnet
from models.hed import save_random_hed
from workers.runtime import WorkerRuntime
from workers.tasks import render_jobs


@pytest.fixture(scope="module")
def hed_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_random_hed(tmp_path_factory.mktemp("hed") / "ControlNetHED.pth", seed=3)


def _photo(path: Path, size: tuple[int, int]) -> Path:
    image = Image.new("RGB", size, (200, 180, 90))
    for x in range(size[0] // 3, 2 * size[0] // 3):
        for y in range(size[1] // 4, 3 * size[1] // 4):
            image.putpixel((x, y), (20, 40, 160))
    image.save(path)
    return path


def _prompts(tmp_path: Path) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("a house by a lake\n")
    return path


def test_the_released_controlnet_defaults_to_the_demos_recipe(tmp_path: Path, hed_weights: Path) -> None:
    photo = _photo(tmp_path / "photo.png", (200, 100))
    options = SubmitOptions(
        dataset="d", controlnet="pixart-hed-controlnet", control_image=photo, hed_weights=hed_weights
    )
    (spec,) = plan_submission(_prompts(tmp_path), options).specs
    assert spec.model == "pixart-xl-1024"  # the base it was trained on, not the LCM transformer
    assert (spec.num_inference_steps, spec.guidance_scale) == (14, 4.5)
    assert spec.control_preprocess == f"hed:{file_sha256(hed_weights)}"
    # No size given: the condition's own (rounded to 16); the pipeline picks the bucket from its aspect ratio.
    assert (spec.width, spec.height) == (208, 96)


def test_the_recipe_refuses_another_base_model_or_step_count(tmp_path: Path, hed_weights: Path) -> None:
    photo = _photo(tmp_path / "photo.png", (64, 64))
    base = {"dataset": "d", "controlnet": "pixart-hed-controlnet", "control_image": photo, "hed_weights": hed_weights}
    with pytest.raises(InvalidSubmission, match=r"runs on pixart-xl-1024.*use pixart-hed-controlnet-lcm") as info:
        plan_submission(_prompts(tmp_path), SubmitOptions(**base, model="pixart-lcm-1024"))
    assert info.value.field == "model"
    with pytest.raises(InvalidSubmission, match="at 14 steps") as info:
        plan_submission(_prompts(tmp_path), SubmitOptions(**base, num_inference_steps=20))
    assert info.value.field == "num_inference_steps"
    # The experimental LCM combination is there when named.
    (spec,) = plan_submission(
        _prompts(tmp_path), SubmitOptions(**{**base, "controlnet": "pixart-hed-controlnet-lcm"})
    ).specs
    assert (spec.model, spec.num_inference_steps, spec.guidance_scale) == ("pixart-lcm-1024", 4, 0.0)


def test_hed_needs_its_weights_at_submit_and_they_join_the_id(tmp_path: Path, hed_weights: Path) -> None:
    photo = _photo(tmp_path / "photo.png", (64, 64))
    base = {"dataset": "d", "model": "tiny", "controlnet": "tiny-controlnet", "control_image": photo}
    missing = tmp_path / "nowhere" / "ControlNetHED.pth"
    with pytest.raises(InvalidSubmission, match="HED weights") as info:
        plan_submission(_prompts(tmp_path), SubmitOptions(**base, condition="hed", hed_weights=missing))
    assert info.value.field == "condition" and str(missing) in str(info.value)
    plain = plan_submission(_prompts(tmp_path), SubmitOptions(**base))
    hed = plan_submission(_prompts(tmp_path), SubmitOptions(**base, condition="hed", hed_weights=hed_weights))
    other = save_random_hed(tmp_path / "other" / "ControlNetHED.pth", seed=4)
    hed2 = plan_submission(_prompts(tmp_path), SubmitOptions(**base, condition="hed", hed_weights=other))
    assert plain.specs[0].control_preprocess is None
    assert len({plain.ids[0], hed.ids[0], hed2.ids[0]}) == 3  # the preprocessing and its weights are inputs


def test_a_worker_renders_a_hed_job_from_the_raw_photo(
    tmp_path: Path, tiny_model: Path, hed_weights: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FARM_HED_WEIGHTS", str(hed_weights))
    settings = load_settings(home=str(tmp_path / "home"), broker_url="memory://")
    assert settings.hed_weights_path == hed_weights
    adapter = make_tiny_controlnet(tmp_path / "adapter", transformer_source=tiny_model)
    engine = open_store(settings)
    photo = _photo(tmp_path / "photo.png", (96, 48))  # 2:1, rendered square: cropped, not stretched
    options = SubmitOptions(
        dataset="hed",
        model=str(tiny_model),
        controlnet=str(adapter),
        control_image=photo,
        condition="hed",
        hed_weights=hed_weights,
        width=64,
        height=64,
    )
    plan = store_conditions(plan_submission(_prompts(tmp_path), options), storage_for(settings))
    record(engine, plan)
    runtime = WorkerRuntime.build(settings, make_celery(settings), name="w-hed")
    try:
        outcome = render_jobs(runtime, plan.ids)
        assert runtime.uploader.drain(timeout_s=120)
    finally:
        runtime.leases.stop()
    assert outcome.rendered == 1
    with engine.connect() as conn:
        row = conn.execute(select(Job.__table__).where(Job.id == plan.ids[0])).one()
    assert row.status == "succeeded", row.error
    recipe = json.loads(row.recipe)
    assert recipe["condition"] == {"preprocess": "hed", "geometry": "resize-center-crop", "latent": "posterior-mean"}
    assert runtime.caches.conditions.stats()["misses"] == 1

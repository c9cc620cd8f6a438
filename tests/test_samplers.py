"""Each model sampled the way its release samples it: LCM for PixArt-LCM, DPM-Solver++ for PixArt-XL-2.

Tiny random-weight folders stand in for both releases (`make_tiny(sampler=...)`): what is checked is that the
right scheduler class and configuration reach the pipeline, that submit checks steps against it, that a farm
image equals a bare diffusers call with the model's own sampler, the job's seed and a CPU generator, and that a
dataset mixing the two routes, renders and says it mixes recipes.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler, PixArtAlphaPipeline
from PIL import Image
from sqlalchemy import select

from farm.dispatch.broker import make_celery
from farm.errors import InvalidSubmission
from farm.job import Claimed
from farm.profiles import resolve_model
from farm.settings import load_settings
from farm.store.engine import open_store
from farm.store.queries import dataset_status
from farm.store.schema import DatasetRecipe, Job
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.record import record
from models.caches import PromptEmbeddingCache
from models.pipeline import RenderRequest, load_pipeline, make_generator, render_batch
from models.scheduler import PIXART_DPM_SCHEDULER_CONFIG, PIXART_LCM_SCHEDULER_CONFIG
from models.tiny import make_tiny
from workers.runtime import WorkerRuntime
from workers.tasks import render_jobs


@pytest.fixture(scope="module")
def dpm_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny-dpm") / "model", sampler="dpm-solver++")


def _txt(tmp_path: Path, lines: list[str], name: str = "p.txt") -> Path:
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _config_matches(scheduler: object, expected: dict[str, object]) -> bool:
    config = scheduler.config  # type: ignore[attr-defined]
    return all(config.get(key) == value for key, value in expected.items())


def test_each_folder_ships_its_sampler_and_the_pipeline_keeps_it(tiny_model: Path, dpm_model: Path) -> None:
    assert resolve_model(str(tiny_model)).sampler.name == "lcm"
    assert resolve_model(str(dpm_model)).sampler.name == "dpm-solver++"
    lcm = load_pipeline(str(tiny_model), device="cpu")
    dpm = load_pipeline(str(dpm_model), device="cpu")
    assert type(lcm.scheduler) is LCMScheduler and _config_matches(lcm.scheduler, PIXART_LCM_SCHEDULER_CONFIG)
    assert type(dpm.scheduler) is DPMSolverMultistepScheduler
    assert _config_matches(dpm.scheduler, PIXART_DPM_SCHEDULER_CONFIG)
    # A profile names its release's sampler, which replaces whatever the folder ships.
    forced = load_pipeline(str(dpm_model), device="cpu", sampler="lcm")
    assert type(forced.scheduler) is LCMScheduler and _config_matches(forced.scheduler, PIXART_LCM_SCHEDULER_CONFIG)


def test_submit_takes_defaults_and_limits_from_the_models_sampler(tmp_path: Path, dpm_model: Path) -> None:
    prompts = _txt(tmp_path, ["a lighthouse"])
    (spec,) = plan_submission(prompts, SubmitOptions(dataset="d", model=str(dpm_model))).specs
    assert (spec.num_inference_steps, spec.guidance_scale) == (14, 4.5)
    (spec,) = plan_submission(prompts, SubmitOptions(dataset="d", model="pixart-xl-1024")).specs
    assert (spec.num_inference_steps, spec.guidance_scale, spec.width) == (14, 4.5, 1024)
    # DPM-Solver++ takes more steps than LCM's 50-step skeleton allows.
    (spec,) = plan_submission(prompts, SubmitOptions(dataset="d", model=str(dpm_model), num_inference_steps=60)).specs
    assert spec.num_inference_steps == 60
    with pytest.raises(InvalidSubmission, match="LCM takes 1 to 50 steps") as info:
        plan_submission(prompts, SubmitOptions(dataset="d", model="pixart-lcm-1024", num_inference_steps=60))
    assert info.value.field == "num_inference_steps"
    with pytest.raises(InvalidSubmission, match="LCM timesteps") as info:
        plan_submission(prompts, SubmitOptions(dataset="d", model=str(dpm_model), timesteps="original"))
    assert info.value.field == "timesteps"


def test_a_negative_prompt_is_an_input_only_where_cfg_runs(tmp_path: Path, dpm_model: Path) -> None:
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps({"prompt": "a cat", "negative_prompt": "blurry"}) + "\n" + json.dumps({"prompt": "a dog"}) + "\n"
    )
    cfg = plan_submission(rows, SubmitOptions(dataset="d", model=str(dpm_model)))
    assert [s.negative_prompt for s in cfg.specs] == ["blurry", None]
    assert cfg.negative_prompts == 0
    plain = plan_submission(_txt(tmp_path, ["a cat", "a dog"]), SubmitOptions(dataset="d", model=str(dpm_model)))
    assert cfg.ids[0] != plain.ids[0] and cfg.ids[1] == plain.ids[1]  # the id changes only where it is set
    lcm = plan_submission(rows, SubmitOptions(dataset="d", model="tiny"))
    assert [s.negative_prompt for s in lcm.specs] == [None, None]
    assert lcm.negative_prompts == 1  # ignored, and said so


def test_lcm_with_cfg_is_allowed_but_noted(tmp_path: Path) -> None:
    plan = plan_submission(_txt(tmp_path, ["a"]), SubmitOptions(dataset="d", model="tiny", guidance_scale=4.5))
    assert any("doubles the work" in note for note in plan.notes)


def test_the_noise_is_drawn_on_the_cpu_whatever_the_pipeline_device(tiny_model: Path) -> None:
    pipe = load_pipeline(str(tiny_model), device="cpu")
    assert make_generator(pipe, 5).device.type == "cpu"
    seen: list[torch.Tensor] = []
    original = pipe.prepare_latents

    def record_latents(*args: object, **kwargs: object) -> torch.Tensor:
        latents = original(*args, **kwargs)
        seen.append(latents.clone())
        return latents

    pipe.prepare_latents = record_latents  # type: ignore[method-assign]
    request = RenderRequest(prompt="a fox", seed=1234, width=64, height=64)
    render_batch(pipe, [request], prompt_cache=PromptEmbeddingCache(), output_type="latent")
    expected = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(1234))
    assert torch.equal(seen[0], expected * pipe.scheduler.init_noise_sigma)


@pytest.mark.parametrize(
    ("which", "steps", "guidance", "negative"),
    [("lcm", 4, 0.0, None), ("dpm", 14, 4.5, "blurry, low quality"), ("dpm", 6, 4.5, None)],
)
def test_a_farm_image_equals_a_bare_diffusers_call_with_the_models_own_sampler(
    tiny_model: Path, dpm_model: Path, which: str, steps: int, guidance: float, negative: str | None
) -> None:
    folder = tiny_model if which == "lcm" else dpm_model
    request = RenderRequest(
        prompt="A Red Fox, in the SNOW!",  # caption cleaning lowercases: both sides must clean
        seed=77,
        width=64,
        height=64,
        num_inference_steps=steps,
        guidance_scale=guidance,
        negative_prompt=negative,
    )
    farm = render_batch(load_pipeline(str(folder), device="cpu"), [request], prompt_cache=PromptEmbeddingCache())[0]

    bare = PixArtAlphaPipeline.from_pretrained(str(folder))  # the folder's own scheduler, nothing replaced
    bare.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        expected = bare(
            prompt=request.prompt,
            negative_prompt=negative or "",
            num_inference_steps=steps,
            guidance_scale=guidance,
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(77),
            use_resolution_binning=False,
        ).images[0]
    assert np.array_equal(np.asarray(farm), np.asarray(expected))


def _claimed_specs(engine, plan, dataset: str) -> list[str]:  # type: ignore[no-untyped-def]
    record(engine, plan)
    return plan.ids


def test_an_lcm_job_and_a_dpm_job_in_one_dataset_render_and_record_their_recipes(
    tmp_path: Path, tiny_model: Path, dpm_model: Path
) -> None:
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://")
    engine = open_store(settings)
    prompts = _txt(tmp_path, ["a castle"])
    lcm = plan_submission(prompts, SubmitOptions(dataset="mixed", model=str(tiny_model), width=64, height=64))
    dpm = plan_submission(
        prompts, SubmitOptions(dataset="mixed", model=str(dpm_model), width=64, height=64, num_inference_steps=3)
    )
    ids = _claimed_specs(engine, lcm, "mixed") + _claimed_specs(engine, dpm, "mixed")
    runtime = WorkerRuntime.build(settings, make_celery(settings), name="w-samplers")
    try:
        outcome = render_jobs(runtime, ids)
        assert runtime.uploader.drain(timeout_s=120)
    finally:
        runtime.leases.stop()
    assert outcome.rendered == 2
    with engine.connect() as conn:
        rows = {r.model: r for r in conn.execute(select(Job.__table__).where(Job.id.in_(ids)))}
        recipes = conn.execute(select(DatasetRecipe.recipe)).scalars().all()
    lcm_row, dpm_row = rows[str(tiny_model)], rows[str(dpm_model)]
    assert (lcm_row.status, dpm_row.status) == ("succeeded", "succeeded")
    lcm_recipe, dpm_recipe = json.loads(lcm_row.recipe), json.loads(dpm_row.recipe)
    assert (lcm_recipe["sampler"], lcm_recipe["scheduler"]) == ("lcm", "LCMScheduler")
    assert (dpm_recipe["sampler"], dpm_recipe["scheduler"]) == ("dpm-solver++", "DPMSolverMultistepScheduler")
    assert dpm_recipe["scheduler_config"]["algorithm_type"] == "dpmsolver++"
    assert (lcm_recipe["noise"], lcm_recipe["clean_caption"], lcm_recipe["t5"]) == ("cpu", True, "float32")
    assert sorted(recipes) == sorted([lcm_row.recipe, dpm_row.recipe])
    # The PNG explains itself: the same recipe is in its metadata.
    path = Path(dpm_row.output_uri.removeprefix("file://"))
    with Image.open(path) as image:
        assert json.loads(image.info["recipe"]) == dpm_recipe
        assert json.loads(image.info["parameters"])["scheduler"] == "DPMSolverMultistepScheduler"
    status = dataset_status(engine, "mixed")
    assert status.recipes == 2
    assert any("2 render recipes" in warning for warning in status.warnings)
    assert status.as_dict()["recipes"] == 2


def test_a_job_a_model_cannot_sample_fails_plainly(tmp_path: Path, tiny_model: Path) -> None:
    """A hub id's sampler is known only when a worker loads it: the worker refuses what it cannot run."""
    pipe = load_pipeline(str(tiny_model), device="cpu")
    with pytest.raises(ValueError, match="at most 50 steps; the job asks for 60"):
        render_batch(pipe, [RenderRequest(prompt="a", seed=0, width=64, height=64, num_inference_steps=60)])


def test_claimed_jobs_carry_the_new_inputs(tmp_path: Path) -> None:
    assert {"negative_prompt", "control_preprocess", "timesteps"} <= set(Claimed.__dataclass_fields__)

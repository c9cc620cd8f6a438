"""Tests for models.pipeline: loading with the PixArt LCM scheduler and seeded, reproducible renders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

from models.pipeline import (
    ModelLoadError,
    RenderRequest,
    load_pipeline,
    render,
    render_kwargs,
    uses_resolution_binning,
)
from models.scheduler import (
    ORIGINAL_REPO_4_STEP_TIMESTEPS,
    PIXART_LCM_SCHEDULER_CONFIG,
    is_pixart_lcm_scheduler,
)
from models.tiny import TINY_DEFAULT_SIZE, make_tiny

PROMPT = "a photo of a red cat sitting on a table"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny model once for this module."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "pixart-tiny", seed=0)


@pytest.fixture(scope="session")
def pipe(tiny_dir: Path) -> PixArtAlphaPipeline:
    """Load the tiny model once, the way workers do."""
    return load_pipeline(str(tiny_dir), device="cpu")


def _request(seed: int = 0, size: int = TINY_DEFAULT_SIZE) -> RenderRequest:
    """Return a square request for PROMPT."""
    return RenderRequest(prompt=PROMPT, seed=seed, width=size, height=size)


def _pixels(image: object) -> np.ndarray:
    """Return an image's pixels as a uint8 array."""
    return np.asarray(image)


def test_load_pipeline_sets_pixart_lcm_scheduler(pipe: PixArtAlphaPipeline) -> None:
    """The loaded pipeline samples with the PixArt LCM scheduler, on CPU in fp32, quietly."""
    assert is_pixart_lcm_scheduler(pipe.scheduler)
    for key, value in PIXART_LCM_SCHEDULER_CONFIG.items():
        assert pipe.scheduler.config[key] == value
    assert pipe.device.type == "cpu"
    assert pipe.transformer.dtype == torch.float32
    assert pipe._progress_bar_config.get("disable") is True


def test_load_pipeline_honours_dtype(tiny_dir: Path) -> None:
    """An explicit dtype reaches every weight-bearing component."""
    loaded = load_pipeline(str(tiny_dir), device="cpu", dtype="bf16")
    assert {loaded.transformer.dtype, loaded.vae.dtype, loaded.text_encoder.dtype} == {torch.bfloat16}


def test_render_returns_requested_size(pipe: PixArtAlphaPipeline) -> None:
    """Square and non-square requests come back at the requested size."""
    assert render(pipe, _request()).size == (TINY_DEFAULT_SIZE, TINY_DEFAULT_SIZE)
    wide = RenderRequest(prompt=PROMPT, seed=0, width=96, height=64)
    assert render(pipe, wide).size == (96, 64)


def test_same_request_gives_identical_pixels(pipe: PixArtAlphaPipeline) -> None:
    """Rendering one request twice gives the same pixels."""
    request = _request(seed=42)
    np.testing.assert_array_equal(_pixels(render(pipe, request)), _pixels(render(pipe, request)))


def test_different_seeds_give_different_pixels(pipe: PixArtAlphaPipeline) -> None:
    """Seeds change the initial noise and therefore the image."""
    first = _pixels(render(pipe, _request(seed=1)))
    second = _pixels(render(pipe, _request(seed=2)))
    assert not np.array_equal(first, second)


def test_render_matches_bare_pipeline_call(pipe: PixArtAlphaPipeline, tiny_dir: Path) -> None:
    """render() is pixel-identical to a plain from_pretrained pipeline with a seeded CPU generator."""
    request = _request(seed=7)
    bare = PixArtAlphaPipeline.from_pretrained(tiny_dir)
    bare.set_progress_bar_config(disable=True)
    expected = bare(
        prompt=request.prompt,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        width=request.width,
        height=request.height,
        generator=torch.Generator().manual_seed(request.seed),
        use_resolution_binning=False,
        clean_caption=False,
        output_type="pil",
    ).images[0]
    np.testing.assert_array_equal(_pixels(render(pipe, request)), _pixels(expected))


def test_render_kwargs_are_what_render_passes(pipe: PixArtAlphaPipeline) -> None:
    """render_kwargs carries the request, a freshly seeded generator and the fixed options."""
    request = _request(seed=3)
    kwargs = render_kwargs(pipe, request)
    assert set(kwargs) == {
        "prompt",
        "num_inference_steps",
        "guidance_scale",
        "width",
        "height",
        "generator",
        "use_resolution_binning",
        "clean_caption",
        "output_type",
    }
    assert kwargs["use_resolution_binning"] is False
    assert kwargs["clean_caption"] is True  # as the release cleans captions
    assert torch.equal(kwargs["generator"].get_state(), torch.Generator().manual_seed(3).get_state())
    with torch.inference_mode():
        direct = pipe(**kwargs).images[0]
    np.testing.assert_array_equal(_pixels(direct), _pixels(render(pipe, request)))


def test_original_repo_timesteps_run_through_pipeline(pipe: PixArtAlphaPipeline) -> None:
    """The original repository's timesteps can replace diffusers' spacing and change the result."""
    request = _request(seed=5)
    kwargs = render_kwargs(pipe, request)
    del kwargs["num_inference_steps"]
    with torch.inference_mode():
        image = pipe(**kwargs, timesteps=list(ORIGINAL_REPO_4_STEP_TIMESTEPS)).images[0]
    assert pipe.scheduler.timesteps.tolist() == list(ORIGINAL_REPO_4_STEP_TIMESTEPS)
    assert not np.array_equal(_pixels(image), _pixels(render(pipe, request)))


def test_resolution_binning_only_for_binned_sizes(pipe: PixArtAlphaPipeline) -> None:
    """Binning is on for 256/512/1024 models and off for the tiny 128 px one."""
    assert uses_resolution_binning(pipe) is False
    components = dict(pipe.components)
    for sample_size, expected in [(32, True), (64, True), (128, True), (16, False), (48, False)]:
        config = {**pipe.transformer.config, "sample_size": sample_size}
        components["transformer"] = PixArtTransformer2DModel.from_config(config)
        assert uses_resolution_binning(PixArtAlphaPipeline(**components)) is expected


def test_binned_model_renders_at_requested_size(pipe: PixArtAlphaPipeline) -> None:
    """A 256-bin model (sample_size 32) renders through binning and resizes back to the request."""
    components = dict(pipe.components)
    config = {**pipe.transformer.config, "sample_size": 32}
    components["transformer"] = PixArtTransformer2DModel.from_config(config)
    binned = PixArtAlphaPipeline(**components)
    binned.set_progress_bar_config(disable=True)
    assert uses_resolution_binning(binned)
    image = render(binned, RenderRequest(prompt=PROMPT, seed=0, width=120, height=72))
    assert image.size == (120, 72)


def test_missing_folder_raises_model_load_error(tmp_path: Path) -> None:
    """A local folder that does not exist is reported by name."""
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model"):
        load_pipeline(str(missing), device="cpu")


def test_folder_without_model_index_raises(tmp_path: Path) -> None:
    """A folder that is not a diffusers pipeline is rejected before loading."""
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        load_pipeline(str(tmp_path), device="cpu")


def test_unfetchable_hub_id_raises_model_load_error() -> None:
    """A hub id not in the local cache fails with ModelLoadError wrapping the hub's error."""
    source = "pixart-farm-tests/definitely-not-cached"
    with pytest.raises(ModelLoadError, match=source) as info:
        load_pipeline(source, device="cpu", local_files_only=True)
    assert info.value.__cause__ is not None


def test_invalid_device_is_rejected_before_loading(tiny_dir: Path) -> None:
    """A bad device name fails fast with ValueError."""
    with pytest.raises(ValueError, match="Unknown device"):
        load_pipeline(str(tiny_dir), device="gpu0")


def test_render_request_is_frozen_and_validated() -> None:
    """Requests are immutable, default to LCM settings and reject impossible values."""
    request = _request()
    assert (request.num_inference_steps, request.guidance_scale) == (4, 0.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        request.seed = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="positive"):
        RenderRequest(prompt=PROMPT, seed=0, width=0, height=128)
    with pytest.raises(ValueError, match="num_inference_steps"):
        RenderRequest(prompt=PROMPT, seed=0, width=128, height=128, num_inference_steps=0)

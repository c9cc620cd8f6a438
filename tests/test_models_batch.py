"""Tests for controlled and cached batch rendering through models.pipeline.render_batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
from PIL import Image

from models.caches import PromptEmbeddingCache
from models.conditions import encode_condition
from models.controlnet import PixArtControlNetAdapter, load_controlnet, make_tiny_controlnet
from models.pipeline import RenderRequest, load_pipeline, render_batch, render_size
from models.tiny import TINY_DEFAULT_SIZE, make_tiny

PROMPTS = ["a photo of a red cat", "a blue house by the sea", "an owl in the forest at night"]
SIZE = TINY_DEFAULT_SIZE


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny model once for this module."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "pixart-tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> PixArtAlphaPipeline:
    """The tiny pipeline as workers load it."""
    return load_pipeline(str(tiny_dir), device="cpu")


@pytest.fixture(scope="module")
def adapter(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> PixArtControlNetAdapter:
    """The tiny adapter the worker's end-to-end test uses: one copy, non-zero projections."""
    folder = make_tiny_controlnet(tmp_path_factory.mktemp("cn") / "tiny-controlnet", tiny_dir, seed=0)
    return load_controlnet(folder)


def _pattern(kind: int) -> Image.Image:
    """A distinct edge-like condition image per kind."""
    pixels = np.zeros((SIZE, SIZE, 3), dtype=np.uint8)
    if kind == 0:
        pixels[:, ::16] = 255
    elif kind == 1:
        pixels[::16, :] = 255
    else:
        pixels[32:96, 32:96] = 255
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def conditions(pipe: PixArtAlphaPipeline) -> list[torch.Tensor]:
    """One condition latent per prompt."""
    return [encode_condition(pipe.vae, _pattern(kind), SIZE, SIZE) for kind in range(len(PROMPTS))]


def _requests(seeds: tuple[int, ...] = (11, 12, 13)) -> list[RenderRequest]:
    """One request per prompt."""
    return [RenderRequest(prompt=p, seed=s, width=SIZE, height=SIZE) for p, s in zip(PROMPTS, seeds, strict=True)]


def test_tiny_controlnet_has_nonzero_projections(adapter: PixArtControlNetAdapter) -> None:
    """make_tiny_controlnet writes a loadable adapter whose projections are not zero."""
    assert adapter.config.num_layers == 1
    assert adapter.controlnet_blocks[0].after_proj.weight.abs().sum() > 0
    assert adapter.controlnet_blocks[0].before_proj.weight.abs().sum() > 0


def test_batched_controlled_render_equals_one_by_one(
    pipe: PixArtAlphaPipeline, adapter: PixArtControlNetAdapter, conditions: list[torch.Tensor]
) -> None:
    """A controlled batch gives each image what rendering it alone with its seed and condition gives."""
    requests = _requests()
    batched = render_batch(pipe, requests, controlnet=adapter, conditions=conditions, output_type="np")
    singles = [
        render_batch(pipe, [r], controlnet=adapter, conditions=[c], output_type="np")[0]
        for r, c in zip(requests, conditions, strict=True)
    ]
    float_diff = max(float(np.abs(b - s).max()) for b, s in zip(batched, singles, strict=True))
    pixel_diff = max(
        int(np.abs(np.round(b * 255).astype(int) - np.round(s * 255).astype(int)).max())
        for b, s in zip(batched, singles, strict=True)
    )
    print(f"batched vs single: max float diff {float_diff:.2e}, max pixel diff {pixel_diff}")
    # CPU GEMMs round differently per batch size: a few ULPs, at most one level of 255.
    assert float_diff < 1e-4
    assert pixel_diff <= 1


def test_each_image_uses_its_own_condition(
    pipe: PixArtAlphaPipeline, adapter: PixArtControlNetAdapter, conditions: list[torch.Tensor]
) -> None:
    """Swapping two conditions (same seed for both) swaps the two images."""
    requests = [RenderRequest(prompt=PROMPTS[0], seed=5, width=SIZE, height=SIZE)] * 2
    first = render_batch(pipe, requests, controlnet=adapter, conditions=conditions[:2], output_type="np")
    swapped = render_batch(pipe, requests, controlnet=adapter, conditions=conditions[1::-1], output_type="np")
    # Far above the ~1e-6 batch rounding noise: the two conditions give two different images.
    assert np.abs(first[0] - first[1]).max() > 5e-3
    np.testing.assert_allclose(first[0], swapped[1], atol=1e-5)
    np.testing.assert_allclose(first[1], swapped[0], atol=1e-5)


def test_controlled_differs_from_uncontrolled_and_scale_zero_matches(
    pipe: PixArtAlphaPipeline, adapter: PixArtControlNetAdapter, conditions: list[torch.Tensor]
) -> None:
    """The tiny adapter visibly changes every image; conditioning_scale=0 renders the plain image."""
    requests = _requests()
    plain = render_batch(pipe, requests)
    controlled = render_batch(pipe, requests, controlnet=adapter, conditions=conditions)
    off = render_batch(pipe, requests, controlnet=adapter, conditions=conditions, conditioning_scale=0.0)
    for p, c, o in zip(plain, controlled, off, strict=True):
        assert np.abs(np.asarray(p, dtype=int) - np.asarray(c, dtype=int)).mean() > 2
        np.testing.assert_array_equal(np.asarray(p), np.asarray(o))
    # The worker's pipeline object is never left controlled.
    assert isinstance(pipe.transformer, PixArtTransformer2DModel)


def test_controlled_batch_rejects_wrong_conditions(
    pipe: PixArtAlphaPipeline, adapter: PixArtControlNetAdapter, conditions: list[torch.Tensor]
) -> None:
    """Too few conditions, or latents of another size, fail before rendering."""
    with pytest.raises(ValueError, match="one condition per request"):
        render_batch(pipe, _requests(), controlnet=adapter, conditions=conditions[:2])
    small = [encode_condition(pipe.vae, _pattern(0), 64, 64)] * 3
    with pytest.raises(ValueError, match="encode it at 128x128"):
        render_batch(pipe, _requests(), controlnet=adapter, conditions=small)


def test_render_size_follows_resolution_bins(pipe: PixArtAlphaPipeline) -> None:
    """Unbinned models render at the request; a 1024 model renders at its aspect-ratio bin."""
    assert render_size(pipe, 96, 64) == (96, 64)
    binned = PixArtAlphaPipeline(
        **{
            **pipe.components,
            "transformer": PixArtTransformer2DModel.from_config({**pipe.transformer.config, "sample_size": 128}),
        }
    )
    assert render_size(binned, 1000, 1000) == (1024, 1024)


def test_prompt_cache_batch_matches_plain_render(pipe: PixArtAlphaPipeline) -> None:
    """Rendering from cached embeddings gives the plain render's pixels, and repeats hit the cache."""
    cache = PromptEmbeddingCache(max_entries=8)
    requests = [RenderRequest(prompt=PROMPTS[0], seed=s, width=SIZE, height=SIZE) for s in range(4)]
    plain = render_batch(pipe, requests, output_type="np")
    cached = render_batch(pipe, requests, prompt_cache=cache, model_key="tiny", output_type="np")
    for p, c in zip(plain, cached, strict=True):
        np.testing.assert_allclose(p, c, atol=1e-4)
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 3

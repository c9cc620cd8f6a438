"""Tests for models.caches: bounded LRU counting, adapter/condition/prompt caches and T5 call counts."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import PixArtAlphaPipeline
from PIL import Image

from models.caches import AdapterCache, ConditionLatentCache, LRUCache, PromptEmbeddingCache, model_identity
from models.pipeline import RenderRequest, load_pipeline, render_batch
from models.tiny import TINY_DEFAULT_SIZE, build_tiny_vae, make_tiny


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny model once for this module."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "pixart-tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> PixArtAlphaPipeline:
    """The tiny pipeline as workers load it."""
    return load_pipeline(str(tiny_dir), device="cpu")


def _count_t5_calls(pipe: PixArtAlphaPipeline) -> list[int]:
    """Count forward calls of the real T5 encoder through a forward hook; returns the live counter."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    pipe.text_encoder.register_forward_hook(hook)
    return calls


@pytest.fixture()
def counted(pipe: PixArtAlphaPipeline) -> Iterator[list[int]]:
    """The T5 call counter for the shared pipeline, unhooked afterwards."""
    calls = [0]

    def hook(*_: object) -> None:
        calls[0] += 1

    handle = pipe.text_encoder.register_forward_hook(hook)
    yield calls
    handle.remove()


def test_lru_counts_hits_misses_and_evicts_oldest(caplog: pytest.LogCaptureFixture) -> None:
    """A repeat is a hit, the bound evicts the least recently used entry, and evictions are logged."""
    cache: LRUCache[str, int] = LRUCache(2, name="test-lru")
    assert cache.get("a") is None
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # "a" is now the most recent
    with caplog.at_level(logging.INFO, logger="models.caches"):
        cache.put("c", 3)
    assert "b" not in cache and "a" in cache and "c" in cache
    assert "test-lru: evicted 'b'" in caplog.text
    assert cache.stats() == {
        "name": "test-lru",
        "entries": 2,
        "max_entries": 2,
        "hits": 1,
        "misses": 1,
        "evictions": 1,
        "hit_rate": 0.5,
    }
    built = []
    assert cache.get_or_create("d", lambda: built.append(1) or 4) == 4
    assert cache.get_or_create("d", lambda: built.append(1) or 5) == 4
    assert len(built) == 1
    with pytest.raises(ValueError, match="max_entries"):
        LRUCache(0)


def test_adapter_cache_keys_by_name_and_dtype() -> None:
    """The same adapter in another dtype is a different entry; the same one again is a hit."""
    cache = AdapterCache(max_entries=2)
    loads: list[str] = []

    def loader(tag: str) -> torch.nn.Module:
        loads.append(tag)
        return torch.nn.Linear(1, 1)

    first = cache.get_or_load("hed", torch.float32, lambda: loader("fp32"))
    assert cache.get_or_load("hed", torch.float32, lambda: loader("again")) is first
    assert cache.get_or_load("hed", torch.float16, lambda: loader("fp16")) is not first
    cache.get_or_load("canny", torch.float32, lambda: loader("canny"))
    assert loads == ["fp32", "fp16", "canny"]
    assert cache.stats()["evictions"] == 1 and ("hed", "torch.float32") not in cache


def test_condition_cache_hits_by_content_and_not_across_vaes(tmp_path: Path) -> None:
    """Same bytes under another name hit; another VAE instance (same weights) or size misses."""
    Image.fromarray(np.eye(64, dtype=np.uint8) * 255).convert("RGB").save(tmp_path / "a.png")
    (tmp_path / "copy.png").write_bytes((tmp_path / "a.png").read_bytes())
    torch.manual_seed(0)
    vae = build_tiny_vae()
    cache = ConditionLatentCache(max_entries=4)
    first = cache.latents(tmp_path / "a.png", vae, 64, 64)
    assert cache.latents(tmp_path / "copy.png", vae, 64, 64) is first
    other_vae = build_tiny_vae()
    assert cache.latents(tmp_path / "a.png", other_vae, 64, 64) is not first
    assert cache.latents(tmp_path / "a.png", vae, 32, 32).shape == (1, 4, 4, 4)
    assert (cache.hits, cache.misses) == (1, 3)
    assert model_identity(vae) != model_identity(other_vae)
    assert model_identity(vae) == model_identity(vae)


def test_one_prompt_with_eight_seeds_runs_t5_once(tiny_dir: Path) -> None:
    """A batch of 8 seeds of one prompt encodes once; the next batch is served from the cache."""
    pipe = load_pipeline(str(tiny_dir), device="cpu")
    calls = _count_t5_calls(pipe)
    cache = PromptEmbeddingCache(max_entries=16)
    requests = [RenderRequest(prompt="a red fox", seed=s, width=64, height=64) for s in range(8)]
    images = render_batch(pipe, requests, prompt_cache=cache, model_key="tiny")
    assert len(images) == 8 and calls[0] == 1
    render_batch(pipe, requests, prompt_cache=cache, model_key="tiny")
    assert calls[0] == 1
    assert cache.stats()["misses"] == 1 and cache.stats()["hits"] == 15
    # Without the cache the pipeline encodes on every call.
    render_batch(pipe, requests)
    assert calls[0] == 2


def test_prompt_cache_encodes_only_missing_prompts_and_keys_by_model(
    pipe: PixArtAlphaPipeline, counted: list[int]
) -> None:
    """Cached prompts are not re-encoded; a new model identity never gets another model's entries."""
    calls = counted
    cache = PromptEmbeddingCache(max_entries=2)
    embeds, mask = cache.embed(pipe, ["a cat", "a dog", "a cat"], model_key="m1")
    assert embeds.shape == (3, 120, 32) and mask.shape == (3, 120)
    assert torch.equal(embeds[0], embeds[2])
    assert calls[0] == 1
    cache.embed(pipe, ["a dog"], model_key="m1")
    assert calls[0] == 1
    cache.embed(pipe, ["a dog"], model_key="m2")
    assert calls[0] == 2
    assert cache.stats()["evictions"] == 1  # bound 2: ("m1", "a cat") went
    expected, _, _, _ = pipe.encode_prompt(["a dog"], do_classifier_free_guidance=False, clean_caption=False)
    torch.testing.assert_close(embeds[1:2], expected, rtol=0, atol=1e-5)


def test_prompt_cache_serves_cfg_negative_embeddings(pipe: PixArtAlphaPipeline) -> None:
    """With guidance above 1 the cache also supplies the "" negative, and pixels match the plain render."""
    cache = PromptEmbeddingCache()
    requests = [
        RenderRequest(
            prompt="a blue bird", seed=s, width=TINY_DEFAULT_SIZE, height=TINY_DEFAULT_SIZE, guidance_scale=4.5
        )
        for s in range(2)
    ]
    plain = render_batch(pipe, requests, output_type="np")
    cached = render_batch(pipe, requests, prompt_cache=cache, model_key="tiny", output_type="np")
    for p, c in zip(plain, cached, strict=True):
        np.testing.assert_allclose(p, c, atol=1e-4)
    assert ("tiny", "") in cache

"""Tests for models.scoring: CLIP score, aesthetic, safety flag, embedding and pixel hash, on tiny offline models."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image, PngImagePlugin
from safetensors.torch import load_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from models.pipeline import ModelLoadError
from models.scoring import (
    AESTHETIC_FILE,
    ScoreResult,
    Scorers,
    build_aesthetic_mlp,
    load_scorers,
    pixel_sha256,
    save_tiny_scorers,
)

PROMPTS = ["a red fox in the snow", "a lighthouse at night", "a bowl of ramen"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny scorers, built once for this module. Seed 2: its random CLIP puts two of these images above the
    clamp for their prompts and one at it (seed 0 scores every pair below zero, so every CLIP score is 0)."""
    return save_tiny_scorers(tmp_path_factory.mktemp("scorers"), seed=2)


@pytest.fixture(scope="module")
def scorers(tiny: dict[str, Path]) -> Scorers:
    return load_scorers(str(tiny["clip"]), str(tiny["aesthetic"]), str(tiny["safety"]))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    """Three unlike images: two of one size (resized together) and one of another, none square."""
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8))
    ramp = np.linspace(0, 255, 64, dtype=np.float32)
    gradient = Image.fromarray(
        np.stack([np.tile(ramp, (40, 1)), np.tile(ramp[::-1], (40, 1)), np.full((40, 64), 90)], -1).astype(np.uint8)
    )
    blocks = Image.fromarray((np.kron(rng.integers(0, 2, (6, 5, 3)), np.ones((8, 8, 1))) * 255).astype(np.uint8))
    return [noise, gradient, blocks]


def _tokens(tokenizer: CLIPTokenizer, prompts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt"))


def _direct_scores(
    tiny: dict[str, Path], pixel_values: torch.Tensor, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(100 * max(cos, 0), aesthetic, unit image embeddings) from the models' own classes, loaded afresh."""
    model = CLIPModel.from_pretrained(tiny["clip"]).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny["clip"])
    state = torch.load(tiny["aesthetic"] / AESTHETIC_FILE, weights_only=True)
    mlp = torch.nn.Module()
    mlp.layers = build_aesthetic_mlp(state["layers.0.weight"].shape[1])  # the LAION class: an MLP named `layers`
    mlp.load_state_dict(state)
    with torch.inference_mode():
        image = model.get_image_features(pixel_values=pixel_values).pooler_output
        text = model.get_text_features(**_tokens(tokenizer, prompts)).pooler_output
        clip = 100 * torch.nn.functional.cosine_similarity(image, text).clamp(min=0)
        unit = image / image.norm(dim=-1, keepdim=True)  # LAION normalises to unit L2 norm before the MLP
        aesthetic = mlp.layers(unit).squeeze(-1)
    return clip, aesthetic, unit


def _checker_flags(checker: StableDiffusionSafetyChecker, pixel_values: torch.Tensor) -> list[bool]:
    """StableDiffusionSafetyChecker's own forward (its own vision tower) on the given pixels."""
    _, flags = checker(clip_input=pixel_values, images=[np.zeros((2, 2, 3)) for _ in range(len(pixel_values))])
    return [bool(f) for f in flags]


def test_scores_equal_direct_calls_on_the_same_pixels(
    tiny: dict[str, Path], scorers: Scorers, images: list[Image.Image]
) -> None:
    results = scorers.score(images, PROMPTS)
    clip, aesthetic, _ = _direct_scores(tiny, scorers.pixel_values(images), PROMPTS)
    checker = StableDiffusionSafetyChecker.from_pretrained(tiny["safety"]).eval()
    assert (clip > 0).any() and (clip == 0).any()  # a random model: both sides of the clamp, or this tests little
    assert [r.clip_score for r in results] == pytest.approx(clip.tolist(), abs=1e-4)
    assert [r.aesthetic for r in results] == pytest.approx(aesthetic.tolist(), abs=1e-5)
    assert [r.nsfw for r in results] == _checker_flags(checker, scorers.pixel_values(images))


def test_preprocessing_matches_clip_image_processor(
    tiny: dict[str, Path], scorers: Scorers, images: list[Image.Image]
) -> None:
    """The torch preprocessing is CLIPImageProcessor's (PIL backend) within one 8-bit level in a few pixels, so
    scores from the processor's pixels agree closely (the noise image is where a one-pass resize is 15 levels off)."""
    processor = CLIPImageProcessorPil.from_pretrained(tiny["clip"])
    small = Image.fromarray(np.random.default_rng(1).integers(0, 256, (24, 20, 3), dtype=np.uint8))  # upscaled
    reference = processor(images=[*images, small], return_tensors="pt")["pixel_values"]
    ours = scorers.pixel_values([*images, small])
    assert ours.shape == reference.shape == (4, 3, 32, 32)
    diff = (ours - reference).abs()
    one_level = 1 / 255 / min(processor.image_std)
    assert diff.max() <= one_level + 1e-5 and diff.mean() < one_level / 10
    clip, aesthetic, _ = _direct_scores(tiny, reference[:3], PROMPTS)
    results = scorers.score(images, PROMPTS)
    assert [r.clip_score for r in results] == pytest.approx(clip.tolist(), abs=0.1)
    assert [r.aesthetic for r in results] == pytest.approx(aesthetic.tolist(), abs=1e-3)


def _orthogonal_part(target: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """The part of `target` orthogonal to every row of `others`: cosine 0 with them, positive with target."""
    basis, _ = torch.linalg.qr(others.double().T)
    t = target.double()
    return (t - basis @ (basis.T @ t)).float()


@pytest.mark.parametrize("special_care", [True, False])
def test_safety_decision_equals_the_checkers_own_forward(
    tiny: dict[str, Path], scorers: Scorers, images: list[Image.Image], tmp_path: Path, special_care: bool
) -> None:
    """Concepts built so image 0 matches a concept outright and image 1 falls 0.005 short of one: flagged only
    through the checker's +0.01 adjustment after a special-care match; image 2 matches nothing."""
    pixel_values = scorers.pixel_values(images)
    checker = StableDiffusionSafetyChecker.from_pretrained(tiny["safety"]).eval()
    with torch.no_grad():
        embeds = checker.visual_projection(checker.vision_model(pixel_values)[1])
        v0 = _orthogonal_part(embeds[0], embeds[[1, 2]])
        v1 = _orthogonal_part(embeds[1], embeds[[0, 2]])
        cos0 = torch.nn.functional.cosine_similarity(embeds[0], v0, dim=0).item()
        cos1 = torch.nn.functional.cosine_similarity(embeds[1], v1, dim=0).item()
        assert cos0 > 0.05 and cos1 > 0.05  # margins well beyond the 0.01 adjustment
        checker.concept_embeds[0], checker.concept_embeds[1] = v0, v1
        checker.concept_embeds_weights.fill_(1.5)  # the other concepts never match
        checker.concept_embeds_weights[0] = cos0 / 2
        checker.concept_embeds_weights[1] = cos1 + 0.005
        checker.special_care_embeds[0] = v1
        checker.special_care_embeds_weights.fill_(1.5)
        if special_care:
            checker.special_care_embeds_weights[0] = cos1 / 2
    checker.save_pretrained(tmp_path / "safety")
    loaded = load_scorers(str(tiny["clip"]), safety=str(tmp_path / "safety"))
    flags = [r.nsfw for r in loaded.score(images, PROMPTS)]
    assert flags == [True, special_care, False]
    assert flags == _checker_flags(checker, pixel_values)


def test_safety_checker_with_another_vision_tower_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    config = CLIPConfig.from_pretrained(tiny["clip"])
    StableDiffusionSafetyChecker(config).save_pretrained(tmp_path / "random-tower")  # same dims, fresh weights
    config.projection_dim = 8
    StableDiffusionSafetyChecker(config).save_pretrained(tmp_path / "dim-8")
    for name, why in (("random-tower", "different vision towers"), ("dim-8", "differ")):
        safety = str(tmp_path / name)
        with pytest.raises(ValueError, match=why) as caught:
            load_scorers(str(tiny["clip"]), safety=safety)
        assert safety in str(caught.value) and str(tiny["clip"]) in str(caught.value)


def test_aesthetic_model_for_another_embedding_dim_is_refused(tiny: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "aesthetic").mkdir()
    state = {f"layers.{k}": v for k, v in build_aesthetic_mlp(8).state_dict().items()}
    torch.save(state, tmp_path / "aesthetic" / AESTHETIC_FILE)
    with pytest.raises(ValueError, match="takes 8-dim") as caught:
        load_scorers(str(tiny["clip"]), aesthetic=str(tmp_path / "aesthetic"))
    assert str(tmp_path / "aesthetic") in str(caught.value) and str(tiny["clip"]) in str(caught.value)


def test_aesthetic_loads_from_its_folder_or_the_file_itself(
    tiny: dict[str, Path], scorers: Scorers, images: list[Image.Image]
) -> None:
    from_file = load_scorers(str(tiny["clip"]), aesthetic=str(tiny["aesthetic"] / AESTHETIC_FILE))
    expected = [r.aesthetic for r in scorers.score(images, PROMPTS)]
    assert [r.aesthetic for r in from_file.score(images, PROMPTS)] == expected


def test_embedding_round_trips_as_unit_float16(
    tiny: dict[str, Path], scorers: Scorers, images: list[Image.Image]
) -> None:
    results = scorers.score(images, PROMPTS)
    _, _, unit = _direct_scores(tiny, scorers.pixel_values(images), PROMPTS)
    for result, expected in zip(results, unit, strict=True):
        embedding = np.frombuffer(result.embedding, dtype="<f2")
        assert embedding.shape == (16,)  # the tiny CLIP's projection dim
        assert np.linalg.norm(embedding.astype(np.float32)) == pytest.approx(1.0, abs=2e-3)
        np.testing.assert_allclose(embedding.astype(np.float32), expected.numpy(), atol=1e-3)


def _png(image: Image.Image, **text: str) -> Image.Image:
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return Image.open(io.BytesIO(buffer.getvalue()))


def test_pixel_sha256_is_the_pixels_not_the_png(images: list[Image.Image]) -> None:
    image = images[0]
    first, second = _png(image, prompt="a red fox", seed="1"), _png(image, job="other", software="farm 2")
    expected = hashlib.sha256(b"40x48:RGB:" + image.tobytes()).hexdigest()
    assert pixel_sha256(first) == pixel_sha256(second) == pixel_sha256(image) == expected
    changed = image.copy()
    r, g, b = changed.getpixel((3, 5))  # type: ignore[misc]
    changed.putpixel((3, 5), ((r + 1) % 256, g, b))
    assert pixel_sha256(changed) != expected


def test_a_batch_of_three_equals_three_batches_of_one(scorers: Scorers, images: list[Image.Image]) -> None:
    batched = scorers.score(images, PROMPTS)
    alone = [scorers.score([image], [prompt])[0] for image, prompt in zip(images, PROMPTS, strict=True)]
    for many, one in zip(batched, alone, strict=True):
        assert many.clip_score == pytest.approx(one.clip_score, abs=1e-3)
        assert many.aesthetic == pytest.approx(one.aesthetic, abs=1e-4)
        assert many.nsfw == one.nsfw
        assert many.pixel_sha256 == one.pixel_sha256
        np.testing.assert_allclose(
            np.frombuffer(many.embedding, "<f2").astype(np.float32),
            np.frombuffer(one.embedding, "<f2").astype(np.float32),
            atol=1e-3,
        )


def test_scoring_is_deterministic_and_to_returns_the_scorers(scorers: Scorers, images: list[Image.Image]) -> None:
    assert scorers.to("cpu") is scorers
    assert scorers.score(images, PROMPTS) == scorers.score(images, PROMPTS)


def test_prompts_are_truncated_to_77_tokens(scorers: Scorers, images: list[Image.Image]) -> None:
    """The tiny tokenizer spells words out by character, so 200 characters are far past CLIP's 77 tokens."""
    long = "a" * 200
    assert scorers.max_length == 77
    first, second = scorers.score(images[:2], [long, long + " and a lighthouse"])
    assert first.clip_score == pytest.approx(scorers.score(images[:1], [long])[0].clip_score, abs=1e-4)
    scored = scorers.score([images[1]], [long])[0]
    assert second.clip_score == pytest.approx(scored.clip_score, abs=1e-4)


def test_without_aesthetic_or_safety_those_fields_are_none(tiny: dict[str, Path], images: list[Image.Image]) -> None:
    clip_only = load_scorers(str(tiny["clip"]))
    assert clip_only.model_ids == {"clip": str(tiny["clip"])}
    for result in clip_only.score(images, PROMPTS):
        assert isinstance(result, ScoreResult)
        assert result.aesthetic is None and result.nsfw is None


def test_model_ids_name_every_loaded_source(tiny: dict[str, Path], scorers: Scorers) -> None:
    assert scorers.model_ids == {name: str(path) for name, path in tiny.items()}


def test_score_needs_one_prompt_per_image(scorers: Scorers, images: list[Image.Image]) -> None:
    assert scorers.score([], []) == []
    with pytest.raises(ValueError, match="one prompt per image"):
        scorers.score(images, PROMPTS[:2])


@pytest.mark.parametrize("kind", ["clip", "aesthetic", "safety"])
def test_a_missing_local_source_is_named(tiny: dict[str, Path], tmp_path: Path, kind: str) -> None:
    missing = str(tmp_path / "nowhere" / kind)
    sources = {name: str(path) for name, path in tiny.items()} | {kind: missing}
    with pytest.raises(ModelLoadError, match="does not exist") as caught:
        load_scorers(sources["clip"], sources["aesthetic"], sources["safety"])
    assert missing in str(caught.value)


def test_an_aesthetic_folder_without_the_file_is_named(tiny: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=re.escape(f"no {AESTHETIC_FILE}")) as caught:
        load_scorers(str(tiny["clip"]), aesthetic=str(tmp_path))
    assert str(tmp_path) in str(caught.value)


def test_tiny_scorers_depend_on_the_seed_alone(tiny: dict[str, Path], tmp_path: Path) -> None:
    again = save_tiny_scorers(tmp_path, seed=2)
    for name in ("clip", "safety"):
        first, second = load_file(tiny[name] / "model.safetensors"), load_file(again[name] / "model.safetensors")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[k], second[k]) for k in first)
    first_mlp = torch.load(tiny["aesthetic"] / AESTHETIC_FILE, weights_only=True)
    second_mlp = torch.load(again["aesthetic"] / AESTHETIC_FILE, weights_only=True)
    assert all(torch.equal(first_mlp[k], second_mlp[k]) for k in first_mlp)

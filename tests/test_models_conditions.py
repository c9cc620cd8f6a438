"""Tests for models.conditions: loading condition images, the Canny preprocessor, the resize-and-crop geometry
and VAE encoding. The HED preprocessor is tested in test_models_hed.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from models.conditions import canny, encode_condition, fit_condition, image_sha256, load_condition_image
from models.tiny import build_tiny_vae


def _square(path: Path, size: int = 64) -> Path:
    """Write a white square on black: it has exactly one closed edge."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[16:48, 16:48] = 255
    Image.fromarray(pixels).save(path)
    return path


def test_load_condition_image_returns_rgb(tmp_path: Path) -> None:
    """Greyscale and RGBA files come back as RGB."""
    Image.new("L", (8, 8), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (8, 8)).save(tmp_path / "rgba.png")
    for name in ("grey.png", "rgba.png"):
        assert load_condition_image(tmp_path / name).mode == "RGB"


@pytest.mark.parametrize("case", ["missing", "directory", "garbage", "truncated"])
def test_bad_condition_image_is_a_value_error_naming_the_path(tmp_path: Path, case: str) -> None:
    """Missing, non-file, undecodable and truncated images raise ValueError with the path."""
    path = tmp_path / f"{case}.png"
    if case == "directory":
        path.mkdir()
    elif case == "garbage":
        path.write_bytes(b"not an image at all")
    elif case == "truncated":
        _square(tmp_path / "whole.png", size=256)
        data = (tmp_path / "whole.png").read_bytes()
        path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=str(path)):
        load_condition_image(path)


def test_canny_writes_three_channel_edges(tmp_path: Path) -> None:
    """Canny marks the square's outline at 255 on 0, in three equal channels."""
    out = canny(_square(tmp_path / "in.png"), tmp_path / "edges" / "out.png")
    edges = np.asarray(Image.open(out))
    assert edges.shape == (64, 64, 3)
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 1] == edges[..., 2]).all()
    assert edges[16:48, 15:17].any() and not edges[28:36, 28:36].any()
    with pytest.raises(ValueError, match="low <= high"):
        canny(tmp_path / "in.png", tmp_path / "x.png", low=200, high=100)


def test_encode_condition_is_the_scaled_posterior_mean(tmp_path: Path) -> None:
    """Latents are deterministic, sized 1×4×h/8×w/8, and equal mean × scaling_factor."""
    torch.manual_seed(0)
    vae = build_tiny_vae()
    image = load_condition_image(_square(tmp_path / "in.png"))
    latents = encode_condition(vae, image, 96, 64)
    assert latents.shape == (1, 4, 8, 12)
    assert torch.equal(latents, encode_condition(vae, image, 96, 64))
    # Fitted, not stretched: the 64×64 square covers 96×64 at 96×96 and loses 16 rows top and bottom.
    fitted = image.resize((96, 96), Image.Resampling.BILINEAR).crop((0, 16, 96, 80))
    pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32))
    pixels = pixels.permute(2, 0, 1)[None] / 255.0 * 2 - 1
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
    half = encode_condition(vae.to(torch.bfloat16), image, 96, 64)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_condition(vae, image, 100, 64)


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _stripes(size: tuple[int, int], vertical: bool) -> Image.Image:
    """Red, green, blue bands in the proportion 1:2:1, side by side (vertical bands) or stacked."""
    w, h = size
    pixels = np.zeros((h, w, 3), dtype=np.uint8)
    if vertical:
        pixels[:, : w // 4, 0] = pixels[:, w // 4 : 3 * w // 4, 1] = pixels[:, 3 * w // 4 :, 2] = 255
    else:
        pixels[: h // 4, :, 0] = pixels[h // 4 : 3 * h // 4, :, 1] = pixels[3 * h // 4 :, :, 2] = 255
    return Image.fromarray(pixels)


def test_fit_condition_crops_the_sides_instead_of_stretching() -> None:
    """A 2:1 image fitted to a square keeps its centre band; a stretch would keep red and blue too."""
    fitted = np.asarray(fit_condition(_stripes((128, 64), vertical=True), 64, 64))
    assert fitted.shape == (64, 64, 3)
    assert (fitted == (0, 255, 0)).all()
    stretched = np.asarray(_stripes((128, 64), vertical=True).resize((64, 64), Image.Resampling.BILINEAR))
    assert stretched[:, 0, 0].max() == 255  # what the old geometry did


def test_fit_condition_keeps_a_circle_round() -> None:
    image = Image.new("RGB", (160, 80))
    ImageDraw.Draw(image).ellipse((65, 25, 95, 55), fill=(255, 255, 255))  # a circle, 31 px across
    for width, height in ((64, 64), (96, 64), (64, 96)):
        mask = np.asarray(fit_condition(image, width, height).convert("L")) > 127
        rows, cols = np.nonzero(mask.any(axis=1))[0], np.nonzero(mask.any(axis=0))[0]
        box_h, box_w = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert abs(int(box_h) - int(box_w)) <= 1, (width, height, box_w, box_h)
        assert box_h > 20 and box_h < min(width, height)  # whole: not cut by the crop


def test_fit_condition_covers_a_target_of_the_other_orientation_without_padding() -> None:
    """Portrait to landscape: scaled ×2 to 128×256 and the middle rows kept, where the original padded black."""
    fitted = np.asarray(fit_condition(_stripes((64, 128), vertical=False), 128, 64))
    assert fitted.shape == (64, 128, 3)
    assert (fitted == (0, 255, 0)).all()
    noise = _noise((100, 90))  # landscape, but 128×64 needs more than resizing the short side to 64 gives
    expected = noise.resize((128, 115), Image.Resampling.BILINEAR).crop((0, 26, 128, 90))  # round(25.5) = 26
    assert np.array_equal(np.asarray(fit_condition(noise, 128, 64)), np.asarray(expected))


@pytest.mark.parametrize(
    ("size", "target", "resized", "box"),
    [
        ((300, 200), (96, 64), (96, 64), (0, 0, 96, 64)),  # same aspect: a plain resize
        ((200, 300), (64, 96), (64, 96), (0, 0, 64, 96)),
        ((333, 200), (96, 64), (106, 64), (5, 0, 101, 64)),  # 64·333/200 = 106.56, truncated to 106
        ((329, 200), (96, 64), (105, 64), (4, 0, 100, 64)),  # 105.28 → 105; left round(4.5) = 4 (to even)
        ((200, 350), (64, 96), (64, 112), (0, 8, 64, 104)),  # the short side to min(target) = 64
        ((50, 40), (64, 64), (80, 64), (8, 0, 72, 64)),  # enlarging the same way
    ],
)
def test_fit_condition_is_torchvision_resize_then_center_crop(
    size: tuple[int, int], target: tuple[int, int], resized: tuple[int, int], box: tuple[int, int, int, int]
) -> None:
    """T.Resize(min(h, w)) then T.CenterCrop([h, w]), with their truncation and rounding."""
    image = _noise(size)
    expected = image.resize(resized, Image.Resampling.BILINEAR).crop(box)
    assert np.array_equal(np.asarray(fit_condition(image, *target)), np.asarray(expected))


def test_fit_condition_leaves_an_image_of_the_target_size_alone() -> None:
    image = _noise((96, 64))
    assert np.array_equal(np.asarray(fit_condition(image, 96, 64)), np.asarray(image))
    assert fit_condition(image.convert("L"), 96, 64).mode == "RGB"


def test_image_sha256_is_content_hash(tmp_path: Path) -> None:
    """Equal bytes give equal hashes, different bytes different ones."""
    a = _square(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(a.read_bytes())
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    assert image_sha256(a) == image_sha256(tmp_path / "b.png") != image_sha256(tmp_path / "c.png")

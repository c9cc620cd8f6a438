"""Tests for models.conditions: loading condition images, the Canny preprocessor and VAE encoding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.conditions import canny, encode_condition, image_sha256, load_condition_image
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
    pixels = torch.from_numpy(np.asarray(image.resize((96, 64), Image.Resampling.BICUBIC), dtype=np.float32))
    pixels = pixels.permute(2, 0, 1)[None] / 255.0 * 2 - 1
    with torch.no_grad():
        expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)
    half = encode_condition(vae.to(torch.bfloat16), image, 96, 64)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="multiples of 8"):
        encode_condition(vae, image, 100, 64)


def test_image_sha256_is_content_hash(tmp_path: Path) -> None:
    """Equal bytes give equal hashes, different bytes different ones."""
    a = _square(tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(a.read_bytes())
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    assert image_sha256(a) == image_sha256(tmp_path / "b.png") != image_sha256(tmp_path / "c.png")

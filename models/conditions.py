"""Condition images for the ControlNet: loading, a Canny edge preprocessor and deterministic VAE encoding."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL


def load_condition_image(path: str | Path) -> Image.Image:
    """Open and fully decode a condition image as RGB; ValueError naming `path` when that fails."""
    source = Path(path).expanduser()
    if not source.exists():
        raise ValueError(f"condition image {str(path)!r} does not exist")
    if not source.is_file():
        raise ValueError(f"condition image {str(path)!r} is not a file")
    try:
        with Image.open(source) as image:
            # load() decodes every pixel now: a truncated file fails here, at submit, not inside a worker.
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise ValueError(f"condition image {str(path)!r} cannot be decoded: {exc}") from exc


def image_sha256(path: str | Path) -> str:
    """Return the hex sha256 of a file's bytes: the condition cache key."""
    digest = hashlib.sha256()
    with Path(path).expanduser().open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def canny(in_path: str | Path, out_path: str | Path, low: int = 100, high: int = 200) -> Path:
    """Write the Canny edges of `in_path` to `out_path` as a 3-channel PNG (edges 255, background 0)."""
    import cv2
    import numpy as np

    if not 0 <= low <= high:
        raise ValueError(f"thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
    rgb = np.asarray(load_condition_image(in_path))
    edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)
    target = Path(out_path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Three channels: the released ControlNet was trained on RGB (HED) maps through an RGB VAE.
    Image.fromarray(np.stack([edges] * 3, axis=-1)).save(target, format="PNG")
    return target


def encode_condition(vae: AutoencoderKL, image: Image.Image, width: int, height: int) -> torch.Tensor:
    """Encode a condition image to 1×C×(height/8)×(width/8) latents: the posterior mean times scaling_factor."""
    import numpy as np
    import torch

    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")
    resized = image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
    pixels = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    pixels = (pixels * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        # The mean, not a sample: the same image must give the same latents on every worker.
        latents = vae.encode(pixels).latent_dist.mean
    return latents * vae.config.scaling_factor

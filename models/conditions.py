"""Condition images for the ControlNet: loading, Canny and HED edge preprocessors, the original recipe's
resize-and-centre-crop geometry, and deterministic VAE encoding."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:
    import torch
    from diffusers import AutoencoderKL

    from models.hed import HEDNetwork


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


def hed(in_path: str | Path, out_path: str | Path, net: HEDNetwork) -> Path:
    """Write the soft HED edges of `in_path`, at its own size, to `out_path` as a 3-channel PNG (0..255 grey)."""
    from models.hed import edge_map_image, soft_edges

    edges = soft_edges(net, load_condition_image(in_path))
    target = Path(out_path).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    edge_map_image(edges).save(target, format="PNG")
    return target


def fit_condition(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize and centre-crop `image` to exactly width×height (RGB) without stretching it.

    This is the geometry of PixArt-alpha's ControlNet recipe (app/app_controlnet.py): torchvision's
    `Resize(min(height, width))` — the shorter side becomes min(height, width), the longer one
    int(that × long / short), truncated — with PIL's bilinear filter (torchvision's default for PIL images),
    then `CenterCrop([height, width])`, whose offsets are round((side - target) / 2) (Python's round,
    halves to even).

    One deliberate difference: where that resize leaves the image smaller than the target in one dimension
    (a landscape condition for a portrait target or the other way round), torchvision's CenterCrop would pad
    with black. Here the image is scaled to cover the target instead — by max(width / w, height / h), each
    side max(target side, round(side × scale)) — and then centre-cropped the same way: never stretched,
    never padded. An image already width×height comes back unchanged (as RGB).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"width and height must be positive, got {width}x{height}")
    rgb = image.convert("RGB")
    w, h = rgb.size
    if (w, h) == (width, height):
        return rgb
    # torchvision's _compute_resized_output_size for Resize(int): the shorter side (width on a tie) to `short`.
    short = min(height, width)
    if w <= h:
        new_w, new_h = short, int(short * h / w)
    else:
        new_w, new_h = int(short * w / h), short
    if new_w < width or new_h < height:
        scale = max(width / w, height / h)
        new_w, new_h = max(width, round(w * scale)), max(height, round(h * scale))
    resized = rgb if (new_w, new_h) == (w, h) else rgb.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = round((new_h - height) / 2.0)
    left = round((new_w - width) / 2.0)
    return resized.crop((left, top, left + width, top + height))


def encode_condition(
    vae: AutoencoderKL, image: Image.Image, width: int, height: int, *, hed: HEDNetwork | None = None
) -> torch.Tensor:
    """Encode a condition image to 1×C×(height/8)×(width/8) latents: the posterior mean times scaling_factor.

    The image is first fitted to width×height (fit_condition: resize and centre-crop, never stretched). With
    `hed`, what is encoded is its soft HED edge map (as PixArt-alpha's HED ControlNet was trained on) rather
    than the image itself.
    """
    import numpy as np
    import torch

    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")
    fitted = fit_condition(image, width, height)
    if hed is None:
        pixels = torch.from_numpy(np.asarray(fitted, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    else:
        from models.hed import soft_edges

        pixels = soft_edges(hed, fitted).repeat(1, 3, 1, 1)  # 1×3×H×W in [0, 1]
    pixels = (pixels * 2.0 - 1.0).to(device=vae.device, dtype=vae.dtype)
    with torch.no_grad():
        # The mean, not a sample: the same image must give the same latents on every worker.
        latents = vae.encode(pixels).latent_dist.mean
    return latents * vae.config.scaling_factor

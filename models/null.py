"""The null renderer: a pipeline stand-in for measuring the farm itself (`farm worker --renderer null`).

It loads no model and runs no network: each request gets at once a synthetic image of its size (smooth colour
fields with a fine grain, seeded by the request's seed and prompt), so claiming, PNG encoding, hashing, storing
and recording cost what they cost for real renders. The grain makes a PNG about half the raw size, as PixArt's
outputs and photographs are, and costs zlib about what they cost; a flat image would make PNG encoding nearly
free and the measurement worthless. Images are distinct and deterministic (the same request, the same pixels).

Never the default: a worker uses it only when told (`--renderer null`, FARM_RENDERER=null, or a pool's
`renderer = "null"`), and its recipe says "renderer": "null", so nobody mistakes these images for renders.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image

    from models.pipeline import RenderRequest

NAME = "null"
# Grain of ±GRAIN levels per channel: PNGs of about half the raw size (photographs: 0.4-0.5 at 1024 px).
GRAIN = 4
# The grain tile that every image crops at its own offset (drawn once per process, at first use).
_TILE = 2048

_grain_lock = threading.Lock()
_grain: Any = None


class _Device:
    """What a worker reads of a pipeline's device: its type and its name."""

    type = "cpu"

    def __str__(self) -> str:
        return f"{NAME} renderer"


class NullPipeline:
    """Stands where a loaded pipeline would (the worker's pipeline cache holds it): nothing is loaded.

    `text_encoder` is not None, so the worker encodes no prompts for it; `to()` moves nothing.
    """

    renderer = NAME
    text_encoder = NAME
    device = _Device()

    def __init__(self, model: str, quantize: str | None = None) -> None:
        self.model, self.quantize = model, quantize

    def to(self, *_args: Any, **_kwargs: Any) -> NullPipeline:
        return self


def render_batch(
    pipe: Any,
    requests: list[RenderRequest],
    *,
    interrupt: Callable[[], str | None] | None = None,
    **_ignored: Any,
) -> list[Image.Image]:
    """One synthetic image per request, in order (the pipeline's prompt cache, deadline and ControlNet arguments
    are accepted and ignored: there are no denoising steps to check them between)."""
    from models.pipeline import RenderInterrupted

    del pipe
    reason = interrupt() if interrupt is not None else None
    if reason is not None:
        raise RenderInterrupted(f"null render stopped: {reason}")
    return [null_image(request.prompt, request.seed, request.width, request.height) for request in requests]


def render_recipe(
    pipe: Any,
    request: RenderRequest,
    *,
    quantize: str | None = None,
    controlnet: str | None = None,
    control_preprocess: str | None = None,
) -> dict[str, Any]:
    """The recipe every null image carries (jobs.recipe, the PNG's recipe chunk): it says no model ran."""
    del pipe, request
    recipe: dict[str, Any] = {
        "renderer": NAME,
        "sampler": NAME,
        "scheduler": NAME,
        "note": "synthetic stand-in image (models/null.py), no model ran: for measuring the farm only",
    }
    if quantize is not None:
        recipe["quantize"] = quantize
    if controlnet is not None:
        recipe["controlnet"] = controlnet  # asked for, and ignored
        recipe["control_preprocess"] = control_preprocess
    return recipe


def null_image(prompt: str, seed: int, width: int, height: int) -> Image.Image:
    """A photo-like RGB image of width × height, the same for the same (prompt, seed) and different otherwise."""
    import numpy as np
    from PIL import Image, ImageChops

    digest = hashlib.sha256(f"{seed}\0{prompt}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:16], "little"))
    # Colour fields: a broad gradient with finer blotches over it, built at 1/16 size and scaled up (cheap).
    small = (max(4, width // 16), max(4, height // 16))
    broad = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8)).resize(small, Image.Resampling.BICUBIC)
    blotches = rng.integers(0, 256, (max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    fine = Image.fromarray(blotches).resize(small, Image.Resampling.BICUBIC)
    base = Image.blend(broad, fine, 0.3).resize((width, height), Image.Resampling.BILINEAR)
    # Grain: a crop of one random tile at this image's own offset (tiled when the image is larger than it).
    tile = _grain_tile()
    x, y = (int(v) for v in rng.integers(0, _TILE, 2))
    if width + x <= _TILE and height + y <= _TILE:
        grain = tile.crop((x, y, x + width, y + height))
    else:
        grain = Image.new("RGB", (width, height))
        for top in range(-y, height, _TILE):
            for left in range(-x, width, _TILE):
                grain.paste(tile, (left, top))
    return ImageChops.add(base, grain, 1.0, -GRAIN)


def _grain_tile() -> Image.Image:
    global _grain
    with _grain_lock:
        if _grain is None:
            import numpy as np
            from PIL import Image

            rng = np.random.default_rng(0)
            _grain = Image.fromarray(rng.integers(0, 2 * GRAIN + 1, (_TILE, _TILE, 3), dtype=np.uint8))
        return _grain

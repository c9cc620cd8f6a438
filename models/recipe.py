"""A job's render recipe: everything about how its image was sampled that is not one of its inputs.

The worker writes it beside each result (jobs.recipe, the export rows, the PNG's `recipe` chunk), so a dataset
says which sampler, schedule, noise, caption cleaning and precisions made it, and `farm status` can warn when
one dataset mixes recipes (T5 in fp32 on a CPU worker and fp16 on a GPU worker give slightly different images).
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from models.pipeline import CLEAN_CAPTION, NAMED_TIMESTEPS, NOISE_DEVICE, RenderRequest
from models.scheduler import sampler_of

if TYPE_CHECKING:
    from diffusers import PixArtAlphaPipeline


def render_recipe(
    pipe: PixArtAlphaPipeline,
    request: RenderRequest,
    *,
    quantize: str | None = None,
    controlnet: str | None = None,
    control_preprocess: str | None = None,
) -> dict[str, Any]:
    """The recipe of `request` rendered by `pipe` (the same for every image of one pipeline call)."""
    import diffusers

    scheduler = pipe.scheduler
    config = {key: _json_safe(value) for key, value in sorted(scheduler.config.items()) if not key.startswith("_")}
    transformer_dtype = str(pipe.transformer.dtype).removeprefix("torch.")
    recipe: dict[str, Any] = {
        "sampler": sampler_of(scheduler) or type(scheduler).__name__,
        "scheduler": type(scheduler).__name__,
        "scheduler_config": config,
        "timesteps": list(NAMED_TIMESTEPS[request.timesteps]) if request.timesteps else None,
        "noise": NOISE_DEVICE,
        "clean_caption": CLEAN_CAPTION,
        # A T5 at full precision runs at the worker's dtype, like the transformer.
        "t5": "int8" if quantize in ("int8", "int8-transformer") else transformer_dtype,
        "transformer": "int8" if quantize == "int8-transformer" else transformer_dtype,
        "diffusers": diffusers.__version__,
    }
    if controlnet is not None:
        recipe["condition"] = {
            "preprocess": (control_preprocess or "none").split(":", 1)[0],
            "geometry": "resize-center-crop",
            "latent": "posterior-mean",
        }
    return recipe


def recipe_json(recipe: dict[str, Any]) -> str:
    """The recipe as canonical JSON (sorted keys, no spaces): equal recipes give equal text and digests."""
    return json.dumps(recipe, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _json_safe(value: Any) -> Any:
    """Scheduler configs hold -inf (lambda_min_clipped) and tuples; JSON has neither."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, tuple | list):
        return [_json_safe(item) for item in value]
    return value

"""PNG encoding with the job's inputs in the file's metadata, so an image explains itself."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL.PngImagePlugin import PngInfo

from farm.job import Claimed


def png_metadata(job: Claimed, recipe: str | None = None) -> dict[str, str]:
    """The text chunks written into each PNG: the job's inputs and how it was sampled (the recipe's JSON)."""
    parameters: dict[str, Any] = {
        "job_id": job.id,
        "seed": job.seed,
        "width": job.width,
        "height": job.height,
        "num_inference_steps": job.num_inference_steps,
        "guidance_scale": job.guidance_scale,
        "model": job.model,
    }
    optional = {
        "negative_prompt": job.negative_prompt,
        "timesteps": job.timesteps,
        "controlnet": job.controlnet,
        "conditioning_scale": job.conditioning_scale,
        "control_preprocess": job.control_preprocess,
        "quantize": job.quantize,
    }
    parameters.update({key: value for key, value in optional.items() if value is not None})
    if recipe is not None:
        parameters["scheduler"] = json.loads(recipe).get("scheduler")
    chunks = {
        "prompt": job.prompt,
        "seed": str(job.seed),
        "parameters": json.dumps(parameters, sort_keys=True),
        "Software": "pixart-farm",
    }
    if recipe is not None:
        chunks["recipe"] = recipe
    return chunks


def encode_png(image: Any, job: Claimed, recipe: str | None = None) -> bytes:
    """Encode a PIL image losslessly; the same pixels, job and recipe always give the same bytes."""
    info = PngInfo()
    for key, value in png_metadata(job, recipe).items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, optimize=False, compress_level=6)
    return buffer.getvalue()

"""PNG encoding with the job's inputs in the file's metadata, so an image explains itself."""

from __future__ import annotations

import io
import json
import zlib
from typing import Any

from PIL.PngImagePlugin import PngInfo

from farm.job import Claimed, Scores


def png_metadata(job: Claimed, recipe: str | None = None, scores: Scores | None = None) -> dict[str, str]:
    """The text chunks written into each PNG: the job's inputs, how it was sampled (the recipe's JSON) and, for a
    scored image, its scores (the verdict is decided later, in try order, and lives in the row)."""
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
    if scores is not None:
        chunks["scores"] = json.dumps(
            {
                "clip_score": scores.clip_score,
                "aesthetic_score": scores.aesthetic_score,
                "nsfw": scores.nsfw,
                "pixel_sha256": scores.pixel_sha256,
                "models": json.loads(scores.models) if scores.models else None,
                "try_index": job.try_index,
            },
            sort_keys=True,
        )
    return chunks


def encode_png(image: Any, job: Claimed, recipe: str | None = None, scores: Scores | None = None) -> bytes:
    """Encode a PIL image losslessly; the same pixels, job, recipe and scores always give the same bytes."""
    info = PngInfo()
    for key, value in png_metadata(job, recipe, scores).items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    # zlib's run-length strategy: on photographs and renders the file is within 1-2 % of the default strategy's
    # (≈ 10 % larger on screenshots) for a third to a quarter of the CPU (BENCHMARKS.md, "Control plane ceiling").
    image.save(buffer, format="PNG", pnginfo=info, optimize=False, compress_level=6, compress_type=zlib.Z_RLE)
    return buffer.getvalue()

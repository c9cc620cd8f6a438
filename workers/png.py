"""PNG encoding with the job's inputs in the file's metadata, so an image explains itself."""

from __future__ import annotations

import io
import json
from typing import Any

from PIL.PngImagePlugin import PngInfo

from farm.job import Claimed


def png_metadata(job: Claimed) -> dict[str, str]:
    """The text chunks written into each PNG (and the object's metadata)."""
    parameters = {
        "job_id": job.id,
        "seed": job.seed,
        "width": job.width,
        "height": job.height,
        "num_inference_steps": job.num_inference_steps,
        "guidance_scale": job.guidance_scale,
        "model": job.model,
        "scheduler": "LCMScheduler",
    }
    return {
        "prompt": job.prompt,
        "seed": str(job.seed),
        "parameters": json.dumps(parameters, sort_keys=True),
        "Software": "pixart-farm",
    }


def encode_png(image: Any, job: Claimed) -> bytes:
    """Encode a PIL image losslessly; the same pixels and job always give the same bytes."""
    info = PngInfo()
    for key, value in png_metadata(job).items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, optimize=False, compress_level=6)
    return buffer.getvalue()

"""Load a PixArt-α/δ pipeline with the PixArt LCM scheduler and render one seeded image per request."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.devices import resolve_device, resolve_dtype
from models.scheduler import pixart_lcm_scheduler

if TYPE_CHECKING:
    import torch
    from diffusers import PixArtAlphaPipeline
    from PIL import Image

# The pipeline's aspect-ratio bins exist only for these latent sizes (256, 512 and 1024 px models);
# any other sample_size raises "Invalid sample size" when binning is on.
_BINNED_SAMPLE_SIZES = frozenset({32, 64, 128})

_MODEL_INDEX = "model_index.json"


class ModelLoadError(RuntimeError):
    """A pipeline could not be loaded from the given local folder or hub id."""


@dataclass(frozen=True)
class RenderRequest:
    """One image to render: prompt, seed and size, plus LCM sampling settings."""

    prompt: str
    seed: int
    width: int
    height: int
    # PixArt-LCM is distilled for 2–4 steps with guidance baked in at w=4.5, so CFG stays off:
    # a scale above 1 would only double the batch.
    num_inference_steps: int = 4
    guidance_scale: float = 0.0

    def __post_init__(self) -> None:
        """Reject values the pipeline would fail on deep inside a worker."""
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive, got {self.width}x{self.height}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be non-negative, got {self.guidance_scale}")


def _looks_like_local_path(source: str) -> bool:
    """Return True when `source` is meant as a filesystem path rather than an "owner/name" hub id."""
    if Path(source).expanduser().exists():
        return True
    # Hub ids are exactly "owner/name"; anything absolute, relative-dotted, home-based or deeper is a path.
    return source.startswith(("/", ".", "~")) or "\\" in source or source.count("/") != 1


def _check_local_folder(source: str) -> Path:
    """Return the folder for a local source, or raise ModelLoadError saying what is missing."""
    folder = Path(source).expanduser()
    if not folder.exists():
        raise ModelLoadError(f"Model folder {source!r} does not exist.")
    if not folder.is_dir():
        raise ModelLoadError(f"Model source {source!r} is a file, not a diffusers pipeline folder.")
    if not (folder / _MODEL_INDEX).is_file():
        raise ModelLoadError(
            f"Model folder {source!r} has no {_MODEL_INDEX}; expected a diffusers PixArtAlphaPipeline folder."
        )
    return folder


def load_pipeline(
    source: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    local_files_only: bool = False,
) -> PixArtAlphaPipeline:
    """Load a PixArtAlphaPipeline from a folder or hub id, with the PixArt LCM scheduler, on `device`."""
    from diffusers import PixArtAlphaPipeline

    resolved_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, resolved_device)

    location: str = source
    where = "hub id"
    if _looks_like_local_path(source):
        location = str(_check_local_folder(source))
        where = "local folder"

    try:
        # diffusers 0.42 deprecates `torch_dtype=` (FutureWarning, removal in 1.0) in favour of `dtype=`.
        pipe = PixArtAlphaPipeline.from_pretrained(location, dtype=torch_dtype, local_files_only=local_files_only)
    except Exception as exc:
        # from_pretrained fails with ValueError, OSError, hub/httpx errors, safetensors errors and more
        # depending on what is wrong; callers (workers) need one type to tell "bad model" from a bug.
        hint = " (local_files_only=True and it is not in the local cache)" if local_files_only else ""
        raise ModelLoadError(
            f"Could not load PixArtAlphaPipeline from {where} {source!r}{hint}: {type(exc).__name__}: {exc}"
        ) from exc

    # Whatever scheduler the checkpoint ships, sample with the LCM scheduler on PixArt's noise schedule.
    pipe.scheduler = pixart_lcm_scheduler()
    pipe = pipe.to(resolved_device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def uses_resolution_binning(pipe: PixArtAlphaPipeline) -> bool:
    """Return True when the transformer's sample size has aspect-ratio bins (256/512/1024 px models)."""
    return pipe.transformer.config.sample_size in _BINNED_SAMPLE_SIZES


def make_generator(pipe: PixArtAlphaPipeline, seed: int) -> torch.Generator:
    """Return a generator on the pipeline's device, seeded with `seed`."""
    import torch

    # The pipeline draws the initial latents with this generator on its own device, so a CUDA pipeline
    # needs a CUDA generator; on CPU this is exactly torch.Generator().manual_seed(seed).
    device = pipe.device
    generator_device = "cpu" if device.type == "cpu" else str(device)
    return torch.Generator(device=generator_device).manual_seed(seed)


def render_kwargs(pipe: PixArtAlphaPipeline, request: RenderRequest) -> dict[str, Any]:
    """Return exactly the keyword arguments render() passes to the pipeline for `request`."""
    return {
        "prompt": request.prompt,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "width": request.width,
        "height": request.height,
        "generator": make_generator(pipe, request.seed),
        "use_resolution_binning": uses_resolution_binning(pipe),
        # Caption cleaning needs bs4 and ftfy and rewrites prompts; the farm stores prompts verbatim.
        "clean_caption": False,
        "output_type": "pil",
    }


def render(pipe: PixArtAlphaPipeline, request: RenderRequest) -> Image.Image:
    """Render one image for `request`; the same pipeline and request always give the same pixels."""
    import torch

    kwargs = render_kwargs(pipe, request)
    with torch.inference_mode():
        output = pipe(**kwargs)
    return output.images[0]

"""Load a PixArt-α/δ pipeline with the sampler its release uses and render seeded images.

Noise is drawn on the CPU (as the official LCM demo does), so a job's image does not depend on the device that
rendered it beyond the kernels' own rounding; captions are cleaned as the release's pipeline cleans them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.devices import resolve_device, resolve_dtype
from models.scheduler import ORIGINAL_REPO_4_STEP_TIMESTEPS, release_scheduler, sampler_of

if TYPE_CHECKING:
    import torch
    from diffusers import PixArtAlphaPipeline
    from PIL import Image

    from models.caches import PromptEmbeddingCache
    from models.controlnet import PixArtControlNetAdapter

# The pipeline's aspect-ratio bins exist only for these latent sizes (256, 512 and 1024 px models);
# any other sample_size raises "Invalid sample size" when binning is on.
_BINNED_SAMPLE_SIZES = frozenset({32, 64, 128})

_MODEL_INDEX = "model_index.json"


class ModelLoadError(RuntimeError):
    """A pipeline could not be loaded from the given local folder or hub id."""


class RenderInterrupted(RuntimeError):
    """A render stopped between denoising steps because its caller asked (its jobs were canceled, the worker is
    shutting down): not the render's fault, so not a failed attempt."""


class RenderDeadlineExceeded(RuntimeError):
    """A render ran past its wall-clock deadline; raised between denoising steps, so the call stops there."""


# Named timestep schedules a job may ask for instead of its scheduler's own spacing.
NAMED_TIMESTEPS: dict[str, tuple[int, ...]] = {"original": ORIGINAL_REPO_4_STEP_TIMESTEPS}


@dataclass(frozen=True)
class RenderRequest:
    """One image to render: prompt, seed and size, plus the sampling settings (the sampler is the pipeline's)."""

    prompt: str
    seed: int
    width: int
    height: int
    # PixArt-LCM's defaults: distilled for 2–4 steps with guidance baked in at w=4.5, so CFG stays off.
    num_inference_steps: int = 4
    guidance_scale: float = 0.0
    negative_prompt: str | None = None  # used when guidance_scale > 1 (CFG); None is PixArt's "" negative
    timesteps: str | None = None  # a NAMED_TIMESTEPS key: "original" is the original repo's LCM 4-step schedule

    def __post_init__(self) -> None:
        """Reject values the pipeline would fail on deep inside a worker."""
        if self.width <= 0 or self.height <= 0:
            raise ValueError(f"width and height must be positive, got {self.width}x{self.height}")
        if self.num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be non-negative, got {self.guidance_scale}")
        if self.timesteps is not None:
            named = NAMED_TIMESTEPS.get(self.timesteps)
            if named is None:
                raise ValueError(f"unknown timesteps {self.timesteps!r}: expected one of {', '.join(NAMED_TIMESTEPS)}")
            if len(named) != self.num_inference_steps:
                raise ValueError(
                    f"timesteps {self.timesteps!r} are {len(named)} steps, "
                    f"but the job asks for {self.num_inference_steps}"
                )

    @property
    def cfg(self) -> bool:
        """Whether the pipeline runs classifier-free guidance for this request (diffusers: scale > 1)."""
        return self.guidance_scale > 1


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
    with_text_encoder: bool = True,
    sampler: str | None = None,
) -> PixArtAlphaPipeline:
    """Load a PixArtAlphaPipeline from a folder or hub id on `device`, sampled with its own scheduler.

    sampler: "lcm" or "dpm-solver++" puts that sampler in its release configuration (a model profile says which);
    None keeps the scheduler the model ships (its scheduler/scheduler_config.json).
    with_text_encoder=False skips T5 (step 3 of the 8 GB recipe): render from precomputed prompt embeddings.
    """
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
        extra: dict[str, Any] = {} if with_text_encoder else {"text_encoder": None}
        pipe = PixArtAlphaPipeline.from_pretrained(
            location, dtype=torch_dtype, local_files_only=local_files_only, **extra
        )
    except Exception as exc:
        # from_pretrained fails with ValueError, OSError, hub/httpx errors, safetensors errors and more
        # depending on what is wrong; callers (workers) need one type to tell "bad model" from a bug.
        hint = " (local_files_only=True and it is not in the local cache)" if local_files_only else ""
        raise ModelLoadError(
            f"Could not load PixArtAlphaPipeline from {where} {source!r}{hint}: {type(exc).__name__}: {exc}"
        ) from exc

    if sampler is not None:
        pipe.scheduler = release_scheduler(sampler)
    pipe = pipe.to(resolved_device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def uses_resolution_binning(pipe: PixArtAlphaPipeline) -> bool:
    """Return True when the transformer's sample size has aspect-ratio bins (256/512/1024 px models)."""
    return pipe.transformer.config.sample_size in _BINNED_SAMPLE_SIZES


def render_size(pipe: PixArtAlphaPipeline, width: int, height: int) -> tuple[int, int]:
    """Return the (width, height) the pipeline denoises at: the aspect-ratio bin when binning is on."""
    if not uses_resolution_binning(pipe):
        return width, height
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import (
        ASPECT_RATIO_256_BIN,
        ASPECT_RATIO_512_BIN,
        ASPECT_RATIO_1024_BIN,
    )

    bins = {32: ASPECT_RATIO_256_BIN, 64: ASPECT_RATIO_512_BIN, 128: ASPECT_RATIO_1024_BIN}
    binned_height, binned_width = pipe.image_processor.classify_height_width_bin(
        height, width, ratios=bins[pipe.transformer.config.sample_size]
    )
    return binned_width, binned_height


NOISE_DEVICE = "cpu"


def make_generator(pipe: PixArtAlphaPipeline, seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed`, whatever the pipeline's device.

    diffusers draws the initial latents on the generator's device and moves them to the pipeline's, so the noise
    of a seed is torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed)) on every worker: the
    official LCM demo's noise, and the same image on a CPU and a GPU up to the kernels' rounding.
    """
    import torch

    del pipe  # the noise no longer depends on where the pipeline runs
    return torch.Generator(device=NOISE_DEVICE).manual_seed(seed)


def check_request(pipe: PixArtAlphaPipeline, request: RenderRequest) -> None:
    """Refuse settings the loaded sampler cannot run (a hub id's sampler is known only here), plainly."""
    scheduler = pipe.scheduler
    sampler = sampler_of(scheduler) or type(scheduler).__name__
    if sampler == "lcm":
        limit = int(scheduler.config.get("original_inference_steps", 50))
    else:
        limit = int(scheduler.config.get("num_train_timesteps", 1000))
    if request.num_inference_steps > limit:
        raise ValueError(
            f"this model samples with {sampler}, which takes at most {limit} steps; "
            f"the job asks for {request.num_inference_steps}"
        )
    if request.timesteps is not None and sampler != "lcm":
        raise ValueError(f"timesteps {request.timesteps!r} are LCM timesteps, but this model samples with {sampler}")


def render_kwargs(pipe: PixArtAlphaPipeline, request: RenderRequest) -> dict[str, Any]:
    """Return exactly the keyword arguments render() passes to the pipeline for `request`."""
    check_request(pipe, request)
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "num_inference_steps": request.num_inference_steps,
        "guidance_scale": request.guidance_scale,
        "width": request.width,
        "height": request.height,
        "generator": make_generator(pipe, request.seed),
        "use_resolution_binning": uses_resolution_binning(pipe),
        # As the release's pipeline does (diffusers' default): the prompt is cleaned before T5 (bs4 and ftfy).
        # The farm stores and exports the prompt as given.
        "clean_caption": CLEAN_CAPTION,
        "output_type": "pil",
    }
    if request.cfg:
        kwargs["negative_prompt"] = request.negative_prompt or ""
    if request.timesteps is not None:
        kwargs["timesteps"] = list(NAMED_TIMESTEPS[request.timesteps])
    return kwargs


CLEAN_CAPTION = True


def render(pipe: PixArtAlphaPipeline, request: RenderRequest) -> Image.Image:
    """Render one image for `request`; the same pipeline and request always give the same pixels."""
    import torch

    kwargs = render_kwargs(pipe, request)
    with torch.inference_mode():
        output = pipe(**kwargs)
    return output.images[0]


def check_batchable(requests: list[RenderRequest]) -> None:
    """One pipeline call renders one size with one sampler setting; raise ValueError otherwise."""
    if not requests:
        raise ValueError("render_batch needs at least one request")
    first = requests[0]
    for other in requests[1:]:
        same = (other.width, other.height, other.num_inference_steps, other.guidance_scale, other.timesteps) == (
            first.width,
            first.height,
            first.num_inference_steps,
            first.guidance_scale,
            first.timesteps,
        )
        if not same:
            raise ValueError(
                "requests in one batch must share width, height, num_inference_steps, guidance_scale and timesteps; "
                f"got {first} and {other}"
            )


def render_batch(
    pipe: PixArtAlphaPipeline,
    requests: list[RenderRequest],
    *,
    controlnet: PixArtControlNetAdapter | None = None,
    conditions: list[torch.Tensor] | None = None,
    conditioning_scale: float = 1.0,
    prompt_cache: PromptEmbeddingCache | None = None,
    model_key: str | None = None,
    prompt_embeds: torch.Tensor | None = None,
    prompt_attention_mask: torch.Tensor | None = None,
    output_type: str = "pil",
    deadline_s: float | None = None,
    interrupt: Callable[[], str | None] | None = None,
) -> list[Any]:
    """Render compatible requests in one pipeline call, each image with its own seeded generator.

    Each image's initial noise comes from its own generator, so it is the same noise as rendering it alone;
    the pixels can still differ by one level in a few places, because matrix kernels round differently
    for different batch sizes (measured in BENCHMARKS.md, checked in tests).

    Optional: `controlnet` with one condition latent per request (encoded at render_size()); a
    `prompt_cache` (T5 runs once per distinct prompt); or precomputed `prompt_embeds` + mask (8 GB recipe).

    `deadline_s`: seconds from this call's start after which RenderDeadlineExceeded is raised at the end of
    the next denoising step (Celery's time limits do nothing on solo and threads pools).
    `interrupt`: asked after every denoising step; a reason (not None) raises RenderInterrupted there.
    """
    import torch

    started = time.monotonic()
    check_batchable(requests)
    first = requests[0]
    kwargs = render_kwargs(pipe, first)
    kwargs["output_type"] = output_type
    kwargs["generator"] = [make_generator(pipe, r.seed) for r in requests]
    kwargs.update(_prompt_kwargs(pipe, requests, prompt_cache, model_key, prompt_embeds, prompt_attention_mask))
    if deadline_s is not None or interrupt is not None:
        # PixArtAlphaPipeline (diffusers 0.42) has only the legacy step callback, not callback_on_step_end;
        # it calls it after every step (callback_steps=1) and does not catch what it raises.
        kwargs["callback"] = _step_callback(started, deadline_s, interrupt, first.num_inference_steps)
        kwargs["callback_steps"] = 1
    with torch.inference_mode():
        if controlnet is None:
            if conditions is not None:
                raise ValueError("conditions were given without a controlnet")
            output = pipe(**kwargs)
        else:
            from models.controlnet import controlled_pipeline

            cond = _stack_conditions(pipe, requests, conditions)
            output = controlled_pipeline(pipe, controlnet, cond, conditioning_scale)(**kwargs)
    return list(output.images)


def _step_callback(
    started: float, deadline_s: float | None, interrupt: Callable[[], str | None] | None, total_steps: int
) -> Callable[..., None]:
    """A pipeline step callback: RenderInterrupted when `interrupt` gives a reason, RenderDeadlineExceeded once
    `deadline_s` has passed since `started`."""

    def check(step: int, timestep: Any, latents: Any) -> None:
        reason = interrupt() if interrupt is not None else None
        if reason is not None:
            raise RenderInterrupted(f"render stopped after step {step + 1} of {total_steps}: {reason}")
        if deadline_s is not None and time.monotonic() - started > deadline_s:
            raise RenderDeadlineExceeded(
                f"render exceeded its deadline of {deadline_s:g} s after step {step + 1} of {total_steps}"
            )

    return check


def _prompt_kwargs(
    pipe: PixArtAlphaPipeline,
    requests: list[RenderRequest],
    prompt_cache: PromptEmbeddingCache | None,
    model_key: str | None,
    prompt_embeds: torch.Tensor | None,
    prompt_attention_mask: torch.Tensor | None,
) -> dict[str, Any]:
    """Return the pipeline's prompt arguments: text, cached embeddings or the caller's embeddings."""
    prompts = [r.prompt for r in requests]
    negatives = [r.negative_prompt or "" for r in requests]
    cfg = requests[0].cfg
    if prompt_embeds is not None:
        if prompt_attention_mask is None or prompt_embeds.shape[0] != len(requests):
            raise ValueError("prompt_embeds needs prompt_attention_mask and one row per request")
        if cfg:
            raise ValueError("precomputed prompt embeddings are for guidance_scale <= 1 (LCM); got CFG")
        return {
            "prompt": None,
            "negative_prompt": None,
            "prompt_embeds": prompt_embeds,
            "prompt_attention_mask": prompt_attention_mask,
        }
    if prompt_cache is None:
        return {"prompt": prompts, **({"negative_prompt": negatives} if cfg else {})}
    embeds, mask = prompt_cache.embed(pipe, prompts, model_key=model_key)
    # An 8-bit T5 hands back fp16 embeddings; the pipeline takes its latents' dtype from them, so match the
    # transformer (an fp32 transformer on a CPU would otherwise meet fp16 latents).
    # (A low-memory worker keeps the cache in host memory: the rows come to the pipeline's device here.)
    embeds, mask = embeds.to(device=pipe.device, dtype=pipe.transformer.dtype), mask.to(pipe.device)
    extra: dict[str, Any] = {}
    if cfg:
        # Each image's own negative prompt (PixArt's default is ""), cached like any other prompt.
        neg_embeds, neg_mask = prompt_cache.embed(pipe, negatives, model_key=model_key)
        extra = {
            "negative_prompt_embeds": neg_embeds.to(device=pipe.device, dtype=pipe.transformer.dtype),
            "negative_prompt_attention_mask": neg_mask.to(pipe.device),
        }
    return {"prompt": None, "negative_prompt": None, "prompt_embeds": embeds, "prompt_attention_mask": mask, **extra}


def _stack_conditions(
    pipe: PixArtAlphaPipeline, requests: list[RenderRequest], conditions: list[torch.Tensor] | None
) -> torch.Tensor:
    """Stack one 1×C×h×w condition latent per request, checking it matches the size the pipeline renders."""
    import torch

    if conditions is None or len(conditions) != len(requests):
        got = "none" if conditions is None else len(conditions)
        raise ValueError(f"a controlled batch needs one condition per request: {len(requests)} requests, {got}")
    width, height = render_size(pipe, requests[0].width, requests[0].height)
    expected = (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    for index, cond in enumerate(conditions):
        if tuple(cond.shape[-2:]) != expected:
            raise ValueError(
                f"condition {index} is {tuple(cond.shape[-2:])} latents but the pipeline renders {expected}; "
                f"encode it at {width}x{height}"
            )
    return torch.cat([c if c.ndim == 4 else c[None] for c in conditions])

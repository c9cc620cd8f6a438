"""GPU benchmark: the worker's own low-memory mode with the real model, and the full PixArt-δ 1024 architecture with
random weights (fp16, and the 8-bit-T5 recipe done by hand).

    python -m benchmarks.gpu --model /models/PixArt-LCM-XL-2-1024-MS --out worker.json   # the worker, ≤ 6 min
    python -m benchmarks.gpu --device cpu --tiny                 # the same worker code path, tiny model, CPU
    python benchmarks/gpu.py --out results.json            # random weights, on a CUDA machine, a few minutes
    python benchmarks/gpu.py --quick --out results.json    # fewer repetitions
    python benchmarks/gpu.py --dry-run-cpu                 # same code path, tiny widths, on the CPU

With --model (a local diffusers folder of PixArt-alpha/PixArt-LCM-XL-2-1024-MS) it measures what a
`--low-memory` worker does, through the worker's own objects: PipelineCache(settings, low_memory=True) and
RenderCaches as workers/runtime.py builds them, a few Claimed jobs (quantize int8: T5 in 8-bit), then
RenderCaches.prepare(jobs) — T5 loaded alone, the task's prompts encoded, T5 freed, then transformer and VAE
placed — and the batches rendered as workers/tasks.py renders them (render_batch with the prompt cache). It reports
torch.cuda.max_memory_allocated over the whole task, the peak of the T5 phase (until t5_released) and of the render
phase (after it) separately, the events in the order they happened with the memory allocated at each, and a second
task whose prompts are all cached (no T5). Nothing is downloaded.

Without --model:

Nothing is downloaded. The models are built from their configurations with random weights directly on the GPU in
fp16 (PixArt-XL-2 at 1024: 28 blocks, 16 heads × 72; the T5-XXL encoder; Stable Diffusion's VAE), the
scheduler is LCM with PixArt's noise schedule and the tokenizer is the farm's offline tiny T5 tokenizer: every
prompt is padded to 120 tokens, as PixArt's T5 inputs are, so the text encoder does the real amount of work.
Random weights cost what trained ones do; the images are noise.

Configurations, each at 1024×1024, 4 LCM steps, guidance 0:
  (a) fp16: T5, transformer and VAE resident in fp16, prompts in, images out, at batch 1 and batch 8.
  (b) int8 recipe: the fp16 T5 is saved to a temporary folder and loaded back 8-bit through
      transformers.BitsAndBytesConfig(load_in_8bit=True); prompts are encoded; the encoder is freed; the
      transformer and VAE are put on the GPU and render from prompt_embeds + prompt_attention_mask with
      text_encoder=None. Encode and render phases are timed and their memory peaks taken separately; the
      recipe's peak is the larger of the two.
Peak memory is torch.cuda.max_memory_allocated (and max_memory_reserved), reset before each configuration; the
CUDA context (a few hundred MB) is not included. An out-of-memory error is recorded and the run goes on.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Never reach for a hub: every component is built from its configuration here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Run as `python benchmarks/gpu.py` from anywhere: the repository root holds the `models` package.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GIB = 1024**3
TARGET_S_PER_IMAGE_BATCH1 = 0.5  # issue 4: ≤ 0.5 s per 1024px image at batch 1
TARGET_PEAK_BYTES_INT8 = 8 * GIB  # issue 4: peak ≤ 8 GB in the 8-bit low-memory mode

PROMPTS = [
    "a photo of a cat sitting on a chair near a window, soft light, highly detailed",
    "a watercolor painting of a mountain lake at sunrise with fog over the water",
    "a red car on a city street at night, rain, cinematic lighting, sharp focus",
    "a portrait of an old man wearing a hat, oil painting, warm colors",
    "a castle on a hill above a forest, digital art, dramatic clouds in the sky",
    "a cute robot holding a flower in a garden, cartoon style, bright colors",
    "a boat on the sea under a full moon, dark blue sky, photorealistic",
    "a dog running on the beach at sunset, wide shot, golden light",
]


@dataclass(frozen=True)
class Spec:
    """Model sizes. FULL is PixArt-δ 1024 as released; DRY keeps its structure at tiny widths for a CPU check."""

    name: str
    # PixArtTransformer2DModel (PixArt-XL-2)
    layers: int
    heads: int
    head_dim: int
    sample_size: int  # latent side; 128 → 1024 px, the only size with micro-conditions and 1024 bins
    # T5 encoder (T5 v1.1 XXL)
    t5_d_model: int
    t5_d_ff: int
    t5_layers: int
    t5_heads: int
    t5_d_kv: int
    t5_vocab: int
    # AutoencoderKL (Stable Diffusion's VAE)
    vae_channels: tuple[int, ...]
    vae_norm_groups: int
    # What to run
    batch_sizes: tuple[int, ...] = (1, 8)
    image_size: int = field(default=0)  # 0: the native size, sample_size × the VAE factor
    resolution_binning: bool = True

    @property
    def size(self) -> int:
        return self.image_size or self.sample_size * 2 ** (len(self.vae_channels) - 1)


FULL = Spec(
    name="pixart-delta-1024 (PixArt-XL-2 + T5-XXL encoder + SD VAE)",
    layers=28,
    heads=16,
    head_dim=72,
    sample_size=128,
    t5_d_model=4096,
    t5_d_ff=10240,
    # google/t5-v1_1-xxl (PixArt's encoder) has 24 layers with 64 heads of 64: ≈4.7B parameters in the encoder.
    t5_layers=24,
    t5_heads=64,
    t5_d_kv=64,
    t5_vocab=32128,
    vae_channels=(128, 256, 512, 512),
    vae_norm_groups=32,
)

# Same classes and code path (sample_size 128 with resolution/aspect micro-conditions, 120-token T5 inputs, 8-bit
# T5 through bitsandbytes, batch 1 and 8), widths cut about 16×, 2 layers. It renders 256×256 with binning off:
# at 1024×1024 the VAE decode alone takes seconds per image on a small CPU.
DRY = Spec(
    name="dry-run-cpu (PixArt-δ structure at ~1/16 width)",
    layers=2,
    heads=2,
    head_dim=36,
    sample_size=128,
    t5_d_model=256,
    t5_d_ff=640,
    t5_layers=2,
    t5_heads=4,
    t5_d_kv=64,
    t5_vocab=32128,
    vae_channels=(8, 16, 32, 32),
    vae_norm_groups=8,
    image_size=256,
    resolution_binning=False,
)


@dataclass
class Reps:
    warmup: int
    batch1: int
    batched: int

    def timed(self, batch: int) -> int:
        return self.batch1 if batch == 1 else self.batched


# ---------------------------------------------------------------------------------------------------------------
# Building the models


@contextlib.contextmanager
def _default_device_and_dtype(device: str, dtype: Any) -> Iterator[None]:
    """Create parameters directly on `device` in `dtype`: default init on a GPU takes seconds even for 4.7B."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


def build_components(spec: Spec, device: str, dtype: Any) -> dict[str, Any]:
    """Build tokenizer, T5 encoder, transformer, VAE and scheduler with random weights on `device`."""
    import torch
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from models.scheduler import pixart_lcm_scheduler
    from models.tiny import build_tiny_tokenizer

    torch.manual_seed(0)
    tokenizer = build_tiny_tokenizer()  # ids fit any T5 vocabulary; prompts are padded to 120 tokens
    t5_config = T5Config(
        vocab_size=spec.t5_vocab,
        d_model=spec.t5_d_model,
        d_kv=spec.t5_d_kv,
        num_heads=spec.t5_heads,
        num_layers=spec.t5_layers,
        d_ff=spec.t5_d_ff,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    width = spec.heads * spec.head_dim
    with _default_device_and_dtype(device, dtype):
        text_encoder = T5EncoderModel(t5_config)
        transformer = PixArtTransformer2DModel(
            num_attention_heads=spec.heads,
            attention_head_dim=spec.head_dim,
            in_channels=4,
            out_channels=8,
            num_layers=spec.layers,
            cross_attention_dim=width,
            caption_channels=spec.t5_d_model,
            sample_size=spec.sample_size,
            patch_size=2,
            norm_type="ada_norm_single",
            use_additional_conditions=spec.sample_size == 128,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
            up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
            block_out_channels=spec.vae_channels,
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=spec.vae_norm_groups,
            sample_size=spec.size,
            scaling_factor=0.18215,
        )
    # Buffers made from numpy (positional embeddings) were created on the CPU in fp32; move everything.
    text_encoder = text_encoder.to(device=device, dtype=dtype).eval()
    transformer = transformer.to(device=device, dtype=dtype).eval()
    vae = vae.to(device=device, dtype=dtype).eval()
    return {
        "tokenizer": tokenizer,
        "text_encoder": text_encoder,
        "transformer": transformer,
        "vae": vae,
        "scheduler": pixart_lcm_scheduler(),
    }


def param_count(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Measuring


def is_cuda(device: str) -> bool:
    return device.startswith("cuda")


def sync(device: str) -> None:
    import torch

    if is_cuda(device):
        torch.cuda.synchronize()


def free_memory(device: str) -> None:
    import torch

    gc.collect()
    if is_cuda(device):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def reset_peak(device: str) -> None:
    import torch

    free_memory(device)
    if is_cuda(device):
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> dict[str, int | None]:
    import torch

    if not is_cuda(device):
        return {"peak_allocated_bytes": None, "peak_reserved_bytes": None}
    torch.cuda.synchronize()
    return {
        "peak_allocated_bytes": int(torch.cuda.max_memory_allocated()),
        "peak_reserved_bytes": int(torch.cuda.max_memory_reserved()),
    }


def time_calls(fn: Callable[[], Any], device: str, warmup: int, reps: int) -> tuple[list[float], Any]:
    """Run `fn` warmup times untimed, then `reps` times timed with device synchronisation; return times, last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    sync(device)
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times, result


def is_oom(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


def generators(device: str, batch: int) -> list[Any]:
    import torch

    gen_device = "cuda" if is_cuda(device) else "cpu"
    return [torch.Generator(device=gen_device).manual_seed(seed) for seed in range(batch)]


def pipe_kwargs(spec: Spec, device: str, batch: int) -> dict[str, Any]:
    return {
        "num_inference_steps": 4,
        "guidance_scale": 0.0,
        "height": spec.size,
        "width": spec.size,
        "generator": generators(device, batch),
        "use_resolution_binning": spec.resolution_binning,
        "clean_caption": False,
        "max_sequence_length": 120,
        "output_type": "pil",
    }


def timing_row(times: list[float], batch: int) -> dict[str, Any]:
    per_call = statistics.median(times)
    return {
        "batch": batch,
        "reps": len(times),
        "s_per_call_all": [round(t, 4) for t in times],
        "s_per_call": per_call,
        "s_per_image": per_call / batch,
        "images_per_s": batch / per_call,
    }


def guarded(label: str, device: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one configuration; an out-of-memory error (or any other failure) is recorded, not fatal."""
    try:
        result = fn()
        result.setdefault("status", "ok")
        return result
    except Exception as exc:
        status = "oom" if is_oom(exc) else "error"
        print(f"[{label}] {status}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", flush=True)
        if status == "error":
            traceback.print_exc()
        record = {"status": status, "error": f"{type(exc).__name__}: {exc}"[:2000], **peak(device)}
        free_memory(device)
        return record


# ---------------------------------------------------------------------------------------------------------------
# (a) fp16: everything resident


def bench_fp16(spec: Spec, components: dict[str, Any], device: str, reps: Reps) -> dict[str, Any]:
    import torch
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    results: dict[str, Any] = {}

    def encode_only() -> dict[str, Any]:
        reset_peak(device)
        with torch.inference_mode():
            times, out = time_calls(
                lambda: pipe.encode_prompt(
                    PROMPTS[:1], do_classifier_free_guidance=False, device=device, max_sequence_length=120
                ),
                device,
                reps.warmup,
                reps.batch1,
            )
        embeds, mask = out[0], out[1]
        return {
            **timing_row(times, 1),
            "prompt_embeds_shape": list(embeds.shape),
            "prompt_attention_mask_shape": list(mask.shape),
            **peak(device),
        }

    results["t5_encode_batch_1"] = guarded("fp16 T5 encode", device, encode_only)

    for batch in spec.batch_sizes:

        def run(batch: int = batch) -> dict[str, Any]:
            reset_peak(device)
            prompts = PROMPTS[:batch]
            with torch.inference_mode():
                times, out = time_calls(
                    lambda: pipe(prompt=prompts, **pipe_kwargs(spec, device, batch)),
                    device,
                    reps.warmup,
                    reps.timed(batch),
                )
            sizes = {image.size for image in out.images}
            return {**timing_row(times, batch), "image_sizes": sorted(sizes), **peak(device)}

        results[f"batch_{batch}"] = guarded(f"fp16 batch {batch}", device, run)
        print(f"[fp16] batch {batch}: {short(results[f'batch_{batch}'])}", flush=True)
    return results


# ---------------------------------------------------------------------------------------------------------------
# (b) the 8-bit-T5 low-memory recipe


def int8_breakdown(text_encoder: Any) -> dict[str, Any]:
    """Which of the 8-bit T5's weights are int8 and which stayed wider (transformers keeps T5's `wo` in fp32)."""
    import torch

    int8 = wider = 0
    wider_names: set[str] = set()
    for name, param in text_encoder.named_parameters():
        nbytes = param.numel() * param.element_size()
        if param.dtype == torch.int8:
            int8 += nbytes
        else:
            wider += nbytes
            if param.dim() == 2:
                wider_names.add(f"{name.rsplit('.', 2)[-2]}:{param.dtype}".replace("torch.", ""))
    return {
        "memory_footprint_bytes": int(text_encoder.get_memory_footprint()),
        "int8_weight_bytes": int8,
        "non_int8_weight_bytes": wider,
        "non_int8_matrices": sorted(wider_names),
        "keep_in_fp32_modules": sorted(getattr(text_encoder, "_keep_in_fp32_modules", None) or []),
    }


def bench_int8(
    spec: Spec, components: dict[str, Any], device: str, dtype: Any, reps: Reps, tmp_root: str | None
) -> dict[str, Any]:
    import torch
    from diffusers import PixArtAlphaPipeline
    from transformers import BitsAndBytesConfig, T5EncoderModel

    results: dict[str, Any] = {"encode": {}, "render": {}}
    transformer, vae, tokenizer, scheduler = (
        components["transformer"],
        components["vae"],
        components["tokenizer"],
        components["scheduler"],
    )
    folder = tempfile.mkdtemp(prefix="pixart-t5-", dir=tmp_root)
    try:
        # The random fp16 T5 goes to disk and comes back 8-bit, exactly as the recipe loads a checkpoint.
        start = time.perf_counter()
        components["text_encoder"].save_pretrained(folder)
        results["t5_save_s"] = time.perf_counter() - start
        components["text_encoder"] = None  # the caller's reference too: nothing fp16 of T5 stays on the GPU
        # The transformer and VAE wait off the GPU while the encoder runs, as when loaded afterwards.
        transformer.to("cpu")
        vae.to("cpu")
        free_memory(device)

        # Phase 1: encode with the 8-bit T5.
        reset_peak(device)
        start = time.perf_counter()
        text_encoder = T5EncoderModel.from_pretrained(
            folder,
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            dtype=dtype,
            device_map={"": torch.cuda.current_device() if is_cuda(device) else "cpu"},
        ).eval()
        sync(device)
        results["t5_int8_load_s"] = time.perf_counter() - start
        results["t5_int8"] = int8_breakdown(text_encoder)
        results["encode"]["load"] = peak(device)
        encoder_pipe = PixArtAlphaPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, transformer=None, vae=None, scheduler=scheduler
        )
        embeds: dict[int, tuple[Any, Any]] = {}
        for batch in spec.batch_sizes:

            def encode(batch: int = batch) -> dict[str, Any]:
                # Batch 1's peak includes loading the encoder: the phase's whole peak. Larger batches reset.
                if batch != spec.batch_sizes[0]:
                    reset_peak(device)
                with torch.inference_mode():
                    times, out = time_calls(
                        lambda: encoder_pipe.encode_prompt(
                            PROMPTS[:batch], do_classifier_free_guidance=False, device=device, max_sequence_length=120
                        ),
                        device,
                        reps.warmup,
                        reps.timed(batch),
                    )
                embeds[batch] = (out[0].to(dtype), out[1])
                return {**timing_row(times, batch), "prompt_embeds_shape": list(out[0].shape), **peak(device)}

            results["encode"][f"batch_{batch}"] = guarded(f"int8 encode batch {batch}", device, encode)
            print(f"[int8 encode] batch {batch}: {short(results['encode'][f'batch_{batch}'])}", flush=True)
        # Drop every reference so the 8-bit encoder's memory goes back before the render phase.
        encoder_pipe = text_encoder = None
        free_memory(device)
        results["after_free_allocated_bytes"] = int(torch.cuda.memory_allocated()) if is_cuda(device) else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    # Phase 2: render from embeddings with text_encoder=None.
    for batch in spec.batch_sizes:

        def render(batch: int = batch) -> dict[str, Any]:
            if batch not in embeds:
                raise RuntimeError(f"no prompt embeddings for batch {batch}: the encode phase failed")
            # Batch 1's peak includes putting the transformer and VAE on the GPU.
            reset_peak(device)
            transformer.to(device)
            vae.to(device)
            pipe = PixArtAlphaPipeline(
                tokenizer=tokenizer, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler
            )
            pipe.set_progress_bar_config(disable=True)
            prompt_embeds, mask = embeds[batch]
            with torch.inference_mode():
                times, out = time_calls(
                    lambda: pipe(
                        prompt=None,
                        negative_prompt=None,
                        prompt_embeds=prompt_embeds,
                        prompt_attention_mask=mask,
                        **pipe_kwargs(spec, device, batch),
                    ),
                    device,
                    reps.warmup,
                    reps.timed(batch),
                )
            sizes = {image.size for image in out.images}
            return {**timing_row(times, batch), "image_sizes": sorted(sizes), **peak(device)}

        results["render"][f"batch_{batch}"] = guarded(f"int8 recipe render batch {batch}", device, render)
        print(f"[int8 render] batch {batch}: {short(results['render'][f'batch_{batch}'])}", flush=True)

    # The recipe as a whole: encode then render, per image; its peak is the larger phase peak.
    for batch in spec.batch_sizes:
        enc, ren = results["encode"].get(f"batch_{batch}", {}), results["render"].get(f"batch_{batch}", {})
        total: dict[str, Any] = {"batch": batch}
        if enc.get("status") == "ok" and ren.get("status") == "ok":
            total["status"] = "ok"
            total["s_per_image"] = enc["s_per_image"] + ren["s_per_image"]
            total["images_per_s"] = 1 / total["s_per_image"]
        else:
            total["status"] = "incomplete"
        for key in ("peak_allocated_bytes", "peak_reserved_bytes"):
            values = [v for v in (enc.get(key), ren.get(key)) if v is not None]
            total[key] = max(values) if values else None
        results[f"recipe_batch_{batch}"] = total
    return results


# ---------------------------------------------------------------------------------------------------------------
# (c) the worker's low-memory mode, through the worker's own code (workers/caches.py), with the real model

WORKER_BATCH = 2  # a small-card pool renders 2 at a time (`max_batch = 2`)
WORKER_PROMPTS = PROMPTS[:4]


class MemoryPoller:
    """Polls the device's used memory (cudaMemGetInfo: every process, the CUDA context and bitsandbytes' workspace
    included) from a thread, for the peak that allocator statistics do not see."""

    def __init__(self, device: str, interval_s: float = 0.005) -> None:
        import threading

        self.device = device
        self.interval_s = interval_s
        self.peak_used: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import torch

        while not self._stop.is_set():
            free, total = torch.cuda.mem_get_info()
            self.peak_used = max(self.peak_used or 0, total - free)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> MemoryPoller:
        if is_cuda(self.device):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def worker_jobs(model: str, size: int, quantize: str | None, seed0: int, prompts: list[str]) -> list[Any]:
    """Claimed jobs as a claim returns them: one per prompt, 4 LCM steps, guidance 0."""
    from farm.job import Claimed

    return [
        Claimed(
            prompt=prompt,
            seed=seed0 + index,
            width=size,
            height=size,
            num_inference_steps=4,
            guidance_scale=0.0,
            model=model,
            source_line=index + 1,
            quantize=quantize,
            id=f"{seed0 + index:032x}",
            dataset_id=1,
            attempts=1,
            claim_seq=1,
        )
        for index, prompt in enumerate(prompts)
    ]


def render_like_the_worker(caches: Any, batch: list[Any]) -> list[Any]:
    """One batch as workers/tasks.py `_render` renders it: the cached pipeline, the prompt cache, render_batch."""
    from dataclasses import fields

    from models.pipeline import RenderRequest, render_batch

    names = [f.name for f in fields(RenderRequest) if hasattr(batch[0], f.name)]
    requests = [RenderRequest(**{name: getattr(job, name) for name in names}) for job in batch]
    first = batch[0]
    pipe = caches.pipelines.get(first.model, first.quantize)
    if pipe.text_encoder is None:  # the per-batch fallback: after prepare() everything is cached
        caches.encode_missing_prompts(first, [r.prompt for r in requests])
    return render_batch(pipe, requests, prompt_cache=caches.prompts, model_key=caches.prompt_key(first))


def bench_worker_low_memory(model: str, device: str, quantize: str | None, size: int | None) -> dict[str, Any]:
    """The worker's low-memory mode on `device`: prepare() then the batches, peaks per phase, the event order."""
    import torch

    from farm.settings import load_settings
    from farm.storage import storage_for
    from workers.caches import PipelineCache, RenderCaches

    home = Path(tempfile.mkdtemp(prefix="farm-bench-home-"))
    try:
        settings = load_settings(
            {},
            home=str(home),
            device=device,
            broker_url="memory://",
            database_url=f"sqlite:///{home / 'farm.db'}",
        )
        # As WorkerRuntime.build makes them for `farm worker --low-memory` (a `low_memory = true` pool).
        caches = RenderCaches(settings, storage_for(settings), PipelineCache(settings, low_memory=True))
        side = size or _native_size(model)
        results: dict[str, Any] = {
            "model": model,
            "quantize": quantize,
            "size": side,
            "jobs": len(WORKER_PROMPTS),
            "batch": WORKER_BATCH,
            "steps": 4,
        }
        started = time.perf_counter()
        events: list[dict[str, Any]] = []
        phases: dict[str, Any] = {}

        def on_event(name: str, detail: str) -> None:
            sync(device)
            row: dict[str, Any] = {"event": name, "detail": detail, "t_s": round(time.perf_counter() - started, 3)}
            if is_cuda(device):
                row["allocated_bytes"] = int(torch.cuda.memory_allocated())
                row["max_allocated_bytes_so_far"] = int(torch.cuda.max_memory_allocated())
            events.append(row)
            print(f"[worker] {row['t_s']:8.2f} s  {name:<20} {detail:<28} alloc {gib(row.get('allocated_bytes'))} GiB")
            if name == "t5_released" and "t5" not in phases:
                # The T5 phase ends here; the render phase (placing the pipeline, the batches) is measured apart.
                phases["t5"] = {**peak(device), "s": time.perf_counter() - started}
                reset_peak(device)

        caches.on_event = on_event

        def run_task(label: str, jobs: list[Any]) -> dict[str, Any]:
            reset_peak(device)
            phases.clear()
            first_event = len(events)
            t5_before = caches.t5_loads
            task_started = time.perf_counter()
            with MemoryPoller(device) as poller:
                caches.prepare(jobs)  # what workers/tasks.py calls once per task before its batches
                prepared = time.perf_counter()
                batch_s = []
                images: list[Any] = []
                for start in range(0, len(jobs), WORKER_BATCH):
                    sync(device)
                    t0 = time.perf_counter()
                    images += render_like_the_worker(caches, jobs[start : start + WORKER_BATCH])
                    sync(device)
                    batch_s.append(time.perf_counter() - t0)
                render = peak(device)
            t5 = phases.get("t5")
            whole = {
                key: max(v for v in (render[key], (t5 or {}).get(key)) if v is not None)
                if render[key] is not None
                else None
                for key in ("peak_allocated_bytes", "peak_reserved_bytes")
            }
            names = [e["event"] for e in events[first_event:]]
            row = {
                "t5_loads": caches.t5_loads - t5_before,
                "events": events[first_event:],
                "event_order": names,
                # The paper's order: T5 freed before the transformer and VAE came (back) onto the device.
                "order_ok": all(names.index("t5_released") < i for i, n in enumerate(names) if n == "pipeline_placed")
                if "t5_released" in names
                else None,
                "prepare_s": prepared - task_started,
                "batch_s": [round(t, 4) for t in batch_s],
                "s_per_image_render": sum(batch_s) / len(jobs),
                "total_s": time.perf_counter() - task_started,
                "t5_phase": t5,
                "render_phase": render,
                "whole_task": whole,
                "peak_device_used_bytes_polled": poller.peak_used,
                "images": [_image_stats(image) for image in images],
            }
            print(
                f"[worker] {label}: {len(jobs)} images, prepare {row['prepare_s']:.1f} s, "
                f"render {row['s_per_image_render']:.3f} s/image; peak alloc whole task "
                f"{gib(whole['peak_allocated_bytes'])} GiB (T5 phase "
                f"{gib((t5 or {}).get('peak_allocated_bytes'))}, render phase {gib(render['peak_allocated_bytes'])})",
                flush=True,
            )
            return row

        jobs = worker_jobs(model, side, quantize, 0, WORKER_PROMPTS)
        results["first_task"] = run_task("first task (new prompts)", jobs)
        # The same prompts with other seeds: all cached, so no T5 and nothing moves.
        results["cached_task"] = run_task(
            "second task (cached prompts)", worker_jobs(model, side, quantize, 100, WORKER_PROMPTS)
        )
        results["caches"] = caches.stats()
        return results
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _native_size(model: str) -> int:
    """The model's own size: its transformer's latent size × 8 (1024 for PixArt-LCM-XL-2-1024-MS)."""
    try:
        config = json.loads((Path(model) / "transformer" / "config.json").read_text())
        return int(config["sample_size"]) * 8
    except (OSError, ValueError, KeyError):
        return 1024


def _image_stats(image: Any) -> dict[str, Any]:
    import numpy as np

    pixels = np.asarray(image)
    return {"size": list(image.size), "mean": round(float(pixels.mean()), 2), "std": round(float(pixels.std()), 2)}


def evaluate_worker(results: dict[str, Any], device: str) -> list[str]:
    first = results.get("first_task", {})
    cached = results.get("cached_task", {})
    whole = first.get("whole_task", {}).get("peak_allocated_bytes")
    lines = [f"Worker low-memory mode ({results.get('quantize') or 'full'} T5), {results.get('size')} px:"]
    lines.append(
        f"  event order, first task: {' → '.join(first.get('event_order', []))} (order ok: {first.get('order_ok')})"
    )
    lines.append(
        f"  T5 loads: first task {first.get('t5_loads')}, cached task {cached.get('t5_loads')} (expected 1, 0)"
    )
    if is_cuda(device):
        ok = whole is not None and whole <= TARGET_PEAK_BYTES_INT8
        lines.append(
            f"  peak allocated over the whole first task ≤ 8 GiB: {gib(whole)} GiB → {'MET' if ok else 'NOT MET'} "
            f"(T5 phase {gib((first.get('t5_phase') or {}).get('peak_allocated_bytes'))}, render phase "
            f"{gib(first.get('render_phase', {}).get('peak_allocated_bytes'))}; device used, polled: "
            f"{gib(first.get('peak_device_used_bytes_polled'))} GiB incl. CUDA context)"
        )
    else:
        lines.append("  memory: not measured on the CPU")
    return lines


def run_worker_benchmark(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    if is_cuda(device) and not torch.cuda.is_available():
        print("No CUDA device: use --device cpu (with --tiny) to check the worker path here.")
        return 2
    quantize = None if args.quantize == "none" else args.quantize
    started = time.perf_counter()
    env = environment(device)
    print(f"device: {env.get('gpu_name', 'cpu')}, torch {env['torch']}, diffusers {env['diffusers']}", flush=True)
    tiny_dir = None
    model = args.model
    if args.tiny:
        from models.tiny import make_tiny

        tiny_dir = tempfile.mkdtemp(prefix="pixart-tiny-")
        model = str(make_tiny(Path(tiny_dir) / "tiny", seed=0))
    model = str(Path(model).expanduser().resolve())
    try:
        report: dict[str, Any] = {
            "benchmark": "benchmarks/gpu.py (worker low-memory mode)",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "device": device,
            "device_name": env.get("gpu_name", "cpu"),
            "environment": env,
            "results": {
                "worker_low_memory": guarded(
                    "worker low-memory", device, lambda: bench_worker_low_memory(model, device, quantize, args.size)
                )
            },
        }
        if args.compare_devices:
            report["results"]["devices"] = guarded(
                "cross-device", device, lambda: compare_devices(model, device, args.compare_size)
            )
    finally:
        if tiny_dir is not None:
            shutil.rmtree(tiny_dir, ignore_errors=True)
    result = report["results"]["worker_low_memory"]
    report["elapsed_s"] = time.perf_counter() - started
    lines = evaluate_worker(result, device) if result.get("status") == "ok" else [f"failed: {result.get('error')}"]
    if "devices" in report["results"]:
        lines += evaluate_devices(report["results"]["devices"])
    report["targets"] = {"lines": lines}
    print()
    for line in lines:
        print(line)
    print(f"\nelapsed {report['elapsed_s']:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    return 1 if result.get("status") == "error" else 0


def compare_devices(model: str, device: str, size: int | None, seed: int = 20240112) -> dict[str, Any]:
    """The same job rendered on the CPU (fp32) and on `device` at fp32 and at the worker's dtype: the noise is the
    same CPU draw everywhere, so what differs is the kernels' rounding. Tolerances (stated, checked by
    evaluate_devices): fp32 on the GPU within a mean of 1 level and PSNR ≥ 40 dB of the CPU image; the worker's
    fp16 within PSNR ≥ 30 dB (the same picture, not the same bytes)."""
    import numpy as np
    import torch

    from models.caches import PromptEmbeddingCache
    from models.pipeline import RenderRequest, load_pipeline, render_batch

    side = size or _native_size(model)
    request = RenderRequest(prompt="a lighthouse on a cliff at dusk, photograph", seed=seed, width=side, height=side)

    def render(where: str, dtype: str) -> np.ndarray:
        pipe = load_pipeline(model, device=where, dtype=dtype)
        try:
            image = render_batch(pipe, [request], prompt_cache=PromptEmbeddingCache())[0]
        finally:
            del pipe
            free_memory(where)
        return np.asarray(image, dtype=np.float64)

    reference = render("cpu", "float32")
    rows: dict[str, Any] = {}
    for label, dtype in (("gpu_fp32", "float32"), ("gpu_worker_dtype", "auto")):
        other = render(device, dtype)
        diff = np.abs(other - reference)
        mse = float(np.mean(diff**2))
        rows[label] = {
            "max_abs_levels": float(diff.max()),
            "mean_abs_levels": float(diff.mean()),
            "psnr_db": float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse)),
        }
    return {"status": "ok", "size": side, "seed": seed, "cpu_reference": "fp32", **rows, "torch": torch.__version__}


def evaluate_devices(result: dict[str, Any]) -> list[str]:
    """The cross-device lines of the report, against compare_devices' stated tolerances."""
    if result.get("status") != "ok":
        return [f"cross-device: failed: {result.get('error')}"]
    fp32, worker = result["gpu_fp32"], result["gpu_worker_dtype"]
    ok32 = fp32["mean_abs_levels"] <= 1.0 and fp32["psnr_db"] >= 40
    ok16 = worker["psnr_db"] >= 30
    return [
        f"cross-device fp32 vs CPU: mean {fp32['mean_abs_levels']:.2f} levels, max {fp32['max_abs_levels']:.0f}, "
        f"PSNR {fp32['psnr_db']:.1f} dB — {'within' if ok32 else 'OUTSIDE'} tolerance (mean ≤ 1, PSNR ≥ 40)",
        f"cross-device worker dtype vs CPU fp32: PSNR {worker['psnr_db']:.1f} dB, mean "
        f"{worker['mean_abs_levels']:.2f} levels — {'within' if ok16 else 'OUTSIDE'} tolerance (PSNR ≥ 30)",
    ]


# ---------------------------------------------------------------------------------------------------------------
# Reporting


def gib(value: int | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def short(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return row.get("status", "?") + " " + row.get("error", "")[:120]
    return f"{row['s_per_image']:.4f} s/image, peak alloc {gib(row.get('peak_allocated_bytes'))} GiB"


def table_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    rows = []
    fp16 = report["results"].get("fp16", {})
    int8 = report["results"].get("int8_t5", {})
    # The "fp16" configuration runs in fp32 on the CPU dry run; say which.
    dt = report["dtype"].replace("float", "fp")
    named = [(f"{dt} T5 encode only", fp16.get("t5_encode_batch_1"))]
    named += [(f"{dt} all resident, b{b}", fp16.get(f"batch_{b}")) for b in report["spec"]["batch_sizes"]]
    for b in report["spec"]["batch_sizes"]:
        named += [
            (f"int8 T5 encode, b{b}", int8.get("encode", {}).get(f"batch_{b}")),
            (f"int8 recipe render, b{b}", int8.get("render", {}).get(f"batch_{b}")),
            (f"int8 recipe total, b{b}", int8.get(f"recipe_batch_{b}")),
        ]
    for label, row in named:
        if row is None:
            continue
        ok = row.get("status") == "ok"
        rows.append(
            (
                label,
                f"{row['s_per_image']:.4f}" if ok and "s_per_image" in row else "-",
                f"{row['images_per_s']:.2f}" if ok and "images_per_s" in row else "-",
                gib(row.get("peak_allocated_bytes")),
                gib(row.get("peak_reserved_bytes")),
                row.get("status", "?"),
            )
        )
    return rows


def print_table(report: dict[str, Any]) -> None:
    header = ("configuration", "s/image", "images/s", "peak alloc GiB", "peak reserved GiB", "status")
    rows = [header, *table_rows(report)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    print()
    spec = report["spec"]
    binning = "on" if spec["resolution_binning"] else "off"
    print(f"{spec['name']} on {report['device_name']}, {spec['size']}px (binning {binning}), 4 LCM steps, guidance 0")
    for i, row in enumerate(rows):
        print("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(row)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for line in report["targets"]["lines"]:
        print(line)


def evaluate_targets(report: dict[str, Any], dry_run: bool) -> dict[str, Any]:
    fp16 = report["results"].get("fp16", {})
    int8 = report["results"].get("int8_t5", {})
    b1 = fp16.get("batch_1", {})
    largest = max(report["spec"]["batch_sizes"])
    bn = fp16.get(f"batch_{largest}", {})
    recipe = int8.get("recipe_batch_1", {})
    out: dict[str, Any] = {}
    lines = ["Targets (issue 4)" + (" — not judged: CPU dry run with tiny widths" if dry_run else "") + ":"]

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None or dry_run else ("MET" if ok else "NOT MET")

    ok1 = b1["s_per_image"] <= TARGET_S_PER_IMAGE_BATCH1 if b1.get("status") == "ok" else None
    out["batch1_s_per_image_le_0.5"] = None if dry_run else ok1
    lines.append(
        f"  fp16 batch 1 ≤ {TARGET_S_PER_IMAGE_BATCH1} s/image: "
        f"{b1.get('s_per_image', float('nan')):.4f} s → {verdict(ok1)}"
    )
    ok2 = bn["s_per_image"] < b1["s_per_image"] if b1.get("status") == "ok" and bn.get("status") == "ok" else None
    out[f"batch{largest}_faster_per_image"] = None if dry_run else ok2
    lines.append(
        f"  fp16 batch {largest} per image < batch 1: {bn.get('s_per_image', float('nan')):.4f} s vs "
        f"{b1.get('s_per_image', float('nan')):.4f} s → {verdict(ok2)}"
    )
    alloc, reserved = recipe.get("peak_allocated_bytes"), recipe.get("peak_reserved_bytes")
    ok3 = reserved <= TARGET_PEAK_BYTES_INT8 if reserved is not None else None
    out["int8_recipe_peak_le_8gib"] = None if dry_run else ok3
    lines.append(
        f"  int8 recipe peak ≤ 8 GiB (batch 1, max of encode and render phases, reserved): "
        f"{gib(reserved)} GiB reserved / {gib(alloc)} GiB allocated → {verdict(ok3)}"
    )
    out["lines"] = lines
    return out


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "cpu_threads": torch.get_num_threads(),
    }
    try:
        import bitsandbytes

        env["bitsandbytes"] = bitsandbytes.__version__
    except Exception as exc:  # recorded, the int8 configuration will fail and say why
        env["bitsandbytes"] = f"unavailable: {exc}"
    if is_cuda(device):
        props = torch.cuda.get_device_properties(0)
        env["gpu_name"] = torch.cuda.get_device_name(0)
        env["gpu_total_memory_bytes"] = int(props.total_memory)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


# ---------------------------------------------------------------------------------------------------------------


def _quiet_libraries() -> None:
    # Random weights can give NaN pixels; bitsandbytes logs a cast notice per int8 matmul on the CPU; diffusers
    # warns about `.to(dtype)` on freshly built models. None of it is news in a benchmark.
    warnings.filterwarnings("ignore", message=".*invalid value encountered in cast.*")
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        import diffusers
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer warm-up and timed repetitions")
    parser.add_argument(
        "--dry-run-cpu", action="store_true", help="tiny widths, 2 layers, on the CPU: checks the script end to end"
    )
    parser.add_argument("--tmp-dir", help="where the fp16 T5 is saved for the 8-bit load (needs ~10 GB on a GPU run)")
    parser.add_argument("--skip-int8", action="store_true", help="only the fp16 configuration")
    worker = parser.add_argument_group("the worker's low-memory mode (instead of the random-weight configurations)")
    worker.add_argument("--model", help="a local diffusers folder, e.g. of PixArt-alpha/PixArt-LCM-XL-2-1024-MS")
    worker.add_argument("--tiny", action="store_true", help="build the tiny random model and use it (a CPU smoke run)")
    worker.add_argument("--device", default="cuda", help="the worker's device (default cuda; cpu for a smoke run)")
    worker.add_argument(
        "--quantize",
        choices=("int8", "none", "int8-transformer"),
        default="int8",
        help="the jobs' quantize: int8 = 8-bit T5 (the paper's recipe, default), none = full-precision T5, "
        "int8-transformer = T5 and transformer in 8-bit (CUDA only)",
    )
    worker.add_argument("--size", type=int, help="image side in pixels (default: the model's own size)")
    worker.add_argument(
        "--compare-devices",
        action="store_true",
        help="also render one job on the CPU (fp32) and on the device (fp32 and the worker's dtype) and compare",
    )
    worker.add_argument("--compare-size", type=int, help="image side for --compare-devices (default: the model's)")
    args = parser.parse_args(argv)
    if args.model and args.tiny:
        parser.error("--model and --tiny exclude each other")
    if args.model or args.tiny:
        _quiet_libraries()
        return run_worker_benchmark(args)

    import torch

    _quiet_libraries()

    if args.dry_run_cpu:
        spec, device, dtype = DRY, "cpu", torch.float32
        reps = Reps(warmup=2, batch1=2, batched=1)
    else:
        if not torch.cuda.is_available():
            print("No CUDA device: this benchmark needs a GPU. Use --dry-run-cpu to check the script here.")
            return 2
        spec, device, dtype = FULL, "cuda", torch.float16
        reps = Reps(warmup=1, batch1=2, batched=1) if args.quick else Reps(warmup=2, batch1=5, batched=3)

    started = time.perf_counter()
    env = environment(device)
    print(f"device: {env.get('gpu_name', 'cpu')}, torch {env['torch']}, diffusers {env['diffusers']}", flush=True)

    start = time.perf_counter()
    components = build_components(spec, device, dtype)
    sync(device)
    build_s = time.perf_counter() - start
    params = {name: param_count(components[name]) for name in ("text_encoder", "transformer", "vae")}
    print(f"built random-weight models in {build_s:.1f} s: {params}", flush=True)

    spec_dict = {**asdict(spec), "size": spec.size}
    report: dict[str, Any] = {
        "benchmark": "benchmarks/gpu.py",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "mode": "dry-run-cpu" if args.dry_run_cpu else ("quick" if args.quick else "full"),
        "device": device,
        "device_name": env.get("gpu_name", "cpu"),
        "dtype": str(dtype).replace("torch.", ""),
        "environment": env,
        "spec": spec_dict,
        "repetitions": asdict(reps),
        "parameters": params,
        "build_s": build_s,
        "results": {},
    }

    report["results"]["fp16"] = bench_fp16(spec, components, device, reps)
    if not args.skip_int8:
        report["results"]["int8_t5"] = guarded(
            "int8 recipe", device, lambda: bench_int8(spec, components, device, dtype, reps, args.tmp_dir)
        )
    report["targets"] = evaluate_targets(report, args.dry_run_cpu)
    report["elapsed_s"] = time.perf_counter() - started
    print_table(report)
    print(f"\nelapsed {report['elapsed_s']:.1f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    failed = [
        label
        for label, row in (
            ("fp16 batch 1", report["results"]["fp16"].get("batch_1", {})),
            ("int8 recipe", report["results"].get("int8_t5", {"status": "ok"})),
        )
        if row.get("status") == "error"
    ]
    # OOMs are results; a crash of the code itself is not.
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""GPU fast-path benchmark (issue 13): seconds per 1024 px image, 4 LCM steps, batch 1 / 4 / 8 / 16, for each fast-path
option (models/fastpath.py), with images/s and MFU against the bf16 peak measured on the same GPU.

    python -m benchmarks.gpu_bench --fetch-wheels build/wheels   # here, once: what a bare GPU machine lacks
    python -m pip install -q --no-index --no-deps --find-links build/wheels -r build/wheels/requirements.txt \\
      && python -m benchmarks.gpu_bench --out gpu_bench.json      # on the GPU machine: ≤ 6 min on an H200
    python -m benchmarks.gpu_bench --tiny                        # CPU smoke run of the whole script, < 1 min

What it does, in order, each part skipped (and said so) when the time budget (--budget-s, 330 s) would not fit it:

1. peak: a bf16 matmul microbenchmark (the largest of a few square sizes): the FLOP/s MFU is measured against,
   beside the data-sheet figure (models/flops.py).
2. build: PixArt-XL-2 at 1024 (28 blocks, 16 × 72) and the SD VAE, random weights made directly on the GPU in bf16
   with torch's initialisers switched off (one normal fill per tensor). No T5: every prompt is a random 120 × 4096
   embedding with a 24-token mask (T5-XXL's output shape), so the timings are the transformer and the decode.
3. sweep: the pipeline at batch 1, 4, 8, 16 under cumulative options: eager (math attention) → +sdpa → +fuse-qkv
   → +channels-last; output_type "pt" (decode included, no PIL).
4. compile: +compile (torch.compile of transformer and VAE decoder, --compile-mode) at one batch size (--compile-batch,
   16): the first call (the warm-up: tracing and compiling, or loading from the cache) is reported apart from the
   timed calls; the cache goes to --compile-cache (kept, so a rerun on the same machine shows the warm start).
5. breakdown: at the compile batch, the compiled transformer's 4 steps and the compiled decode timed apart, each
   with its own FLOPs and MFU (where the time goes).
6. e2e: the farm end to end on the embedded default (SQLite job store and broker, file storage): a model folder
   with these weights and a stub T5 (one layer, 4096 wide: embeddings at ~no cost) is written, N jobs at 1024 px
   are submitted, and one real `farm worker` process (bf16, --fast-path with compile, the same compile cache,
   --max-batch 16, 8 I/O threads) renders them to PNG files; images/s from submit to the last job succeeded, and
   the worker's own render_images_per_second / render_mfu scraped from its /metrics.
7. memory: the real T5-XXL encoder size (random, bf16) resident with the transformer and VAE: encode a batch of
   prompts at the compile batch and render them; peak allocated and reserved.
8. quant: int8-dynamic and fp8-dynamic on a fresh transformer (eager, where the GPU has the kernels) at the
   compile batch.

FLOPs per image are counted from the model config (models/flops.py: ≈ 36.5 TFLOPs at 1024 px, 4 steps + decode).
Stretch goal (issue 13): ≥ 11.6 images/s end to end on an H100/H200-class GPU (≈ 54 % of the measured bf16 peak).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

GIB = 1024**3
STEPS = 4
TEXT_TOKENS = 120
PROMPT_TOKENS = 24  # tokens a typical prompt fills before padding (the mask's ones)
TARGET_IMAGES_PER_S = 11.6  # issue 13's stretch goal, end to end at 1024 px on an H100/H200-class GPU
DEFAULT_BUDGET_S = 330.0  # the whole script on an H200, leaving room under 6 minutes for start-up

# What a GPU machine with torch and transformers lacks for this script and a farm worker (diffusers, Celery, the
# farm's own dependencies), fetched here by --fetch-wheels at the versions installed here. Pure-Python wheels,
# except COMPILED (one wheel per Python version the farm supports).
TRAVEL = (
    "diffusers",
    "accelerate",
    "importlib-metadata",
    "zipp",
    "alembic",
    "mako",
    "click",
    "rich",
    "markdown-it-py",
    "mdurl",
    "pygments",
    "celery",
    "kombu",
    "billiard",
    "vine",
    "amqp",
    "click-didyoumean",
    "click-repl",
    "click-plugins",
    "prompt-toolkit",
    "wcwidth",
    "python-dateutil",
    "six",
    "tzlocal",
    "prometheus-client",
    "beautifulsoup4",
    "soupsieve",
    "ftfy",
    "requests",
    "urllib3",
    "charset-normalizer",
    "idna",
    "certifi",
    "typing-extensions",
)
COMPILED = ("pillow", "sqlalchemy", "psutil")
PYTHONS = ("3.11", "3.12", "3.13")


@dataclass(frozen=True)
class Plan:
    """What one run measures; FULL on a GPU, TINY on a CPU (same code path, tiny widths)."""

    name: str
    device: str
    dtype: str
    batches: tuple[int, ...]
    compile_batch: int
    warmup: int
    reps: dict[int, int]
    e2e_images: int
    e2e_batch: int
    peak_sizes: tuple[int, ...]
    compile_backend: str = "inductor"


FULL_PLAN = Plan(
    name="pixart-delta-1024",
    device="cuda",
    dtype="bfloat16",
    batches=(1, 4, 8, 16),
    compile_batch=16,
    warmup=1,
    reps={1: 3, 4: 2, 8: 1, 16: 1},
    e2e_images=256,
    e2e_batch=16,
    peak_sizes=(4096, 8192, 16384),
)
# On a CPU, Inductor takes minutes to compile even the tiny model: the smoke run traces with the "eager" backend
# (the same torch.compile call and code path, no code generation) unless --compile-backend says otherwise.
TINY_PLAN = Plan(
    name="tiny (PixArt-δ structure at ~1/16 width, 64 px)",
    device="cpu",
    dtype="float32",
    batches=(1, 2),
    compile_batch=2,
    warmup=1,
    reps={1: 1, 2: 1},
    e2e_images=4,
    e2e_batch=2,
    peak_sizes=(256, 512),
    compile_backend="eager",
)


class Budget:
    """The run's wall-clock budget: a part runs only when its estimate fits what is left."""

    def __init__(self, seconds: float, started: float | None = None) -> None:
        self.seconds = seconds
        self.started = time.perf_counter() if started is None else started
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.started)

    def allows(self, part: str, estimate_s: float) -> bool:
        if estimate_s <= self.left():
            print(f"[budget] {time.perf_counter() - self.started:6.1f} s: {part}", flush=True)
            return True
        self.skipped.append(f"{part} (needs ≈ {estimate_s:.0f} s, {self.left():.0f} s left)")
        print(f"[budget] skipping {part}: needs ≈ {estimate_s:.0f} s, {self.left():.0f} s left", flush=True)
        return False


# ---------------------------------------------------------------------------------------------------------------
# Building without init


@contextlib.contextmanager
def no_init() -> Iterator[None]:
    """torch.nn.init's fills as no-ops while modules are built (fill_random then writes every parameter once)."""
    import torch

    names = [
        "uniform_",
        "normal_",
        "trunc_normal_",
        "constant_",
        "ones_",
        "zeros_",
        "kaiming_uniform_",
        "kaiming_normal_",
        "xavier_uniform_",
        "xavier_normal_",
        "orthogonal_",
    ]
    saved = {name: getattr(torch.nn.init, name) for name in names}

    def skip(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        return tensor

    try:
        for name in names:
            setattr(torch.nn.init, name, skip)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def fill_random(module: Any, seed: int) -> Any:
    """Random weights in one pass: matrices and kernels N(0, 1/fan_in) (activations keep their scale through the
    layers, as in a trained net: no overflow in bf16, no denormals on a CPU), vectors 1 (weights) or 0 (biases)."""
    import math

    import torch

    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 1.0 / math.sqrt(math.prod(param.shape[1:])), generator=generator)
            elif name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.zero_()
    return module


def build_models(spec: Any, device: str, dtype: Any, seed: int = 0) -> tuple[Any, Any]:
    """The transformer and VAE of `spec` (benchmarks/gpu.py's FULL or DRY) on `device` in `dtype`, without init."""
    import diffusers

    from benchmarks.gpu import _default_device_and_dtype

    lib: Any = diffusers  # untyped here, as in models/
    width = spec.heads * spec.head_dim
    with no_init(), _default_device_and_dtype(device, dtype):
        transformer = lib.PixArtTransformer2DModel(
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
        vae = lib.AutoencoderKL(
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
    # Buffers made on the CPU in fp32 (positional embeddings) come along here.
    transformer = fill_random(transformer.to(device=device, dtype=dtype), seed).eval()
    vae = fill_random(vae.to(device=device, dtype=dtype), seed + 1).eval()
    return transformer, vae


def build_t5(device: str, dtype: Any, *, vocab: int, d_model: int, layers: int, heads: int, d_ff: int) -> Any:
    """A random T5 v1.1 encoder (gated GELU, heads of 64) built on `device` in `dtype` without init."""
    import transformers

    from benchmarks.gpu import _default_device_and_dtype

    lib: Any = transformers
    config = lib.T5Config(
        vocab_size=vocab,
        d_model=d_model,
        d_kv=64,
        num_heads=heads,
        num_layers=layers,
        d_ff=d_ff,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    with no_init(), _default_device_and_dtype(device, dtype):
        model = lib.T5EncoderModel(config)
    return fill_random(model.to(device=device, dtype=dtype), 7).eval()


def build_stub_t5(d_model: int, vocab: int, device: str, dtype: Any) -> Any:
    """A one-layer, one-head T5 encoder of T5-XXL's width: the worker's own text path, at almost no cost."""
    return build_t5(device, dtype, vocab=vocab, d_model=d_model, layers=1, heads=1, d_ff=64)


def make_pipe(transformer: Any, vae: Any, text_encoder: Any = None) -> Any:
    import diffusers

    from models.scheduler import pixart_lcm_scheduler
    from models.tiny import build_tiny_tokenizer

    lib: Any = diffusers
    pipe = lib.PixArtAlphaPipeline(
        tokenizer=build_tiny_tokenizer(),
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=pixart_lcm_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def random_prompts(batch: int, d_model: int, device: str, dtype: Any) -> tuple[Any, Any]:
    """T5-XXL-shaped prompt embeddings (batch × 120 × d_model) and a mask of PROMPT_TOKENS ones."""
    import torch

    generator = torch.Generator(device=device).manual_seed(batch)
    embeds = torch.randn(batch, TEXT_TOKENS, d_model, generator=generator, device=device, dtype=torch.float32)
    mask = torch.zeros(batch, TEXT_TOKENS, device=device, dtype=torch.long)
    mask[:, :PROMPT_TOKENS] = 1
    return (embeds * 0.1).to(dtype), mask


# ---------------------------------------------------------------------------------------------------------------
# Timing


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_peak(device: str, dtype: Any, sizes: tuple[int, ...]) -> dict[str, Any]:
    """The best matmul FLOP/s over a few square sizes (bf16 on a GPU): the denominator of the measured MFU."""
    import torch

    rows = []
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(device)
        reps = max(3, int(2e13 / (2 * n**3))) if device.startswith("cuda") else 3
        started = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        seconds = time.perf_counter() - started
        rows.append({"n": n, "reps": reps, "tflops": 2 * n**3 * reps / seconds / 1e12})
        del a, b
    best = max(rows, key=lambda r: r["tflops"])
    return {"sizes": rows, "tflops": best["tflops"], "flops": best["tflops"] * 1e12}


def timed(fn: Callable[[], Any], device: str, warmup: int, reps: int) -> tuple[list[float], list[float]]:
    """(warm-up call times, timed call times), each call synchronised."""
    warm: list[float] = []
    times: list[float] = []
    for index in range(warmup + reps):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        (warm if index < warmup else times).append(time.perf_counter() - started)
    return warm, times


@dataclass
class Rates:
    flops_per_image: float
    peak_measured: float
    peak_datasheet: float | None

    def row(self, config: str, batch: int, times: list[float], warm: list[float]) -> dict[str, Any]:
        per_call = statistics.median(times)
        per_image = per_call / batch
        achieved = self.flops_per_image / per_image
        return {
            "config": config,
            "batch": batch,
            "status": "ok",
            "s_per_call_all": [round(t, 4) for t in times],
            "warmup_s": [round(t, 3) for t in warm],
            "s_per_image": per_image,
            "images_per_s": 1 / per_image,
            "tflops_achieved": achieved / 1e12,
            "mfu_measured_peak": achieved / self.peak_measured,
            "mfu_datasheet_peak": achieved / self.peak_datasheet if self.peak_datasheet else None,
        }


def failure(config: str, batch: int, exc: BaseException) -> dict[str, Any]:
    oom = "out of memory" in str(exc).lower()
    print(f"[{config} b{batch}] {'oom' if oom else 'error'}: {type(exc).__name__}: {exc}"[:400], flush=True)
    if not oom:
        traceback.print_exc()
    return {"config": config, "batch": batch, "status": "oom" if oom else "error", "error": f"{exc}"[:1000]}


def render_call(pipe: Any, embeds: Any, mask: Any, size: int, binning: bool) -> Callable[[], Any]:
    import torch

    batch = embeds.shape[0]

    def call() -> Any:
        generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in range(batch)]
        with torch.inference_mode():
            return pipe(
                prompt=None,
                negative_prompt=None,
                prompt_embeds=embeds,
                prompt_attention_mask=mask,
                num_inference_steps=STEPS,
                guidance_scale=0.0,
                height=size,
                width=size,
                generator=generators,
                use_resolution_binning=binning,
                output_type="pt",
            )

    return call


# ---------------------------------------------------------------------------------------------------------------
# The parts


SWEEP = (
    ("eager", "none"),
    ("+sdpa", "none,sdpa"),
    ("+fuse_qkv", "none,sdpa,fuse-qkv"),
    ("+channels_last", "none,sdpa,fuse-qkv,channels-last"),
)


def run_sweep(ctx: Context) -> list[dict[str, Any]]:
    from models.fastpath import apply_fast_path, parse_fast_path

    rows: list[dict[str, Any]] = []
    for label, items in SWEEP:
        pipe = make_pipe(ctx.transformer, ctx.vae)
        done = apply_fast_path(pipe, parse_fast_path(items, device=ctx.plan.device))
        print(f"[{label}] {'; '.join(done)}", flush=True)
        for batch in ctx.plan.batches:
            # Each cell leaves room for what matters most after it: compile and the farm end to end.
            estimate = ctx.estimate_s(label, batch) + ctx.reserve_s
            if not ctx.budget.allows(f"{label} batch {batch}", estimate):
                continue
            try:
                embeds, mask = random_prompts(batch, ctx.spec.t5_d_model, ctx.plan.device, ctx.dtype)
                call = render_call(pipe, embeds, mask, ctx.spec.size, ctx.spec.resolution_binning)
                warm, times = timed(call, ctx.plan.device, ctx.plan.warmup, ctx.plan.reps.get(batch, 1))
                row = ctx.rates.row(label, batch, times, warm)
                ctx.observed[label] = row["s_per_image"]
            except Exception as exc:
                row = failure(label, batch, exc)
            rows.append(row)
            print(f"[{label}] {short(row)}", flush=True)
            ctx.free()
    return rows


def run_compile(ctx: Context, mode: str) -> dict[str, Any]:
    """+compile at the compile batch: the first call (compile or cache load) apart from the timed ones."""
    from models.fastpath import apply_fast_path, parse_fast_path

    batch = ctx.plan.compile_batch
    label = "+compile" if mode == "default" else f"+compile={mode}"
    items = f"none,sdpa,fuse-qkv,channels-last,compile={mode}"
    cache = ctx.compile_cache
    files_before = count_files(cache)
    try:
        pipe = make_pipe(ctx.transformer, ctx.vae)
        fast = parse_fast_path(items, device=ctx.plan.device, compile_cache=cache)
        done = apply_fast_path(pipe, fast, compile_backend=ctx.plan.compile_backend)
        print(f"[{label}] {'; '.join(done)}", flush=True)
        embeds, mask = random_prompts(batch, ctx.spec.t5_d_model, ctx.plan.device, ctx.dtype)
        call = render_call(pipe, embeds, mask, ctx.spec.size, ctx.spec.resolution_binning)
        warm, times = timed(call, ctx.plan.device, 1, ctx.plan.reps.get(batch, 1) + 1)
        row = ctx.rates.row(label, batch, times, warm)
        ctx.compiled_pipe = pipe
    except Exception as exc:
        row = failure(label, batch, exc)
    row.update(
        {
            "compile_mode": mode,
            "compile_backend": ctx.plan.compile_backend,
            "warmup_includes": "dynamo tracing + Inductor compile, or loading both from the cache",
            "compile_cache": str(cache),
            "cache_files_before": files_before,
            "cache_files_after": count_files(cache),
        }
    )
    print(f"[{label}] {short(row)}; first call {row.get('warmup_s')} s", flush=True)
    return row


def run_breakdown(ctx: Context) -> dict[str, Any]:
    """Where the time goes at the compile batch, in one pipeline call of the compiled (else eager) pipeline: the
    denoising steps (until the last step's callback) and the rest (the decode), each with its FLOPs and MFU. The
    step callback runs between the compiled calls, so nothing is traced again."""
    import torch

    from models.flops import transformer_flops, vae_decode_flops

    pipe = ctx.compiled_pipe or make_pipe(ctx.transformer, ctx.vae)
    batch, size, device = ctx.plan.compile_batch, ctx.spec.size, ctx.plan.device
    embeds, mask = random_prompts(batch, ctx.spec.t5_d_model, device, ctx.dtype)
    cuda = device.startswith("cuda")
    marks: list[Any] = []

    def mark() -> Any:
        if cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000 if cuda else float(b - a)

    def on_step(step: int, timestep: Any, latents: Any) -> None:
        marks.append(mark())

    generators = [torch.Generator(device="cpu").manual_seed(seed) for seed in range(batch)]
    out: dict[str, Any] = {"batch": batch, "config": "compiled" if ctx.compiled_pipe is not None else "eager"}
    try:
        with torch.inference_mode():
            sync(device)
            begin = mark()
            pipe(
                prompt=None,
                negative_prompt=None,
                prompt_embeds=embeds,
                prompt_attention_mask=mask,
                num_inference_steps=STEPS,
                guidance_scale=0.0,
                height=size,
                width=size,
                generator=generators,
                use_resolution_binning=ctx.spec.resolution_binning,
                output_type="pt",
                callback=on_step,
                callback_steps=1,
            )
            end = mark()
            sync(device)
        parts = (
            (
                "transformer_4_steps",
                seconds(begin, marks[-1]),
                STEPS * transformer_flops(pipe.transformer.config, size, size),
            ),
            ("vae_decode", seconds(marks[-1], end), vae_decode_flops(pipe.vae.config, size, size)),
        )
        for name, spent, flops in parts:
            out[name] = {
                "s_per_image": spent / batch,
                "tflops_per_image": flops / 1e12,
                "mfu_measured_peak": flops * batch / spent / ctx.rates.peak_measured,
            }
    except Exception as exc:
        out.update(failure("breakdown", batch, exc))
    print(f"[breakdown] {json.dumps(out, default=str)[:400]}", flush=True)
    return out


def run_quant(ctx: Context) -> list[dict[str, Any]]:
    """int8-dynamic and fp8-dynamic, eager, on a fresh transformer (the linears are replaced in place)."""
    from models.fastpath import FastPathUnavailable, apply_fast_path, check_supported, parse_fast_path

    rows = []
    batch = ctx.plan.compile_batch
    for kind in ("int8", "fp8"):
        label = f"+{kind}_dynamic (eager)"
        fast = parse_fast_path(f"none,sdpa,fuse-qkv,channels-last,{kind}-dynamic", device=ctx.plan.device)
        try:
            check_supported(fast, ctx.plan.device)
        except FastPathUnavailable as exc:
            rows.append({"config": label, "batch": batch, "status": "unavailable", "error": str(exc)})
            print(f"[{label}] unavailable: {exc}", flush=True)
            continue
        if not ctx.budget.allows(label, ctx.estimate_s("+channels_last", batch) + 10):
            continue
        try:
            transformer, _unused = build_models(ctx.spec, ctx.plan.device, ctx.dtype, seed=0)
            del _unused
            pipe = make_pipe(transformer, ctx.vae)
            done = apply_fast_path(pipe, fast)
            print(f"[{label}] {'; '.join(done)}", flush=True)
            embeds, mask = random_prompts(batch, ctx.spec.t5_d_model, ctx.plan.device, ctx.dtype)
            call = render_call(pipe, embeds, mask, ctx.spec.size, ctx.spec.resolution_binning)
            warm, times = timed(call, ctx.plan.device, 1, ctx.plan.reps.get(batch, 1))
            row = ctx.rates.row(label, batch, times, warm)
        except Exception as exc:
            row = failure(label, batch, exc)
        rows.append(row)
        print(f"[{label}] {short(row)}", flush=True)
        pipe = transformer = None
        ctx.free()
    return rows


def run_memory(ctx: Context) -> dict[str, Any]:
    """T5-XXL's size resident beside the transformer and VAE: encode a batch of prompts and render it."""
    import torch

    batch, spec, device = ctx.plan.compile_batch, ctx.spec, ctx.plan.device
    cuda = device.startswith("cuda")
    try:
        ctx.free()
        encoder = build_t5(
            device,
            ctx.dtype,
            vocab=spec.t5_vocab,
            d_model=spec.t5_d_model,
            layers=spec.t5_layers,
            heads=spec.t5_heads,
            d_ff=spec.t5_d_ff,
        )
        if cuda:  # from here: T5, transformer and VAE resident, then the encode and the render
            torch.cuda.reset_peak_memory_stats()
        transformer = ctx.compiled_pipe.transformer if ctx.compiled_pipe is not None else ctx.transformer
        pipe = make_pipe(transformer, ctx.vae, text_encoder=encoder)
        prompts = [f"a photograph of a lighthouse number {i} at dusk, detailed" for i in range(batch)]
        started = time.perf_counter()
        with torch.inference_mode():
            images = pipe(
                prompt=prompts,
                num_inference_steps=STEPS,
                guidance_scale=0.0,
                height=spec.size,
                width=spec.size,
                use_resolution_binning=spec.resolution_binning,
                clean_caption=False,
                max_sequence_length=TEXT_TOKENS,
                output_type="pt",
            ).images
        sync(device)
        out: dict[str, Any] = {
            "status": "ok",
            "batch": batch,
            "t5_parameters": sum(p.numel() for p in encoder.parameters()),
            "s_per_call": time.perf_counter() - started,
            "images_shape": list(images.shape),
        }
        if cuda:
            out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated())
            out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved())
        del encoder, pipe, images
    except Exception as exc:
        out = failure("memory", batch, exc)
    ctx.free()
    print(f"[memory] {json.dumps(out, default=str)[:300]}", flush=True)
    return out


def write_model_folder(ctx: Context, folder: Path) -> None:
    """The e2e model: these weights (before any fast path) with a stub T5 and the tiny tokenizer, saved."""
    from models.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    stub = build_stub_t5(ctx.spec.t5_d_model, len(tokenizer), ctx.plan.device, ctx.dtype)
    pipe = make_pipe(ctx.transformer, ctx.vae, text_encoder=stub)
    pipe.save_pretrained(folder, safe_serialization=True)


def submit(
    engine: Any, settings: Any, folder: Path, name: str, model: Path, items: list[tuple[str, int]], size: int
) -> int:
    """What `farm submit --dispatch` does: read, validate, record, and publish a window at once."""
    from farm.submit.plan import SubmitOptions, plan_submission
    from farm.submit.run import submit_plan

    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "seed": s}) + "\n" for p, s in items))
    options = SubmitOptions(
        dataset=name, model=str(model), width=size, height=size, num_inference_steps=STEPS, guidance_scale=0.0
    )
    result = submit_plan(settings, plan_submission(path, options), engine=engine, dispatch=True)
    if result.dataset_id is None:
        raise RuntimeError(f"submit of {name} recorded no dataset")
    return int(result.dataset_id)


class EndToEnd:
    """The farm end to end on the embedded default (SQLite store and broker, file storage), one real worker. The
    worker process starts first (start(): its imports overlap the other parts; it loads no model before a job) and
    renders when measure() submits."""

    def __init__(self, ctx: Context, model_dir: Path, fast_path: str) -> None:
        from benchmarks.render import _worker_env
        from farm.settings import load_settings
        from farm.store.engine import open_store

        self.ctx, self.model_dir, self.fast_path = ctx, model_dir, fast_path
        self.home = Path(tempfile.mkdtemp(prefix="farm-gpu-bench-"))
        self.settings = load_settings(
            {},
            home=str(self.home),
            device=ctx.plan.device,
            dtype=ctx.plan.dtype,
            queue=f"bench-{uuid.uuid4().hex[:8]}",
            batch_size=ctx.plan.e2e_batch,
            fast_path=fast_path,
            compile_cache=str(ctx.compile_cache),
        )
        self.engine = open_store(self.settings)  # the schema, before the worker opens it too
        self.env = _worker_env(self.settings)
        self.env.update(
            FARM_FAST_PATH=fast_path,
            FARM_COMPILE_CACHE=str(ctx.compile_cache),
            FARM_PEAK_TFLOPS=f"{ctx.rates.peak_measured / 1e12:.6g}",
        )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = int(probe.getsockname()[1])
        self.log_path = self.home / "worker.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> None:
        command = [sys.executable, "-m", "farm", "worker", "--max-batch", str(self.ctx.plan.e2e_batch)]
        command += ["--io-threads", "8", "--metrics-port", str(self.port), "--loglevel", "INFO"]
        with self.log_path.open("w") as log_file:
            self.proc = subprocess.Popen(
                command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT
            )
        self.started_at = time.perf_counter()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def measure(self) -> dict[str, Any]:
        try:
            return self._measure()
        finally:
            self.stop()

    def _measure(self) -> dict[str, Any]:
        from sqlalchemy import select

        from benchmarks.render import _wait, bench_prompts
        from farm.store.schema import Job, JobStatus
        from models.flops import render_flops

        ctx, plan, engine, settings, home, model_dir = (
            self.ctx,
            self.ctx.plan,
            self.engine,
            self.settings,
            self.home,
            self.model_dir,
        )
        if self.proc is None:
            self.start()
        assert self.proc is not None
        proc = self.proc
        configs = [json.loads((model_dir / part / "config.json").read_text()) for part in ("transformer", "vae")]
        size = int(configs[0]["sample_size"]) * 8  # the model's own size (1024 for the full run)
        flops = render_flops(configs[0], configs[1], size, size, STEPS)
        out: dict[str, Any] = {"images": plan.e2e_images, "batch": plan.e2e_batch, "fast_path": self.fast_path}
        started = time.perf_counter()
        warmup = [(f"warm-up {i}", i) for i in range(plan.e2e_batch)]
        warm = submit(engine, settings, home, "warmup", model_dir, warmup, size)
        _wait(engine, warm, timeout_s=max(ctx.budget.left(), 60), procs=[proc])
        out["worker_process_age_at_submit_s"] = started - self.started_at
        out["first_batch_s"] = time.perf_counter() - started  # loading the model, compiling or loading it
        items = bench_prompts(plan.e2e_images)
        started = time.perf_counter()
        dataset = submit(engine, settings, home, "bench", model_dir, items, size)
        _wait(engine, dataset, timeout_s=max(ctx.budget.left(), 60), procs=[proc])
        seconds = time.perf_counter() - started
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=10) as response:
            metrics = response.read().decode("utf-8")
        self.stop()
        log_path = self.log_path
        with engine.connect() as conn:
            rows = conn.execute(select(Job.status, Job.finished_at).where(Job.dataset_id == dataset)).all()
        finished = sorted(r.finished_at for r in rows if r.finished_at is not None)
        succeeded = sum(1 for r in rows if r.status in (JobStatus.SUCCEEDED, JobStatus.SUCCEEDED.value))
        out.update(
            {
                "status": "ok" if succeeded == plan.e2e_images else "incomplete",
                "succeeded": succeeded,
                "seconds": seconds,
                "images_per_s": plan.e2e_images / seconds,
                "tflops_per_image": flops / 1e12,
                "mfu_measured_peak": plan.e2e_images / seconds * flops / ctx.rates.peak_measured,
                "worker_metrics": {
                    line.split()[0]: float(line.split()[1])
                    for line in metrics.splitlines()
                    if line.startswith(("render_images_per_second", "render_mfu", "images_rendered_total"))
                },
                "storage": settings.storage_url,
            }
        )
        if len(finished) > plan.e2e_batch:
            # Steady state: from the end of the first batch to the end of the last.
            span = (finished[-1] - finished[plan.e2e_batch - 1]).total_seconds()
            out["steady_images_per_s"] = (len(finished) - plan.e2e_batch) / span if span > 0 else None
        out["worker_log_tail"] = log_path.read_text(errors="replace").splitlines()[-15:]
        print(f"[e2e] {json.dumps({k: v for k, v in out.items() if k != 'worker_log_tail'}, default=str)}", flush=True)
        return out


# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Context:
    plan: Plan
    spec: Any
    dtype: Any
    transformer: Any
    vae: Any
    rates: Rates
    budget: Budget
    compile_cache: Path
    compiled_pipe: Any = None
    observed: dict[str, float] = field(default_factory=dict)
    reserve_s: float = 0.0  # what the sweep leaves for compile and the end-to-end run

    def estimate_s(self, label: str, batch: int) -> float:
        """Seconds a (config, batch) cell will take: calls × batch × the last s/image seen (0.3 s before any)."""
        per_image = self.observed.get(label) or max(self.observed.values(), default=0.3)
        calls = self.plan.warmup + self.plan.reps.get(batch, 1)
        return calls * batch * per_image * 1.2 + 1.0

    def free(self) -> None:
        import gc

        import torch

        gc.collect()
        if self.plan.device.startswith("cuda"):
            torch.cuda.empty_cache()


def count_files(folder: Path) -> int:
    return sum(len(files) for _root, _dirs, files in os.walk(folder)) if folder.exists() else 0


def short(row: dict[str, Any]) -> str:
    if row.get("status") != "ok":
        return f"{row.get('status')}: {str(row.get('error', ''))[:160]}"
    return (
        f"b{row['batch']}: {row['s_per_image']:.4f} s/image, {row['images_per_s']:.2f} images/s, "
        f"MFU {100 * row['mfu_measured_peak']:.1f} % of measured peak"
    )


def print_table(report: dict[str, Any]) -> None:
    header = ("config", "batch", "s/image", "images/s", "TFLOP/s", "MFU meas.", "MFU sheet", "status")
    lines = [header]
    for row in report["rows"]:
        ok = row.get("status") == "ok"
        sheet = row.get("mfu_datasheet_peak")
        lines.append(
            (
                row["config"],
                str(row["batch"]),
                f"{row['s_per_image']:.4f}" if ok else "-",
                f"{row['images_per_s']:.2f}" if ok else "-",
                f"{row['tflops_achieved']:.3g}" if ok else "-",
                f"{100 * row['mfu_measured_peak']:.1f} %" if ok else "-",
                f"{100 * sheet:.1f} %" if ok and sheet else "-",
                row.get("status", "?"),
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    peak = report["peak"]
    print()
    print(
        f"{report['plan']['name']} on {report['device_name']}, {report['size']}px, {STEPS} LCM steps, "
        f"{report['plan']['dtype']}; {report['tflops_per_image']:.3g} TFLOPs/image (from the config); "
        f"measured peak {peak['tflops']:.3g} TFLOP/s"
        + (f", data sheet {report['datasheet_tflops']:.0f}" if report.get("datasheet_tflops") else "")
    )
    for index, line in enumerate(lines):
        print("  ".join(cell.ljust(widths[j]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(line)))
        if index == 0:
            print("  ".join("-" * w for w in widths))
    print()
    for line in report["summary"]:
        print(line)


def summarise(report: dict[str, Any], tiny: bool) -> list[str]:
    lines = []
    ok = [r for r in report["rows"] if r.get("status") == "ok"]
    if ok:
        best = max(ok, key=lambda r: r["images_per_s"])
        lines.append(
            f"best in-process: {best['config']} b{best['batch']}: {best['images_per_s']:.2f} images/s, "
            f"MFU {100 * best['mfu_measured_peak']:.1f} % of the measured bf16 peak"
        )
    e2e = report.get("e2e") or {}
    if e2e.get("images_per_s"):
        met = e2e["images_per_s"] >= TARGET_IMAGES_PER_S
        verdict = "n/a (tiny CPU smoke run)" if tiny else ("MET" if met else "NOT MET")
        lines.append(
            f"end to end (farm, {e2e['images']} images, {e2e['fast_path']}): {e2e['images_per_s']:.2f} images/s "
            f"(steady {e2e.get('steady_images_per_s') or float('nan'):.2f}), "
            f"MFU {100 * e2e['mfu_measured_peak']:.1f} % "
            f"→ stretch goal ≥ {TARGET_IMAGES_PER_S} images/s: {verdict}"
        )
        if e2e.get("worker_metrics"):
            lines.append(f"  the worker's own metrics: {e2e['worker_metrics']}")
    parts = report.get("breakdown") or {}
    if isinstance(parts.get("transformer_4_steps"), dict) and "s_per_image" in parts["transformer_4_steps"]:
        t, v = parts["transformer_4_steps"], parts.get("vae_decode", {})
        if "s_per_image" in v:
            total = t["s_per_image"] + v["s_per_image"]
            lines.append(
                f"where the time goes (b{parts['batch']}, {parts['config']}): "
                f"transformer {t['s_per_image']:.4f} s/image "
                f"({100 * t['s_per_image'] / total:.0f} %, MFU {100 * t['mfu_measured_peak']:.1f} %), VAE decode "
                f"{v['s_per_image']:.4f} s/image ({100 * v['s_per_image'] / total:.0f} %, MFU "
                f"{100 * v['mfu_measured_peak']:.1f} %)"
            )
    if report["skipped"]:
        lines.append("skipped for the time budget: " + "; ".join(report["skipped"]))
    return lines


def environment(device: str) -> dict[str, Any]:
    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cpu_count": os.cpu_count(),
    }
    for name in ("diffusers", "transformers", "celery", "sqlalchemy"):
        try:
            env[name] = __import__(name).__version__
        except Exception as exc:
            env[name] = f"unavailable: {exc}"
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        env["gpu_name"] = torch.cuda.get_device_name(0)
        env["gpu_total_memory_bytes"] = int(props.total_memory)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
    return env


def fetch_wheels(folder: Path) -> int:
    """Download TRAVEL and COMPILED (one per supported Python) at this environment's versions into `folder`, with a
    requirements.txt of their names; `pip install --no-index --no-deps --find-links DIR -r DIR/requirements.txt`
    then installs what a machine lacks and leaves what it has."""
    import importlib.metadata as metadata

    folder.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
    pinned = [f"{name}=={metadata.version(name)}" for name in TRAVEL]
    subprocess.run([*pip, "--implementation", "py", "--abi", "none", "--platform", "any", *pinned], check=True)
    for python in PYTHONS:
        subprocess.run(
            [
                *pip,
                "--python-version",
                python,
                "--platform",
                "manylinux_2_28_x86_64",
                "--platform",
                "manylinux2014_x86_64",
                "--platform",
                "manylinux_2_17_x86_64",
                *[f"{name}=={metadata.version(name)}" for name in COMPILED],
            ],
            check=True,
        )
    (folder / "requirements.txt").write_text("\n".join([*TRAVEL, *COMPILED]) + "\n")
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"{len(list(folder.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {folder}")
    return 0 if size < 64 * 2**20 else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    parser.add_argument("--tiny", action="store_true", help="tiny widths on the CPU: a smoke run of every part")
    parser.add_argument("--budget-s", type=float, help=f"wall-clock budget (default {DEFAULT_BUDGET_S:.0f} s)")
    parser.add_argument("--compile-mode", default="default", choices=("default", "max-autotune"))
    parser.add_argument("--compile-backend", help="torch.compile backend (default inductor; eager on --tiny)")
    parser.add_argument(
        "--compile-cache",
        type=Path,
        help="torch.compile's persistent cache (default: FARM_COMPILE_CACHE, else ~/.cache/farm/compile-cache)",
    )
    parser.add_argument("--e2e-images", type=int, help="jobs in the end-to-end run (default 256; 4 on --tiny)")
    parser.add_argument("--skip", default="", help="comma-separated parts to leave out: sweep,e2e,memory,quant")
    parser.add_argument("--fetch-wheels", type=Path, metavar="DIR", help="download the travelling wheels and exit")
    args = parser.parse_args(argv)
    started_at = time.perf_counter()  # the budget counts from here, imports included
    if args.fetch_wheels:
        return fetch_wheels(args.fetch_wheels)

    import torch

    from benchmarks.gpu import DRY, FULL
    from models.flops import peak_bf16_flops, render_flops

    warnings_off()
    if args.tiny:
        torch.set_flush_denormal(True)  # random weights make denormals, which are slow on a CPU, not on a GPU
    if args.tiny:
        plan, spec = TINY_PLAN, replace(DRY, head_dim=24, image_size=64, batch_sizes=TINY_PLAN.batches)
    else:
        if not torch.cuda.is_available():
            print("No CUDA device: this benchmark needs a GPU. Use --tiny to check the script here.")
            return 2
        plan, spec = FULL_PLAN, replace(FULL, batch_sizes=FULL_PLAN.batches)
    if args.compile_backend:
        plan = replace(plan, compile_backend=args.compile_backend)
    if args.e2e_images:
        plan = replace(plan, e2e_images=args.e2e_images)
    skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    budget = Budget(args.budget_s or (55.0 if args.tiny else DEFAULT_BUDGET_S), started_at)
    dtype = getattr(torch, plan.dtype)
    cache = args.compile_cache or Path(
        os.environ.get("FARM_COMPILE_CACHE") or Path.home() / ".cache" / "farm" / "compile-cache"
    )
    env = environment(plan.device)
    print(f"device: {env.get('gpu_name', 'cpu')}, torch {env['torch']}, diffusers {env['diffusers']}", flush=True)

    peak_dtype = torch.bfloat16 if plan.device.startswith("cuda") else torch.float32
    peak = measure_peak(plan.device, peak_dtype, plan.peak_sizes)
    datasheet = peak_bf16_flops(env["gpu_name"]) if "gpu_name" in env else None
    print(f"[peak] {peak['tflops']:.1f} TFLOP/s measured ({peak_dtype}); data sheet {datasheet}", flush=True)

    started = time.perf_counter()
    transformer, vae = build_models(spec, plan.device, dtype)
    sync(plan.device)
    build_s = time.perf_counter() - started
    flops = render_flops(transformer.config, vae.config, spec.size, spec.size, STEPS)
    print(f"[build] {build_s:.1f} s; {flops / 1e12:.2f} TFLOPs per image", flush=True)
    rates = Rates(flops, peak["flops"], datasheet)
    ctx = Context(plan, spec, dtype, transformer, vae, rates, budget, cache)
    ctx.reserve_s = 0.0 if args.tiny else 240.0

    tmp = Path(tempfile.mkdtemp(prefix="gpu-bench-model-"))
    model_dir = tmp / "pixart-random"
    report: dict[str, Any] = {
        "benchmark": "benchmarks/gpu_bench.py",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "plan": asdict(plan),
        "device_name": env.get("gpu_name", "cpu"),
        "environment": env,
        "size": spec.size,
        "steps": STEPS,
        "parameters": {
            "transformer": sum(p.numel() for p in transformer.parameters()),
            "vae": sum(p.numel() for p in vae.parameters()),
        },
        "build_s": build_s,
        "tflops_per_image": flops / 1e12,
        "peak": peak,
        "datasheet_tflops": datasheet / 1e12 if datasheet else None,
        "rows": [],
    }
    e2e: EndToEnd | None = None
    try:
        if "e2e" not in skip:
            if args.tiny:
                # Random weights of any scale run into denormals on a CPU (a GPU flushes them): the worker's CPU smoke
                # run renders the farm's own tiny model instead, which its tests render in milliseconds.
                from models.tiny import make_tiny

                make_tiny(model_dir, seed=0)
            else:
                write_model_folder(ctx, model_dir)  # before any fast path touches the weights
            # The worker compiles with Inductor (the CPU smoke run leaves compile out: minutes on a CPU); it starts
            # now so that its imports overlap the other parts, and loads nothing before its first job.
            worker_fast_path = "default" if args.tiny else f"compile={args.compile_mode}"
            e2e = EndToEnd(ctx, model_dir, worker_fast_path.replace("compile=default", "compile"))
            e2e.start()
        if "sweep" not in skip:
            report["rows"] += run_sweep(ctx)
        if budget.allows("compile", 15.0 if args.tiny else 150.0 + 90.0):  # and room for the end to end after it
            row = run_compile(ctx, args.compile_mode)
            report["rows"].append(row)
            report["compile"] = {k: v for k, v in row.items() if k.startswith(("compile", "cache", "warmup"))}
        report["breakdown"] = run_breakdown(ctx) if budget.allows("breakdown", 10.0) else None
        e2e_estimate = (15.0 if args.tiny else 50.0) + plan.e2e_images * min(ctx.observed.values(), default=0.3) * 1.5
        if e2e is not None and budget.allows("e2e", e2e_estimate):
            try:
                report["e2e"] = e2e.measure()
            except Exception as exc:
                report["e2e"] = failure("e2e", plan.e2e_batch, exc)
        if "memory" not in skip and budget.allows("memory", 20.0):
            report["memory"] = run_memory(ctx)
        if "quant" not in skip:
            report["quant"] = run_quant(ctx)
            report["rows"] += [r for r in report["quant"] if r.get("status") != "unavailable"]
    finally:
        if e2e is not None:
            e2e.stop()
            if args.out and e2e.log_path.is_file():  # the worker's log beside the JSON; its images go
                args.out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(e2e.log_path, args.out.with_name(args.out.stem + "_worker.log"))
            shutil.rmtree(e2e.home, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    report["skipped"] = budget.skipped
    report["elapsed_s"] = time.perf_counter() - budget.started
    report["summary"] = summarise(report, args.tiny)
    print_table(report)
    print(f"\nelapsed {report['elapsed_s']:.1f} s (budget {budget.seconds:.0f} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    crashed = [r for r in report["rows"] if r.get("status") == "error"]
    if (report.get("e2e") or {}).get("status") in ("error", "incomplete"):
        crashed.append(report["e2e"])
    return 1 if crashed else 0


def warnings_off() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*invalid value encountered in cast.*")
    with contextlib.suppress(Exception):
        import diffusers
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


if __name__ == "__main__":
    raise SystemExit(main())

"""The GPU fast path: options applied once to a loaded pipeline (`farm worker --fast-path`, README "Fast path").

Options (tolerances against eager: README "Fast path", checked by tests/test_fastpath.py):

- sdpa: attention through torch's scaled_dot_product_attention (diffusers' AttnProcessor2_0), transformer and VAE.
  Identical to eager: it is diffusers' own default. Off, the plain math attention (AttnProcessor).
- fuse-qkv: one q·k·v product per self-attention, one k·v per cross-attention (fuse_qkv_projections). Rounding.
- channels-last: the VAE in channels-last memory format (faster convolutions on tensor cores). Rounding.
- compile[=MODE]: torch.compile of the transformer and of the VAE decoder, MODE default or max-autotune, with a
  persistent cache (on the models volume) so a machine pays the warm-up once. Rounding.
- int8-dynamic / fp8-dynamic: the transformer blocks' linear layers in int8 / FP8 with per-token dynamic scales
  (models/dynamic_quant.py); int8 on CUDA ≥ 8.0 or a CPU, FP8 on CUDA ≥ 8.9. Quantization error.

Safe defaults (`default`): on CUDA sdpa, fuse-qkv and channels-last; on a CPU sdpa only, so a CPU worker's pixels stay
those of bare diffusers bit for bit (fuse-qkv and channels-last may change the rounding, and buy little there). In
low-memory mode fuse-qkv is left out of the defaults: diffusers keeps the separate projections beside the fused
ones (+≈ 0.37 GB at PixArt-XL-2's size in fp16). compile and dynamic quantization are never defaults.

Batched VAE decode needs no option: PixArtAlphaPipeline decodes a whole batch in one vae.decode call (render_batch
renders a batch in one pipeline call); only low-memory mode slices it, on purpose (workers/caches.py).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

COMPILE_MODES = ("default", "max-autotune")
DYNAMIC_QUANT = ("int8", "fp8")
# Minimum CUDA compute capability of each dynamic quantization: int8 tensor cores (Ampere), FP8 (Ada, Hopper).
_MIN_CAPABILITY = {"int8": (8, 0), "fp8": (8, 9)}
_ITEMS = ("sdpa", "fuse-qkv", "channels-last", "compile[=default|max-autotune]", "int8-dynamic", "fp8-dynamic")


class FastPathUnavailable(RuntimeError):
    """An option this machine cannot run (no FP8 tensor cores, no compiler for torch.compile, ...)."""


@dataclass(frozen=True)
class FastPath:
    """Which fast-path options a pipeline gets. All off is plain eager diffusers with the math attention."""

    sdpa: bool = True
    fuse_qkv: bool = False
    channels_last_vae: bool = False
    compile: str | None = None  # "default" or "max-autotune"; None: eager
    compile_cache: Path | None = None  # where torch.compile keeps compiled code; None: torch's own (a temp dir)
    dynamic_quant: str | None = None  # "int8" or "fp8"

    def __post_init__(self) -> None:
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {self.compile!r}: expected one of {', '.join(COMPILE_MODES)}")
        if self.dynamic_quant is not None and self.dynamic_quant not in DYNAMIC_QUANT:
            raise ValueError(
                f"unknown dynamic quantization {self.dynamic_quant!r}: expected one of {', '.join(DYNAMIC_QUANT)}"
            )
        if self.fuse_qkv and not self.sdpa:
            raise ValueError("fuse-qkv runs through SDPA (diffusers' FusedAttnProcessor2_0): it needs sdpa")

    def describe(self) -> str:
        """The options as `--fast-path` spells them ("none" when all are off)."""
        items = [
            name
            for name, on in (
                ("sdpa", self.sdpa),
                ("fuse-qkv", self.fuse_qkv),
                ("channels-last", self.channels_last_vae),
            )
            if on
        ]
        if self.compile:
            items.append("compile" if self.compile == "default" else f"compile={self.compile}")
        if self.dynamic_quant:
            items.append(f"{self.dynamic_quant}-dynamic")
        return ",".join(items) or "none"


def default_fast_path(device: str = "cpu", *, low_memory: bool = False) -> FastPath:
    """The safe defaults for a device: what is identical or within rounding of eager, and costs nothing to set up."""
    if not device.startswith("cuda"):
        return FastPath(sdpa=True)
    return FastPath(sdpa=True, fuse_qkv=not low_memory, channels_last_vae=True)


def parse_fast_path(
    text: str | None, *, device: str = "cpu", low_memory: bool = False, compile_cache: Path | None = None
) -> FastPath:
    """Parse `--fast-path` / FARM_FAST_PATH: comma-separated items applied in order to the device's safe defaults.

    Items: `default` (the defaults again), `none` (everything off), `sdpa`, `fuse-qkv`, `channels-last`, `compile`,
    `compile=default`, `compile=max-autotune`, `int8-dynamic`, `fp8-dynamic`, and `no-ITEM` to turn one off
    (`no-compile`, `no-dynamic` for the quantization). "" means `default`. Raises ValueError on anything else.
    """
    fast = default_fast_path(device, low_memory=low_memory)
    for raw in (text or "default").split(","):
        item = raw.strip().lower().replace("_", "-")
        if not item:
            continue
        off = item.startswith("no-")
        name, _, value = item.removeprefix("no-").partition("=")
        changes: dict[str, Any]
        if name == "default" and not off and not value:
            fast = default_fast_path(device, low_memory=low_memory)
            continue
        if name == "none" and not off and not value:
            fast = FastPath(sdpa=False)
            continue
        if name == "sdpa" and not value:
            # Off, the fused projections go too (they run through SDPA).
            changes = {"sdpa": False, "fuse_qkv": False} if off else {"sdpa": True}
        elif name in ("fuse-qkv", "fused-qkv") and not value:
            changes = {"fuse_qkv": not off, **({} if off else {"sdpa": True})}
        elif name in ("channels-last", "channels-last-vae") and not value:
            changes = {"channels_last_vae": not off}
        elif name == "compile" and not (off and value):
            mode = value or "default"
            if mode not in COMPILE_MODES:
                raise ValueError(f"fast path: unknown compile mode {value!r} (expected {', '.join(COMPILE_MODES)})")
            changes = {"compile": None if off else mode}
        elif name in ("int8-dynamic", "fp8-dynamic") and not value:
            kind = name.split("-")[0]
            keep = None if fast.dynamic_quant == kind else fast.dynamic_quant
            changes = {"dynamic_quant": keep if off else kind}
        elif name == "dynamic" and off and not value:
            changes = {"dynamic_quant": None}
        else:
            raise ValueError(f"fast path: unknown item {raw.strip()!r}; expected default, none, {', '.join(_ITEMS)}")
        fast = replace(fast, **changes)
    return replace(fast, compile_cache=compile_cache if fast.compile else None)


def check_supported(fast: FastPath, device: str) -> None:
    """Raise FastPathUnavailable, saying why, for an option this machine cannot run on `device`."""
    import torch

    cuda = device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise FastPathUnavailable(f"fast path on {device}: no CUDA device is available")
    if fast.dynamic_quant is not None:
        need = _MIN_CAPABILITY[fast.dynamic_quant]
        if cuda:
            index = torch.device(device).index
            have = torch.cuda.get_device_capability(index if index is not None else 0)
            if have < need:
                raise FastPathUnavailable(
                    f"{fast.dynamic_quant}-dynamic needs a CUDA GPU of compute capability {need[0]}.{need[1]} or newer "
                    f"({'Ampere' if fast.dynamic_quant == 'int8' else 'Ada or Hopper'}); "
                    f"{torch.cuda.get_device_name(index)} is {have[0]}.{have[1]}"
                )
        elif fast.dynamic_quant == "fp8":
            raise FastPathUnavailable(
                "fp8-dynamic needs a CUDA GPU with FP8 tensor cores (compute capability 8.9 or newer); "
                f"this is {device}"
            )
    if fast.compile is not None:
        if cuda:
            from torch.utils._triton import has_triton

            if not has_triton():
                raise FastPathUnavailable("compile on CUDA needs Triton, which this torch cannot import")
        elif not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")):
            raise FastPathUnavailable("compile on a CPU needs a C++ compiler (g++ or clang++) on PATH")


def use_compile_cache(directory: Path) -> Path:
    """Point torch.compile's caches at `directory` (created), before anything is compiled: Inductor's cache dir
    (FX graphs, Triton kernels, autotuning results) with the FX-graph and AOT-autograd caches on, so another process
    on this machine loads compiled code instead of compiling again."""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    directory = Path(directory).expanduser().absolute()
    directory.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
    inductor_config.fx_graph_cache = True
    functorch_config.enable_autograd_cache = True
    return directory


def _is_8bit(module: Any) -> bool:
    return bool(getattr(module, "is_loaded_in_8bit", False) or getattr(module, "hf_quantizer", None))


def apply_fast_path(pipe: Any, fast: FastPath, *, compile_backend: str = "inductor") -> list[str]:
    """Apply `fast` to a loaded PixArtAlphaPipeline in place, once; returns what was done, in order.

    compile_backend: torch.compile's backend ("inductor"; "eager" only traces, for a quick check of the code path).
    A transformer loaded 8-bit through bitsandbytes keeps its own layers (no fusing, no dynamic quantization).
    """
    import torch
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    applied_before = getattr(pipe, "farm_fast_path", None)
    if applied_before is not None:
        if applied_before != fast:
            raise ValueError(f"fast path {applied_before.describe()} is already applied to this pipeline")
        return []
    check_supported(fast, str(pipe.device))
    done: list[str] = []
    transformer, vae = pipe.transformer, pipe.vae
    eight_bit = _is_8bit(transformer)

    processor = AttnProcessor2_0 if fast.sdpa else AttnProcessor
    for name, part in (("transformer", transformer), ("vae", vae)):
        if part is not None and hasattr(part, "set_attn_processor"):
            part.set_attn_processor(processor())
            done.append(f"{name} attention: {processor.__name__}")
    if fast.fuse_qkv:
        if eight_bit or not hasattr(transformer, "fuse_qkv_projections"):
            done.append("fuse-qkv skipped: " + ("8-bit transformer" if eight_bit else type(transformer).__name__))
        else:
            transformer.fuse_qkv_projections()
            done.append("fuse-qkv")
    if fast.dynamic_quant is not None:
        if eight_bit:
            done.append(f"{fast.dynamic_quant}-dynamic skipped: 8-bit transformer")
        else:
            from models.dynamic_quant import quantize_linears

            count = quantize_linears(transformer.transformer_blocks, fast.dynamic_quant)
            done.append(f"{fast.dynamic_quant}-dynamic: {count} linear layers")
    if fast.channels_last_vae and vae is not None:
        vae.to(memory_format=torch.channels_last)
        done.append("channels-last vae")
    if fast.compile is not None:
        if fast.compile_cache is not None and compile_backend == "inductor":
            done.append(f"compile cache: {use_compile_cache(fast.compile_cache)}")
        # Module.compile keeps each module's class and attributes (the ControlNet wrapper reaches into the
        # transformer's blocks, which then run eager), and compiles its forward on first call.
        options: dict[str, Any] = {"backend": compile_backend}
        if compile_backend == "inductor":
            options["mode"] = fast.compile
        transformer.compile(**options)
        if vae is not None:
            vae.decoder.compile(**options)
        done.append(f"compile ({fast.compile}, {compile_backend}): transformer, vae decoder")
    pipe.farm_fast_path = fast
    return done

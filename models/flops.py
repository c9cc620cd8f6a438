"""FLOPs of one PixArt render, counted from the model's configuration, and the bf16 peak of known devices.

The count is of matrix work only (linear layers, convolutions, attention's two matrix products), as
torch.utils.flop_counter.FlopCounterMode counts it (tests/test_fastpath.py checks the two agree): 2 FLOPs per
multiply-add, biases, norms and activations left out. For PixArt-δ at 1024×1024, 4 LCM steps and the SD VAE decode,
that is ≈ 36 TFLOPs an image (≈ 6.6 per transformer step, ≈ 9.7 for the decode).

MFU (model FLOPs utilisation) is achieved FLOP/s ÷ the device's dense bf16 tensor-core peak: the vendor's figure
from PEAK_BF16_TFLOPS by torch.cuda.get_device_name, or FARM_PEAK_TFLOPS (the only way on a CPU, or to use a
measured peak such as benchmarks/gpu_bench.py's matmul figure).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# PixArt pads every prompt to 120 T5 tokens; cross-attention runs over all of them (masked).
TEXT_TOKENS = 120

# Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s, from the vendors' data sheets. Matched by substring of
# torch.cuda.get_device_name(), first match wins (so the more specific names come first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("GB200", 2500.0),
    ("B200", 2250.0),
    ("B100", 1750.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("H800", 989.0),
    ("H20", 148.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.0),
    ("RTX 5090", 209.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
    ("A6000", 155.0),
)


def _get(config: Any, key: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(key, default)
    return getattr(config, key, default)


def transformer_flops(config: Any, width: int, height: int, *, batch: int = 1, text_tokens: int = TEXT_TOKENS) -> float:
    """FLOPs of one PixArtTransformer2DModel forward over `batch` latents of a width×height image (VAE factor 8)."""
    heads, head_dim = int(_get(config, "num_attention_heads")), int(_get(config, "attention_head_dim"))
    d = heads * head_dim
    p = int(_get(config, "patch_size", 2))
    c_in = int(_get(config, "in_channels", 4))
    c_out = int(_get(config, "out_channels") or c_in)
    layers = int(_get(config, "num_layers"))
    cross = int(_get(config, "cross_attention_dim") or d)
    caption = _get(config, "caption_channels")
    n = (height // 8 // p) * (width // 8 // p)  # image tokens
    t = text_tokens
    flops = 2.0 * n * d * c_in * p * p  # patch embedding (a p×p convolution, stride p)
    flops += 2.0 * (256 * d + d * d) + 2.0 * d * 6 * d  # timestep embedding and the adaLN-single projection
    if _get(config, "sample_size") == 128 and _get(config, "use_additional_conditions") is not False:
        third = d // 3  # resolution (two values) and aspect-ratio micro-conditions of the 1024 models
        flops += 3 * 2.0 * (256 * third + third * third)
    if caption:
        flops += 2.0 * t * (int(caption) * d + d * d)  # caption projection (two linears)
    block = 2.0 * n * d * d * 4 + 4.0 * n * n * d  # self-attention: q, k, v, out; QKᵀ and AV
    block += 2.0 * n * d * d * 2 + 2.0 * t * cross * d * 2 + 4.0 * n * t * d  # cross-attention
    block += 2.0 * n * d * 4 * d * 2  # feed-forward, 4× wide
    flops += layers * block
    flops += 2.0 * n * d * p * p * c_out  # final projection
    return batch * flops


def vae_decode_flops(config: Any, width: int, height: int, *, batch: int = 1) -> float:
    """FLOPs of AutoencoderKL.decode (post-quant conv and decoder) of `batch` latents to width×height images."""
    channels = [int(c) for c in _get(config, "block_out_channels")]
    per_block = int(_get(config, "layers_per_block", 2))
    latent = int(_get(config, "latent_channels", 4))
    out = int(_get(config, "out_channels", 3))
    factor = 2 ** (len(channels) - 1)
    h, w = height // factor, width // factor

    def conv(hw: int, cin: int, cout: int, k: int = 3) -> float:
        return 2.0 * hw * cin * cout * k * k

    def resnet(hw: int, cin: int, cout: int) -> float:
        return conv(hw, cin, cout) + conv(hw, cout, cout) + (conv(hw, cin, cout, 1) if cin != cout else 0.0)

    hw = h * w
    top = channels[-1]
    flops = conv(hw, latent, latent, 1) if _get(config, "use_post_quant_conv", True) else 0.0
    flops += conv(hw, latent, top)
    flops += 2 * resnet(hw, top, top)
    if _get(config, "mid_block_add_attention", True):
        flops += 2.0 * hw * top * top * 4 + 4.0 * hw * hw * top  # one head as wide as the block
    previous = top
    for index, cout in enumerate(reversed(channels)):
        for layer in range(per_block + 1):
            flops += resnet(hw, previous if layer == 0 else cout, cout)
        previous = cout
        if index < len(channels) - 1:
            hw *= 4  # nearest-neighbour ×2, then a 3×3 convolution at the new size
            flops += conv(hw, cout, cout)
    flops += conv(hw, channels[0], out)
    return batch * flops


def render_flops(
    transformer_config: Any,
    vae_config: Any,
    width: int,
    height: int,
    steps: int,
    *,
    cfg: bool = False,
    text_tokens: int = TEXT_TOKENS,
) -> float:
    """FLOPs of one image: `steps` transformer forwards (two images' worth under classifier-free guidance) and
    one VAE decode."""
    per_step = transformer_flops(transformer_config, width, height, batch=2 if cfg else 1, text_tokens=text_tokens)
    return steps * per_step + vae_decode_flops(vae_config, width, height)


def image_flops(pipe: Any, width: int, height: int, steps: int, *, cfg: bool = False) -> float | None:
    """render_flops for a loaded pipeline at the size it really renders (its aspect-ratio bin), or None when its parts
    are not a PixArt transformer and a KL VAE (a count that would be wrong is worse than none). Never raises: it
    feeds metrics, which must not fail a render. A ControlNet adapter's own work is not counted."""
    try:
        from models.pipeline import render_size

        width, height = render_size(pipe, width, height)
        transformer = getattr(pipe.transformer, "transformer", pipe.transformer)  # a ControlNet wrapper's base
        return render_flops(transformer.config, pipe.vae.config, width, height, steps, cfg=cfg)
    except Exception:
        return None


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak (FLOP/s) of a GPU by its torch.cuda.get_device_name(), or None when not in the table."""
    lowered = device_name.lower()
    for needle, tflops in PEAK_BF16_TFLOPS:
        if needle.lower() in lowered:
            return tflops * 1e12
    return None


def device_peak_flops(device: str, override_tflops: float = 0.0) -> float | None:
    """The peak MFU is measured against: `override_tflops` (FARM_PEAK_TFLOPS) when set, else the table's figure for
    a CUDA device; None on a CPU or an unknown GPU (then no MFU is reported)."""
    if override_tflops and override_tflops > 0:
        return override_tflops * 1e12
    if not device.startswith("cuda"):
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    index = torch.device(device).index
    return peak_bf16_flops(torch.cuda.get_device_name(index if index is not None else 0))

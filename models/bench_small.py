"""The `bench-small` random-weight PixArt-α pipeline: small enough for a CPU, heavy enough to time a farm against.

The tiny model (models/tiny.py) renders in a few milliseconds, so a farm's overhead measured against it says
nothing. bench-small keeps the real classes and the real model's shape of work: a PixArt transformer at
sample_size 32 (256 px native, so the pipeline's aspect-ratio binning is active, as for the released models), a
gated-GELU T5 encoder padding prompts to 120 tokens, and a VAE with Stable Diffusion's four levels and two
resnets per level, all with narrower widths.

Measured on the project's 2-core CPU machine (torch 2.13 CPU, fp32, 2 threads), one 4-step LCM render at
256×256 through models.pipeline.render: 0.33 s per image after warm-up (transformer ≈ 53 ms per step, VAE
decode ≈ 90 ms, T5 ≈ 17 ms). The first renders after loading are slower (oneDNN set-up) and other processes on
the machine inflate it, so time after warm-up renders. Parameter counts (describe_pipeline): transformer
10,869,472; text encoder 3,095,936; VAE 1,321,207 (encoder included); 15,286,615 in all. The folder is 59 MB
of fp32 safetensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.tiny import TINY_MODEL_MAX_LENGTH, build_components, save_pipeline

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel

# Latent side 32 × VAE factor 8: PixArt's 256 px bucket set, so resolution binning applies.
BENCH_SMALL_LATENT_SIZE = 32
BENCH_SMALL_NATIVE_SIZE = 256

# The transformer: PixArt-XL-2's block structure (self-attention, cross-attention, GELU MLP, adaLN-single)
# at 320 wide instead of 1152, 6 blocks instead of 28.
BENCH_SMALL_LAYERS = 6
BENCH_SMALL_HEADS = 5
BENCH_SMALL_HEAD_DIM = 64
BENCH_SMALL_WIDTH = BENCH_SMALL_HEADS * BENCH_SMALL_HEAD_DIM

# The T5 encoder: T5 v1.1's gated-GELU layout (as in T5-XXL) at d_model 256, 4 layers.
BENCH_SMALL_T5_D_MODEL = 256
BENCH_SMALL_T5_LAYERS = 4
BENCH_SMALL_T5_HEADS = 4
BENCH_SMALL_T5_D_KV = 64
BENCH_SMALL_T5_D_FF = 640

# The VAE: SD's four levels (three 2× downsamples → factor 8) and layers_per_block 2, at 1/8 of SD's widths.
BENCH_SMALL_VAE_CHANNELS = (16, 32, 64, 64)
BENCH_SMALL_VAE_LAYERS_PER_BLOCK = 2
BENCH_SMALL_VAE_NORM_GROUPS = 16
# SD's VAE latent scaling factor, which the PixArt pipelines divide by before decoding.
BENCH_SMALL_VAE_SCALING_FACTOR = 0.18215

# PixArt pads every prompt to 120 T5 tokens; bench-small uses the tiny tokenizer, which keeps that contract.
BENCH_SMALL_MAX_LENGTH = TINY_MODEL_MAX_LENGTH


def build_bench_small_text_encoder(vocab_size: int) -> T5EncoderModel:
    """Build bench-small's T5 v1.1-style encoder (gated-GELU, untied embeddings) with random weights."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=BENCH_SMALL_T5_D_MODEL,
        d_kv=BENCH_SMALL_T5_D_KV,
        num_heads=BENCH_SMALL_T5_HEADS,
        num_layers=BENCH_SMALL_T5_LAYERS,
        d_ff=BENCH_SMALL_T5_D_FF,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def build_bench_small_transformer() -> PixArtTransformer2DModel:
    """Build bench-small's PixArt transformer: 4 latent channels in, epsilon + variance out, 256 px native."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=BENCH_SMALL_HEADS,
        attention_head_dim=BENCH_SMALL_HEAD_DIM,
        in_channels=4,
        out_channels=8,  # PixArt learns sigma too; the pipeline keeps the first half of the channels
        num_layers=BENCH_SMALL_LAYERS,
        cross_attention_dim=BENCH_SMALL_WIDTH,
        caption_channels=BENCH_SMALL_T5_D_MODEL,
        sample_size=BENCH_SMALL_LATENT_SIZE,
        patch_size=2,
        norm_type="ada_norm_single",
        # The pipeline passes resolution/aspect micro-conditions only when sample_size is 128 (1024 models);
        # a 256 px model must not expect them, as PixArt's own 256 checkpoint does not.
        use_additional_conditions=False,
    ).eval()


def build_bench_small_vae() -> AutoencoderKL:
    """Build bench-small's KL autoencoder: SD's four-level layout at narrow widths, latent 1/8 of the image."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(BENCH_SMALL_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(BENCH_SMALL_VAE_CHANNELS),
        block_out_channels=BENCH_SMALL_VAE_CHANNELS,
        layers_per_block=BENCH_SMALL_VAE_LAYERS_PER_BLOCK,
        latent_channels=4,
        norm_num_groups=BENCH_SMALL_VAE_NORM_GROUPS,
        sample_size=BENCH_SMALL_NATIVE_SIZE,
        scaling_factor=BENCH_SMALL_VAE_SCALING_FACTOR,
    ).eval()


def build_bench_small_components(seed: int = 0) -> dict[str, Any]:
    """Build every PixArtAlphaPipeline component of bench-small with weights determined by `seed` alone."""
    return build_components(
        seed,
        text_encoder=build_bench_small_text_encoder,
        transformer=build_bench_small_transformer,
        vae=build_bench_small_vae,
    )


def make_bench_small(path: str | Path, *, seed: int = 0) -> Path:
    """Write the bench-small random-weight PixArtAlphaPipeline folder to `path` and return it."""
    return save_pipeline(build_bench_small_components(seed), path)


_COUNTED_COMPONENTS = ("transformer", "text_encoder", "vae")


def describe_pipeline(pipe: PixArtAlphaPipeline) -> dict[str, int]:
    """Return parameter counts per model component (absent ones, e.g. text_encoder=None, are left out) and total."""
    counts: dict[str, int] = {}
    for name in _COUNTED_COMPONENTS:
        module = getattr(pipe, name, None)
        if module is None:
            continue
        counts[name] = sum(p.numel() for p in module.parameters())
    counts["total"] = sum(counts.values())
    return counts

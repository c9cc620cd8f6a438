"""A tiny random-weight PixArt-α pipeline folder, built offline from the real classes, for tests."""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.scheduler import release_scheduler

if TYPE_CHECKING:
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5Tokenizer

# Default render size: the transformer's sample_size (16 latents) times the VAE's scale factor (8).
TINY_DEFAULT_SIZE = 128

# PixArt pads every prompt to 120 T5 tokens; the tiny tokenizer keeps that contract.
TINY_MODEL_MAX_LENGTH = 120

_TRANSFORMER_LAYERS = 2
_TRANSFORMER_HEADS = 2
_TRANSFORMER_HEAD_DIM = 8
_LATENT_SAMPLE_SIZE = 16
_VAE_CHANNELS = (8, 16, 16, 16)
_T5_D_MODEL = 32

# Common prompt words. Anything else still tokenizes through the single-character pieces below, so no
# prompt maps wholly to <unk> and different prompts give different embeddings.
_WORDS_TEXT = """
a an the of and or in on at by with from to for over under near into through without between
is are was be very more most no not one two three four many some all each this that these those
photo photograph picture painting drawing sketch illustration render rendering portrait landscape
close up closeup wide shot view style art artwork digital oil watercolor pencil anime cartoon
realistic photorealistic detailed highly high quality resolution sharp focus cinematic lighting
light dark bright soft hard warm cold shadow shadows sun sunset sunrise moon night day morning
evening sky cloud clouds rain snow fog storm water sea ocean lake river beach sand mountain mountains
hill forest tree trees flower flowers grass garden field city street road building house castle
tower bridge room window door table chair car train boat ship plane bike
cat cats dog dogs bird birds horse fish lion tiger bear fox wolf rabbit owl dragon robot
man woman men women boy girl child person people face eyes hair hat dress shirt
red orange yellow green blue purple pink brown black white gray grey gold silver colorful
big small large tiny little old new young beautiful cute happy sad
wearing sitting standing walking running flying holding looking eating reading playing
"""

# Scores are Unigram log-probabilities: whole words are far likelier than spelling them out by character.
_WORD_SCORE = -5.0
_CHAR_SCORE = -10.0
_SPACE_SCORE = -2.0


def _tiny_vocab() -> list[tuple[str, float]]:
    """Return the Unigram vocabulary in T5's layout: <pad>=0, </s>=1, <unk>=2, then pieces."""
    vocab: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", _SPACE_SCORE)]
    # "▁" marks a word start, as in SentencePiece; dict.fromkeys de-duplicates while keeping order.
    vocab += [(f"▁{word}", _WORD_SCORE) for word in dict.fromkeys(_WORDS_TEXT.split())]
    vocab += [(char, _CHAR_SCORE) for char in string.ascii_letters + string.digits + string.punctuation]
    return vocab


def build_tiny_tokenizer() -> T5Tokenizer:
    """Build a small T5 tokenizer (Unigram, SentencePiece-style) with no files and no network."""
    from transformers import T5Tokenizer

    # In transformers 5 T5Tokenizer is the tokenizers-backed class: given `vocab` it builds the same
    # tokenizers.Unigram + Metaspace pipeline and "</s>"-appending post-processor a real T5 checkpoint
    # loads, so save_pretrained/from_pretrained round-trip through tokenizer.json. A hand-built
    # tokenizers.Tokenizer passed as tokenizer_object would not survive the round trip: T5Tokenizer's
    # loader keeps only the vocabulary from tokenizer.json and rebuilds the rest its own way.
    return T5Tokenizer(
        vocab=_tiny_vocab(),
        extra_ids=0,  # sentinel tokens only matter for span-corruption pretraining
        model_max_length=TINY_MODEL_MAX_LENGTH,
    )


def build_tiny_text_encoder(vocab_size: int) -> T5EncoderModel:
    """Build a tiny T5 v1.1-style encoder (gated-GELU like PixArt's T5-XXL) with random weights."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=_T5_D_MODEL,
        d_kv=8,
        num_heads=4,
        num_layers=2,
        d_ff=64,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def build_tiny_transformer() -> PixArtTransformer2DModel:
    """Build a 2-block PixArt transformer that takes 4 latent channels and predicts epsilon + variance."""
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel(
        num_attention_heads=_TRANSFORMER_HEADS,
        attention_head_dim=_TRANSFORMER_HEAD_DIM,
        in_channels=4,
        out_channels=8,  # PixArt learns sigma too; the pipeline keeps the first half of the channels
        num_layers=_TRANSFORMER_LAYERS,
        cross_attention_dim=_TRANSFORMER_HEADS * _TRANSFORMER_HEAD_DIM,
        caption_channels=_T5_D_MODEL,
        sample_size=_LATENT_SAMPLE_SIZE,
        patch_size=2,
        norm_type="ada_norm_single",
        # Resolution/aspect micro-conditions exist only for the 1024 models (sample_size 128).
        use_additional_conditions=False,
    ).eval()


def build_tiny_vae() -> AutoencoderKL:
    """Build a tiny KL autoencoder with four blocks so the latent is 1/8 of the image, like SD's VAE."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(_VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(_VAE_CHANNELS),
        block_out_channels=_VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_DEFAULT_SIZE,
    ).eval()


def build_components(
    seed: int,
    *,
    text_encoder: Callable[[int], T5EncoderModel],
    transformer: Callable[[], PixArtTransformer2DModel],
    vae: Callable[[], AutoencoderKL],
    sampler: str = "lcm",
) -> dict[str, Any]:
    """Build every PixArtAlphaPipeline component from the given builders, with weights set by `seed` alone.

    `sampler` is the scheduler the folder ships ("lcm" as PixArt-LCM, "dpm-solver++" as PixArt-XL-2), in its
    release configuration: the worker samples every model with the scheduler it ships."""
    import torch

    # fork_rng keeps the caller's global RNG stream untouched; each component gets its own offset
    # seed so changing one component's shape does not reshuffle the others' weights.
    with torch.random.fork_rng(devices=[]):
        tokenizer = build_tiny_tokenizer()
        torch.manual_seed(seed)
        encoder = text_encoder(len(tokenizer))
        torch.manual_seed(seed + 1)
        denoiser = transformer()
        torch.manual_seed(seed + 2)
        autoencoder = vae()
    return {
        "tokenizer": tokenizer,
        "text_encoder": encoder,
        "vae": autoencoder,
        "transformer": denoiser,
        "scheduler": release_scheduler(sampler),
    }


def save_pipeline(components: dict[str, Any], path: str | Path) -> Path:
    """Write components as a PixArtAlphaPipeline folder (safetensors: no pickle, byte-stable for a seed)."""
    from diffusers import PixArtAlphaPipeline

    target = Path(path)
    target.mkdir(parents=True, exist_ok=True)
    PixArtAlphaPipeline(**components).save_pretrained(target, safe_serialization=True)
    return target


def build_tiny_components(seed: int = 0, *, sampler: str = "lcm") -> dict[str, Any]:
    """Build every tiny PixArtAlphaPipeline component with weights determined by `seed` alone."""
    return build_components(
        seed,
        text_encoder=build_tiny_text_encoder,
        transformer=build_tiny_transformer,
        vae=build_tiny_vae,
        sampler=sampler,
    )


def make_tiny(path: str | Path, *, seed: int = 0, sampler: str = "lcm") -> Path:
    """Write a complete tiny random-weight PixArtAlphaPipeline folder to `path` and return it: "lcm" ships the
    PixArt-LCM scheduler (a stand-in for the δ release), "dpm-solver++" PixArt-XL-2's (a stand-in for α)."""
    return save_pipeline(build_tiny_components(seed, sampler=sampler), path)

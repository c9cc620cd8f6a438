"""8-bit loading (bitsandbytes) and the report's 8 GB recipe: encode prompts with 8-bit T5, free it, render."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5EncoderModel, T5Tokenizer


class QuantizationUnavailable(RuntimeError):
    """The requested 8-bit load cannot run on this machine."""


def _load_kwargs(source: str | Path, subfolder: str | None, local_files_only: bool) -> dict[str, Any]:
    """Return from_pretrained kwargs for a folder or hub id, with or without a subfolder."""
    kwargs: dict[str, Any] = {"local_files_only": local_files_only}
    if subfolder:
        kwargs["subfolder"] = subfolder
    return kwargs


def load_text_encoder_8bit(
    source: str | Path,
    subfolder: str | None = "text_encoder",
    *,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    local_files_only: bool = False,
) -> T5EncoderModel:
    """Load a T5 encoder with its linear layers in LLM.int8 (bitsandbytes); runs on CPU and CUDA."""
    import torch
    from transformers import BitsAndBytesConfig, T5EncoderModel

    # The non-int8 parts (embeddings, norms) in fp16. T5 keeps `wo` unquantized and in fp32
    # (_keep_in_fp32_modules): T5 v1.1's feed-forward output overflows fp16.
    torch_dtype = dtype if dtype is not None else torch.float16
    return T5EncoderModel.from_pretrained(
        str(source),
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        # 8-bit modules cannot be moved with .to() afterwards, so they are placed while loading.
        device_map={"": device},
        dtype=torch_dtype,
        **_load_kwargs(source, subfolder, local_files_only),
    ).eval()


def load_text_encoder(
    source: str | Path,
    *,
    precision: str | None,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    subfolder: str | None = "text_encoder",
    local_files_only: bool = False,
) -> T5EncoderModel:
    """Load a pipeline's T5 encoder at a job's T5 precision: None → full precision in `dtype` (fp32 if None),
    "int8" → LLM.int8 linear layers (load_text_encoder_8bit; `dtype` is then the non-int8 parts', fp16 if None)."""
    if precision == "int8":
        return load_text_encoder_8bit(source, subfolder, device=device, dtype=dtype, local_files_only=local_files_only)
    if precision is not None:
        raise ValueError(f"unknown T5 precision {precision!r}: expected None (full precision) or 'int8'")
    import torch
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(
        str(source),
        # Explicit: transformers 5 would otherwise load in the checkpoint's own dtype ("auto").
        dtype=dtype if dtype is not None else torch.float32,
        # Straight onto the device: no second copy in host memory on the way.
        device_map={"": device},
        **_load_kwargs(source, subfolder, local_files_only),
    ).eval()


def load_tokenizer(
    source: str | Path, subfolder: str | None = "tokenizer", *, local_files_only: bool = False
) -> T5Tokenizer:
    """The pipeline's T5 tokenizer (what the transient encoders of the low-memory mode need beside them)."""
    from transformers import T5Tokenizer

    return T5Tokenizer.from_pretrained(str(source), **_load_kwargs(source, subfolder, local_files_only))


def load_transformer_8bit(
    source: str | Path,
    subfolder: str | None = "transformer",
    *,
    device: str = "cuda",
    local_files_only: bool = False,
) -> PixArtTransformer2DModel:
    """Load the PixArt transformer in 8-bit through diffusers' bitsandbytes quantizer; CUDA only."""
    import torch

    if not str(device).startswith("cuda") or not torch.cuda.is_available():
        # diffusers' quantizer refuses CPU loads with a long traceback; say what to do instead.
        raise QuantizationUnavailable(
            "an 8-bit transformer needs a CUDA GPU (diffusers' bitsandbytes quantizer does not load on the CPU); "
            f"device is {device!r}. On the CPU quantize only the T5 text encoder."
        )
    from diffusers import BitsAndBytesConfig, PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(
        str(source),
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        dtype=torch.float16,
        device_map={"": device},
        **_load_kwargs(source, subfolder, local_files_only),
    ).eval()


def module_footprint_bytes(module: torch.nn.Module) -> int:
    """Return the bytes held by a module's parameters and buffers (int8 weights count one byte each)."""
    tensors = [*module.parameters(), *module.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _encoding_pipeline(tokenizer: T5Tokenizer, text_encoder: T5EncoderModel) -> PixArtAlphaPipeline:
    """Wrap a tokenizer and encoder in a pipeline with nothing else, to reuse its encode_prompt."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=None, transformer=None, scheduler=None
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def encode_prompts(
    pipe: PixArtAlphaPipeline | tuple[T5Tokenizer, T5EncoderModel],
    prompts: Sequence[str],
    max_sequence_length: int = 120,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (prompt_embeds, prompt_attention_mask) for `prompts`, guidance off, in one encoder call."""
    import torch

    if isinstance(pipe, tuple):
        pipe = _encoding_pipeline(*pipe)
    with torch.no_grad():
        embeds, mask, _, _ = pipe.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            # As the release encodes: caption cleaning (bs4 + ftfy, both installed) lower-cases the prompt, strips
            # URLs, HTML and stray punctuation before T5. Without bs4 or ftfy diffusers would log a warning and
            # fall back to lower-casing only; the prompt stored on the job stays verbatim either way.
            clean_caption=True,
            max_sequence_length=max_sequence_length,
        )
    return embeds, mask


def release_memory() -> None:
    """Collect garbage and hand cached CUDA blocks back, after the caller dropped its references."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def encode_prompts_low_memory(
    source: str | Path,
    prompts: Sequence[str],
    *,
    device: str = "cpu",
    max_sequence_length: int = 120,
    local_files_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Steps 1–2 of the 8 GB recipe: encode with an 8-bit T5 loaded just for this, then free it."""
    # 1. Load the tokenizer and the 8-bit encoder.
    tokenizer = load_tokenizer(source, local_files_only=local_files_only)
    encoder = load_text_encoder_8bit(source, device=device, local_files_only=local_files_only)
    # 2. Encode every prompt in one call, guidance off.
    embeds, mask = encode_prompts((tokenizer, encoder), prompts, max_sequence_length=max_sequence_length)
    # 3. Free the encoder before the transformer and VAE are loaded: that is what keeps the peak low.
    del encoder
    release_memory()
    return embeds, mask

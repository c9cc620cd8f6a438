"""Tests for models.quantize: 8-bit T5 on the CPU, the 8-bit transformer's CUDA guard and the 8 GB recipe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from bitsandbytes.nn import Linear8bitLt
from transformers import T5Config, T5EncoderModel, T5Tokenizer

from models.pipeline import RenderRequest, load_pipeline, render_batch
from models.quantize import (
    QuantizationUnavailable,
    encode_prompts,
    encode_prompts_low_memory,
    load_text_encoder,
    load_text_encoder_8bit,
    load_tokenizer,
    load_transformer_8bit,
    module_footprint_bytes,
)
from models.tiny import TINY_DEFAULT_SIZE, make_tiny

PROMPTS = ["a photo of a red cat sitting on a table", "a lighthouse on a cliff at sunset"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny model once for this module."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "pixart-tiny", seed=0)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in fp32 (Frobenius)."""
    return float((a.float() - b.float()).norm() / b.float().norm())


def _linear_bytes(model: torch.nn.Module) -> int:
    """Bytes held by the int8-quantizable linear layers (T5 keeps `wo` out of int8)."""
    return sum(
        module_footprint_bytes(m)
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not n.endswith("wo")
    )


def _is_int8_linear(model: torch.nn.Module, name: str) -> bool:
    owner = model.get_submodule(name.rsplit(".", 1)[0])
    return isinstance(owner, Linear8bitLt)


def _compare(folder: Path, subfolder: str | None, tokenizer: T5Tokenizer, label: str) -> tuple[float, float, float]:
    """Load fp32, fp16 and 8-bit copies; return (relative error, whole-model ratio, linear-layer ratio)."""
    kwargs = {"subfolder": subfolder} if subfolder else {}
    fp32 = T5EncoderModel.from_pretrained(folder, **kwargs).eval()
    fp16 = T5EncoderModel.from_pretrained(folder, dtype=torch.float16, **kwargs)
    int8 = load_text_encoder_8bit(folder, subfolder)
    quantized = [n for n, m in int8.named_modules() if isinstance(m, Linear8bitLt)]
    assert quantized and all(m.weight.dtype == torch.int8 for m in int8.modules() if isinstance(m, Linear8bitLt))
    expected, _ = encode_prompts((tokenizer, fp32), PROMPTS)
    got, mask = encode_prompts((tokenizer, int8), PROMPTS)
    assert got.shape == expected.shape and mask.shape == (2, 120)
    error = _relative_error(got, expected)
    whole = module_footprint_bytes(int8) / module_footprint_bytes(fp16)
    linear = _linear_bytes(int8) / _linear_bytes(fp16)
    print(f"{label}: relative error {error:.4f}, 8-bit/fp16 footprint {whole:.3f} (int8 linears {linear:.3f})")
    return error, whole, linear


def test_tiny_text_encoder_in_8bit_on_cpu(tiny_dir: Path) -> None:
    """The tiny model's T5 loads in 8-bit on the CPU and encodes close to fp32."""
    tokenizer = T5Tokenizer.from_pretrained(tiny_dir / "tokenizer")
    error, whole, linear = _compare(tiny_dir, "text_encoder", tokenizer, "tiny T5")
    assert error < 2e-2
    assert linear <= 0.6
    assert whole < 1.0


def test_larger_t5_in_8bit_within_tolerance(tiny_dir: Path, tmp_path: Path) -> None:
    """A d_model=512 T5 (T5-XXL's d_ff/d_model ratio) in 8-bit: error < 2e-2, int8 layers ≤ 0.6× fp16."""
    tokenizer = T5Tokenizer.from_pretrained(tiny_dir / "tokenizer")
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=512,
        d_kv=64,
        num_heads=8,
        num_layers=3,
        d_ff=1280,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        T5EncoderModel(config).save_pretrained(tmp_path / "t5")
    error, whole, linear = _compare(tmp_path / "t5", None, tokenizer, "T5 d_model=512")
    assert error < 2e-2
    assert linear <= 0.6
    # The issue asks for ≤ 0.6× of fp16 for the whole model; that is not reachable without quantizing T5's `wo`,
    # which transformers keeps in fp32 (_keep_in_fp32_modules: T5 v1.1 overflows in fp16 there). So instead of
    # a looser number, check that the whole-model ratio is exactly explained: int8 linears, fp32 `wo`, fp16 rest.
    int8 = load_text_encoder_8bit(tmp_path / "t5", None)
    for name, tensor in [*int8.named_parameters(), *int8.named_buffers()]:
        if _is_int8_linear(int8, name):
            allowed = {torch.int8} if name.endswith(".weight") else {torch.float16, torch.float32}  # bias, scales
        elif ".wo." in name:
            allowed = {torch.float32}
        else:
            allowed = {torch.float16}
        assert tensor.dtype in allowed, f"{name} is {tensor.dtype}"
    assert 0.5 < whole < 1.0


def test_8bit_transformer_needs_cuda(tiny_dir: Path) -> None:
    """On a CPU-only machine the 8-bit transformer is refused with a clear message, before loading."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the guard is for CPU-only machines")
    with pytest.raises(QuantizationUnavailable, match="needs a CUDA GPU"):
        load_transformer_8bit(tiny_dir, device="cuda")
    with pytest.raises(QuantizationUnavailable, match="needs a CUDA GPU"):
        load_transformer_8bit(tiny_dir, device="cpu")


def test_render_from_embeddings_equals_render_from_prompts(tiny_dir: Path) -> None:
    """Precomputed embeddings (same encoder, same batch) give exactly the prompt render's pixels."""
    pipe = load_pipeline(str(tiny_dir), device="cpu")
    requests = [
        RenderRequest(prompt=p, seed=i, width=TINY_DEFAULT_SIZE, height=TINY_DEFAULT_SIZE)
        for i, p in enumerate(PROMPTS)
    ]
    embeds, mask = encode_prompts(pipe, PROMPTS)
    from_prompts = render_batch(pipe, requests)
    from_embeds = render_batch(pipe, requests, prompt_embeds=embeds, prompt_attention_mask=mask)
    for a, b in zip(from_prompts, from_embeds, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_low_memory_recipe_matches_8bit_pipeline(tiny_dir: Path) -> None:
    """Encode with 8-bit T5 and free it, then render without a text encoder: same pixels as 8-bit in-pipeline."""
    requests = [
        RenderRequest(prompt=p, seed=i, width=TINY_DEFAULT_SIZE, height=TINY_DEFAULT_SIZE)
        for i, p in enumerate(PROMPTS)
    ]
    embeds, mask = encode_prompts_low_memory(tiny_dir, PROMPTS)
    lean = load_pipeline(str(tiny_dir), device="cpu", with_text_encoder=False)
    assert lean.text_encoder is None
    images = render_batch(lean, requests, prompt_embeds=embeds, prompt_attention_mask=mask)

    # The recipe's embeddings are the 8-bit encoder's, and they stay close to the fp32 render.
    tokenizer = T5Tokenizer.from_pretrained(tiny_dir / "tokenizer")
    again, _ = encode_prompts((tokenizer, load_text_encoder_8bit(tiny_dir)), PROMPTS)
    assert torch.equal(embeds, again)
    assert embeds.dtype == torch.float16
    reference = render_batch(load_pipeline(str(tiny_dir), device="cpu"), requests)
    for a, b in zip(images, reference, strict=True):
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        print(f"8-bit recipe vs fp32 render: mean pixel diff {diff.mean():.3f}, max {diff.max()}")
        assert diff.mean() < 2.0
    with pytest.raises(ValueError, match="guidance"):
        cfg = [RenderRequest(prompt="x", seed=0, width=64, height=64, guidance_scale=4.5)]
        render_batch(lean, cfg, prompt_embeds=embeds[:1], prompt_attention_mask=mask[:1])


def test_text_encoder_at_a_jobs_precision_and_captions_cleaned_as_released(tiny_dir: Path) -> None:
    """load_text_encoder: None is full precision in the given dtype, "int8" is LLM.int8; encode_prompts cleans
    captions as the release's pipeline does (bs4 + ftfy: lower case, no HTML, no URLs)."""
    tokenizer = load_tokenizer(tiny_dir)
    full = load_text_encoder(tiny_dir, precision=None, dtype=torch.float32)
    assert full.dtype == torch.float32 and not any(isinstance(m, Linear8bitLt) for m in full.modules())
    reference = T5EncoderModel.from_pretrained(tiny_dir, subfolder="text_encoder", dtype=torch.float32).eval()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(full.state_dict()[name], tensor), name
    int8 = load_text_encoder(tiny_dir, precision="int8")
    assert any(isinstance(m, Linear8bitLt) for m in int8.modules())
    with pytest.raises(ValueError, match="unknown T5 precision"):
        load_text_encoder(tiny_dir, precision="int4")

    messy = "A <b>Photo</b> of a RED cat https://example.com/cat.png sitting on a table"
    cleaned, mask = encode_prompts((tokenizer, full), [messy])
    plain, plain_mask = encode_prompts((tokenizer, full), [PROMPTS[0]])
    assert torch.equal(cleaned, plain) and torch.equal(mask, plain_mask)

"""Tests for models.tiny: the offline tiny PixArtAlphaPipeline folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, LCMScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from safetensors.torch import load_file
from transformers import T5EncoderModel, T5Tokenizer

from models.scheduler import is_pixart_lcm_scheduler
from models.tiny import TINY_DEFAULT_SIZE, make_tiny

COMPONENT_CLASSES = {
    "transformer": PixArtTransformer2DModel,
    "vae": AutoencoderKL,
    "text_encoder": T5EncoderModel,
    "tokenizer": T5Tokenizer,
    "scheduler": LCMScheduler,
}


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build the tiny model once for this module."""
    return make_tiny(tmp_path_factory.mktemp("tiny") / "pixart-tiny", seed=0)


def _weights(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Load every safetensors file under `folder`, keyed by relative path."""
    return {str(p.relative_to(folder)): load_file(p) for p in sorted(folder.rglob("*.safetensors"))}


def test_model_index_lists_every_component(tiny_dir: Path) -> None:
    """model_index.json names the PixArtAlphaPipeline and each component's class."""
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    for name, cls in COMPONENT_CLASSES.items():
        assert index[name][1] == cls.__name__
        assert (tiny_dir / name).is_dir()


@pytest.mark.parametrize("name", sorted(COMPONENT_CLASSES))
def test_each_component_loads_with_its_class(tiny_dir: Path, name: str) -> None:
    """Each subfolder loads back with its own class's from_pretrained."""
    cls = COMPONENT_CLASSES[name]
    loaded = cls.from_pretrained(tiny_dir / name)
    assert isinstance(loaded, cls)


def test_component_shapes_fit_together(tiny_dir: Path) -> None:
    """Caption width matches T5's d_model, the VAE downsamples by 8 and the default size is 128."""
    pipe = PixArtAlphaPipeline.from_pretrained(tiny_dir)
    assert pipe.transformer.config.caption_channels == pipe.text_encoder.config.d_model
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    assert pipe.vae_scale_factor == 8
    assert pipe.transformer.config.sample_size * pipe.vae_scale_factor == TINY_DEFAULT_SIZE
    assert is_pixart_lcm_scheduler(pipe.scheduler)


def test_same_seed_gives_identical_weights(tiny_dir: Path, tmp_path: Path) -> None:
    """Rebuilding with the same seed reproduces every tensor and the safetensors bytes."""
    again = make_tiny(tmp_path / "again", seed=0)
    first, second = _weights(tiny_dir), _weights(again)
    assert first.keys() == second.keys()
    assert len(first) == 3
    for rel, tensors in first.items():
        assert tensors.keys() == second[rel].keys()
        for key, tensor in tensors.items():
            assert torch.equal(tensor, second[rel][key]), f"{rel}:{key}"
        assert (tiny_dir / rel).read_bytes() == (again / rel).read_bytes()


def test_different_seed_gives_different_weights(tiny_dir: Path, tmp_path: Path) -> None:
    """Another seed changes the random weights."""
    other = _weights(make_tiny(tmp_path / "other", seed=1))
    rel = "transformer/diffusion_pytorch_model.safetensors"
    base = _weights(tiny_dir)[rel]
    assert any(not torch.equal(base[k], other[rel][k]) for k in base)


def test_make_tiny_leaves_global_rng_alone(tmp_path: Path) -> None:
    """Building the model does not reseed the caller's torch RNG."""
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    make_tiny(tmp_path / "rng", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_folder_is_small(tiny_dir: Path) -> None:
    """The whole folder stays well under a few MB."""
    total = sum(p.stat().st_size for p in tiny_dir.rglob("*") if p.is_file())
    assert total < 2 * 1024 * 1024


def test_tokenizer_pads_to_120_and_ends_with_eos(tiny_dir: Path) -> None:
    """The tokenizer pads to PixArt's 120 tokens and closes each prompt with </s>."""
    tokenizer = T5Tokenizer.from_pretrained(tiny_dir / "tokenizer")
    assert tokenizer.model_max_length == 120
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    batch = tokenizer(
        ["a photo of a cat", "Zebra-striped xylophone, 42!"],
        padding="max_length",
        max_length=120,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    assert batch.input_ids.shape == (2, 120)
    for ids, mask in zip(batch.input_ids, batch.attention_mask, strict=True):
        length = int(mask.sum())
        assert ids[length - 1].item() == tokenizer.eos_token_id
        assert (ids[length:] == tokenizer.pad_token_id).all()
        # Out-of-vocabulary words spell out by character instead of collapsing to <unk>.
        assert tokenizer.unk_token_id not in ids[:length].tolist()
    assert tokenizer.decode(batch.input_ids[1], skip_special_tokens=True) == "Zebra-striped xylophone, 42!"


def test_tokenizer_truncates_long_prompts(tiny_dir: Path) -> None:
    """Prompts longer than 120 tokens are cut to 120 and still end with </s>."""
    tokenizer = T5Tokenizer.from_pretrained(tiny_dir / "tokenizer")
    ids = tokenizer("cat " * 300, padding="max_length", max_length=120, truncation=True).input_ids
    assert len(ids) == 120
    assert ids[-1] == tokenizer.eos_token_id


def test_tokenizer_round_trips(tiny_dir: Path, tmp_path: Path) -> None:
    """save_pretrained/from_pretrained keeps the tokenization identical."""
    tokenizer = T5Tokenizer.from_pretrained(tiny_dir / "tokenizer")
    tokenizer.save_pretrained(tmp_path / "tok")
    again = T5Tokenizer.from_pretrained(tmp_path / "tok")
    prompt = "a red fox sitting in the snow at sunset, oil painting"
    assert tokenizer(prompt).input_ids == again(prompt).input_ids
    assert again.model_max_length == 120

"""Tests for models.bench_small: the offline bench-small PixArtAlphaPipeline folder. No timing assertions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from diffusers import PixArtAlphaPipeline

from models import bench_small
from models.bench_small import BENCH_SMALL_NATIVE_SIZE, describe_pipeline, make_bench_small
from models.pipeline import RenderRequest, load_pipeline, render, uses_resolution_binning
from models.scheduler import is_pixart_lcm_scheduler
from models.tiny import TINY_MODEL_MAX_LENGTH


@pytest.fixture(scope="session")
def bench_small_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build bench-small once for this module."""
    return make_bench_small(tmp_path_factory.mktemp("bench") / "pixart-bench-small", seed=0)


@pytest.fixture(scope="session")
def bench_small_pipe(bench_small_dir: Path) -> PixArtAlphaPipeline:
    """bench-small loaded the way workers load models, on the CPU."""
    return load_pipeline(str(bench_small_dir), device="cpu")


def _config(folder: Path, component: str) -> dict:
    return json.loads((folder / component / "config.json").read_text())


def test_folder_is_a_pixart_alpha_pipeline(bench_small_dir: Path) -> None:
    """model_index.json names PixArtAlphaPipeline and every component has its folder."""
    index = json.loads((bench_small_dir / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline"
    for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (bench_small_dir / name).is_dir()


def test_folder_stays_small(bench_small_dir: Path) -> None:
    """The folder is built in temp dirs by tests and benchmarks, so keep it well under 100 MB."""
    size = sum(p.stat().st_size for p in bench_small_dir.rglob("*") if p.is_file())
    assert size < 100 * 1024 * 1024


def test_config_sizes_match_the_module(bench_small_dir: Path) -> None:
    """The saved configs carry the sizes models.bench_small declares."""
    transformer = _config(bench_small_dir, "transformer")
    assert transformer["_class_name"] == "PixArtTransformer2DModel"
    assert transformer["sample_size"] == bench_small.BENCH_SMALL_LATENT_SIZE
    assert transformer["num_layers"] == bench_small.BENCH_SMALL_LAYERS
    assert transformer["num_attention_heads"] == bench_small.BENCH_SMALL_HEADS
    assert transformer["attention_head_dim"] == bench_small.BENCH_SMALL_HEAD_DIM
    assert transformer["caption_channels"] == bench_small.BENCH_SMALL_T5_D_MODEL
    assert transformer["in_channels"] == 4
    assert transformer["out_channels"] == 8
    assert transformer["norm_type"] == "ada_norm_single"

    text_encoder = _config(bench_small_dir, "text_encoder")
    assert text_encoder["d_model"] == bench_small.BENCH_SMALL_T5_D_MODEL
    assert text_encoder["num_layers"] == bench_small.BENCH_SMALL_T5_LAYERS
    assert text_encoder["feed_forward_proj"] == "gated-gelu"

    vae = _config(bench_small_dir, "vae")
    assert tuple(vae["block_out_channels"]) == bench_small.BENCH_SMALL_VAE_CHANNELS
    assert vae["layers_per_block"] == bench_small.BENCH_SMALL_VAE_LAYERS_PER_BLOCK
    assert vae["scaling_factor"] == pytest.approx(bench_small.BENCH_SMALL_VAE_SCALING_FACTOR)

    # Native size: latent side × the VAE's 2^(levels - 1) = 8 downsampling.
    factor = 2 ** (len(vae["block_out_channels"]) - 1)
    assert transformer["sample_size"] * factor == BENCH_SMALL_NATIVE_SIZE


def test_loaded_pipeline_is_binned_with_the_lcm_scheduler(bench_small_pipe: PixArtAlphaPipeline) -> None:
    """Loaded through load_pipeline: PixArt LCM scheduler, 256 px bins active, prompts padded to 120 tokens."""
    assert is_pixart_lcm_scheduler(bench_small_pipe.scheduler)
    assert uses_resolution_binning(bench_small_pipe)
    assert bench_small_pipe.vae_scale_factor * bench_small.BENCH_SMALL_LATENT_SIZE == BENCH_SMALL_NATIVE_SIZE
    assert bench_small_pipe.tokenizer.model_max_length == TINY_MODEL_MAX_LENGTH
    assert bench_small_pipe.text_encoder.config.vocab_size == len(bench_small_pipe.tokenizer)


def test_describe_pipeline_counts_parameters(bench_small_pipe: PixArtAlphaPipeline) -> None:
    """describe_pipeline counts each model component and sums them; absent components are left out."""
    counts = describe_pipeline(bench_small_pipe)
    expected = {
        name: sum(p.numel() for p in getattr(bench_small_pipe, name).parameters())
        for name in ("transformer", "text_encoder", "vae")
    }
    assert {k: counts[k] for k in expected} == expected
    assert counts["total"] == sum(expected.values())
    # bench-small is sized between the tiny model and the real one: millions, not thousands or billions.
    assert 1_000_000 < counts["transformer"] < 100_000_000

    without_encoder = PixArtAlphaPipeline(**{**bench_small_pipe.components, "text_encoder": None})
    counts_without = describe_pipeline(without_encoder)
    assert "text_encoder" not in counts_without
    assert counts_without["total"] == expected["transformer"] + expected["vae"]


def test_render_at_native_size_is_deterministic(bench_small_pipe: PixArtAlphaPipeline) -> None:
    """One 4-step render gives a native-size image; the same seed gives the same pixels, another seed not."""
    size = BENCH_SMALL_NATIVE_SIZE
    request = RenderRequest(prompt="a photo of a cat", seed=7, width=size, height=size)
    first = render(bench_small_pipe, request)
    again = render(bench_small_pipe, request)
    other = render(bench_small_pipe, RenderRequest(prompt="a photo of a cat", seed=8, width=size, height=size))

    assert first.size == (size, size)
    assert first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again))
    assert not np.array_equal(np.asarray(first), np.asarray(other))


def test_same_seed_builds_the_same_weights(bench_small_dir: Path, tmp_path: Path) -> None:
    """make_bench_small is a function of its seed: rebuilding gives byte-identical weight files."""
    again = make_bench_small(tmp_path / "again", seed=0)
    for original in sorted(bench_small_dir.rglob("*.safetensors")):
        assert (again / original.relative_to(bench_small_dir)).read_bytes() == original.read_bytes()

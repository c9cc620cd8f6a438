"""The GPU fast path (models/fastpath.py) on the CPU: each option against eager within a stated tolerance, the
FLOP count against torch's own counter, the worker option from settings to the loaded pipeline.

Tolerances (README "Fast path"), on the tiny model, 2 images at 128 px, 4 LCM steps, output as the worker stores it
(uint8 pixels) and as latents:

| option | pixels (max abs, levels of 255) | latents (relative L2 error) |
|---|---|---|
| sdpa, and the CPU defaults | 0 (identical) | 0 |
| none (math attention), fuse-qkv, channels-last | ≤ 1 | ≤ 1e-5 |
| compile (Inductor) | ≤ 1 | ≤ 1e-4 |
| int8-dynamic | ≤ 2 | ≤ 5e-3 |
| fp8-dynamic (numerics on the CPU's reference kernel) | ≤ 4 | ≤ 2e-2 |
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from models.fastpath import (
    FastPath,
    FastPathUnavailable,
    apply_fast_path,
    check_supported,
    default_fast_path,
    parse_fast_path,
)
from models.pipeline import RenderRequest, load_pipeline, render_batch
from models.tiny import make_tiny

REQUESTS = [RenderRequest(prompt=f"a red cat on a chair, number {i}", seed=i, width=128, height=128) for i in range(2)]

# option → (max pixel difference in levels, max relative L2 error of the latents)
TOLERANCES: dict[str, tuple[int, float]] = {
    "sdpa": (0, 0.0),
    "default": (0, 0.0),
    "none": (1, 1e-5),
    "fuse-qkv": (1, 1e-5),
    "channels-last": (1, 1e-5),
    "none,sdpa,fuse-qkv,channels-last": (1, 1e-5),
    "int8-dynamic": (2, 5e-3),
    "fuse-qkv,int8-dynamic": (2, 5e-3),
}
COMPILE_TOLERANCE = (1, 1e-4)
NO_CONDITIONS = {"resolution": None, "aspect_ratio": None}  # the tiny model has no micro-conditions
FP8_TOLERANCE = (4, 2e-2)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("fastpath") / "tiny", seed=0)


def _outputs(pipe: Any) -> tuple[np.ndarray, torch.Tensor]:
    """The uint8 pixels the worker stores and the final latents, for REQUESTS."""
    images = render_batch(pipe, REQUESTS)
    latents = render_batch(pipe, REQUESTS, output_type="latent")
    return np.stack([np.asarray(image, dtype=np.int16) for image in images]), torch.stack(list(latents))


@pytest.fixture(scope="module")
def eager(tiny_dir: Path) -> tuple[np.ndarray, torch.Tensor]:
    """What a worker rendered before the fast path existed: the pipeline as diffusers loads it."""
    return _outputs(load_pipeline(str(tiny_dir), device="cpu"))


def _difference(got: tuple[np.ndarray, torch.Tensor], reference: tuple[np.ndarray, torch.Tensor]) -> tuple[int, float]:
    pixels = int(np.abs(got[0] - reference[0]).max())
    relative = float((got[1] - reference[1]).norm() / reference[1].norm())
    return pixels, relative


def test_defaults_are_safe_and_device_aware() -> None:
    assert default_fast_path("cpu") == FastPath(sdpa=True)
    assert default_fast_path("cuda:0") == FastPath(sdpa=True, fuse_qkv=True, channels_last_vae=True)
    # Low-memory mode leaves the fused copies of the projections out (they sit beside the originals).
    assert default_fast_path("cuda", low_memory=True) == FastPath(sdpa=True, channels_last_vae=True)
    assert parse_fast_path("") == parse_fast_path("default") == default_fast_path("cpu")


@pytest.mark.parametrize(
    ("text", "device", "expected"),
    [
        ("compile", "cuda", "sdpa,fuse-qkv,channels-last,compile"),
        ("compile=max-autotune,int8-dynamic", "cpu", "sdpa,compile=max-autotune,int8-dynamic"),
        ("none", "cuda", "none"),
        ("none,sdpa,channels-last", "cpu", "sdpa,channels-last"),
        ("no-sdpa", "cuda", "channels-last"),  # the fused projections need SDPA: they go too
        ("no-fuse-qkv, no-channels-last", "cuda", "sdpa"),
        ("fp8-dynamic,no-dynamic", "cuda", "sdpa,fuse-qkv,channels-last"),
        ("fuse_qkv", "cpu", "sdpa,fuse-qkv"),
    ],
)
def test_parse_fast_path(text: str, device: str, expected: str) -> None:
    fast = parse_fast_path(text, device=device, compile_cache=Path("/cache"))
    assert fast.describe() == expected
    assert fast.compile_cache == (Path("/cache") if fast.compile else None)  # only where there is compiling
    # describe() names exactly what is on: after "none" it gives the same options back.
    assert parse_fast_path(f"none,{fast.describe()}", device=device).describe() == expected


@pytest.mark.parametrize("text", ["bogus", "compile=fast", "sdpa=1", "no-default", "int4-dynamic"])
def test_parse_fast_path_refuses_what_it_does_not_know(text: str) -> None:
    with pytest.raises(ValueError, match="fast path"):
        parse_fast_path(text)


def test_fast_path_checks_itself() -> None:
    with pytest.raises(ValueError, match="needs sdpa"):
        FastPath(sdpa=False, fuse_qkv=True)
    with pytest.raises(ValueError, match="compile mode"):
        FastPath(compile="fast")
    with pytest.raises(ValueError, match="dynamic quantization"):
        FastPath(dynamic_quant="int4")


def test_fp8_is_refused_on_a_cpu_with_the_reason(tiny_dir: Path) -> None:
    fast = parse_fast_path("fp8-dynamic")
    with pytest.raises(FastPathUnavailable, match=r"FP8 tensor cores \(compute capability 8.9"):
        check_supported(fast, "cpu")
    pipe = load_pipeline(str(tiny_dir), device="cpu")
    with pytest.raises(FastPathUnavailable, match="fp8-dynamic"):
        apply_fast_path(pipe, fast)
    assert not hasattr(pipe, "farm_fast_path")  # refused before anything changed


@pytest.mark.parametrize("option", list(TOLERANCES))
def test_each_option_stays_within_its_tolerance_of_eager(
    option: str, tiny_dir: Path, eager: tuple[np.ndarray, torch.Tensor]
) -> None:
    pipe = load_pipeline(str(tiny_dir), device="cpu")
    done = apply_fast_path(pipe, parse_fast_path(option))
    assert done and pipe.farm_fast_path == parse_fast_path(option)
    pixels, relative = _difference(_outputs(pipe), eager)
    max_pixels, max_relative = TOLERANCES[option]
    assert pixels <= max_pixels, f"{option}: {pixels} levels"
    assert relative <= max_relative, f"{option}: latent relative error {relative:.2e}"


def test_options_do_what_they_say(tiny_dir: Path) -> None:
    from diffusers.models.attention_processor import AttnProcessor, FusedAttnProcessor2_0

    from models.dynamic_quant import DynamicQuantLinear

    pipe = load_pipeline(str(tiny_dir), device="cpu")
    apply_fast_path(pipe, parse_fast_path("fuse-qkv,channels-last,int8-dynamic"))
    assert {type(p) for p in pipe.transformer.attn_processors.values()} == {FusedAttnProcessor2_0}
    assert pipe.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    quantized = [m for m in pipe.transformer.transformer_blocks.modules() if isinstance(m, DynamicQuantLinear)]
    assert quantized and all(m.weight_q.dtype == torch.int8 for m in quantized)
    assert apply_fast_path(pipe, pipe.farm_fast_path) == []  # applied once: the same again does nothing
    with pytest.raises(ValueError, match="already applied"):
        apply_fast_path(pipe, parse_fast_path("none"))

    plain = load_pipeline(str(tiny_dir), device="cpu")
    apply_fast_path(plain, parse_fast_path("none"))
    assert {type(p) for p in plain.transformer.attn_processors.values()} == {AttnProcessor}
    assert {type(p) for p in plain.vae.attn_processors.values()} == {AttnProcessor}


@pytest.mark.parametrize(("kind", "max_relative"), [("int8", 1e-2), ("fp8", 6e-2)])
def test_dynamic_quant_linear_against_the_float_layer(kind: str, max_relative: float) -> None:
    from models.dynamic_quant import DynamicQuantLinear, quantize_linears

    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 128)
    x = torch.randn(3, 40, 256)
    quantized = DynamicQuantLinear(linear, kind)
    with torch.no_grad():
        expected, got = linear(x), quantized(x)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert float((got - expected).norm() / expected.norm()) <= max_relative
    # Layers whose sizes the kernels cannot take (not multiples of 16) stay as they are.
    model = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 10))
    assert quantize_linears(model, kind) == 1
    assert isinstance(model[0], DynamicQuantLinear) and isinstance(model[1], torch.nn.Linear)


def test_fp8_numerics_within_tolerance(
    tiny_dir: Path, eager: tuple[np.ndarray, torch.Tensor], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp8-dynamic's arithmetic on torch's CPU reference kernel (the hardware check patched out: a CPU has no FP8
    tensor cores, so a worker refuses it there)."""
    monkeypatch.setattr("models.fastpath.check_supported", lambda fast, device: None)
    pipe = load_pipeline(str(tiny_dir), device="cpu")
    apply_fast_path(pipe, parse_fast_path("fp8-dynamic"))
    pixels, relative = _difference(_outputs(pipe), eager)
    assert pixels <= FP8_TOLERANCE[0], f"{pixels} levels"
    assert relative <= FP8_TOLERANCE[1], f"latent relative error {relative:.2e}"


def test_a_batch_is_decoded_in_one_vae_call(tiny_dir: Path) -> None:
    """Batched VAE decode: render_batch's one pipeline call decodes the whole batch at once (not per image)."""
    pipe = load_pipeline(str(tiny_dir), device="cpu")
    batches: list[int] = []
    hook = pipe.vae.decoder.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    try:
        render_batch(pipe, [*REQUESTS, RenderRequest(prompt="a dog", seed=9, width=128, height=128)])
    finally:
        hook.remove()
    assert batches == [3]


@pytest.fixture()
def inductor_setting() -> Iterator[Any]:
    """torch's Inductor config, its fx_graph_cache put back after the test (the fast path turns it on). Set and
    restored as the fast path sets it: monkeypatch's undo deletes the attribute, which torch's config module refuses
    to know again afterwards."""
    import torch._inductor.config as inductor_config

    saved = inductor_config.fx_graph_cache
    yield inductor_config
    inductor_config.fx_graph_cache = saved


def test_compile_within_tolerance_and_its_cache_persists(
    tiny_dir: Path,
    eager: tuple[np.ndarray, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    inductor_setting: Any,
) -> None:
    """torch.compile with Inductor on this CPU (slow: a few minutes on a busy 2-core machine, most of it compiling C++
    kernels of the transformer and the VAE decoder once). The compiled code lands in the cache folder, and after
    dynamo forgets everything a second compile loads it from there (what a second worker on the machine does)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(name, os.environ.get(name, ""))  # restored after the test
    cache = tmp_path / "models" / "compile-cache"
    torch._dynamo.reset()
    try:
        pipe = load_pipeline(str(tiny_dir), device="cpu")
        done = apply_fast_path(pipe, parse_fast_path("compile", compile_cache=cache))
        assert f"compile cache: {cache}" in done
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
        pixels, relative = _difference(_outputs(pipe), eager)
        assert pixels <= COMPILE_TOLERANCE[0], f"{pixels} levels"
        assert relative <= COMPILE_TOLERANCE[1], f"latent relative error {relative:.2e}"
        written = [p for p in cache.rglob("*") if p.is_file()]
        assert any("fxgraph" in p.parts for p in written), sorted(str(p) for p in written)[:20]

        torch._dynamo.reset()
        counters.clear()
        again = load_pipeline(str(tiny_dir), device="cpu")
        apply_fast_path(again, parse_fast_path("compile", compile_cache=cache))
        render_batch(again, REQUESTS, output_type="latent")  # the same shapes: the transformer's graph again
        assert counters["inductor"]["fxgraph_cache_hit"] > 0, dict(counters["inductor"])
    finally:
        torch._dynamo.reset()


def test_the_worker_applies_its_fast_path_when_it_loads_a_pipeline(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inductor_setting: Any
) -> None:
    """FARM_FAST_PATH / --fast-path / a pool's fast_path reaches PipelineCache._load; the compile cache is the
    models volume's. (Module.compile compiles on the first call, so nothing is compiled here.)"""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    from farm.settings import load_settings
    from workers.caches import PipelineCache

    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    settings = load_settings(
        {"FARM_FAST_PATH": "fuse-qkv,channels-last,compile"}, home=str(tmp_path / "home"), device="cpu"
    )
    assert settings.compile_cache_path == tmp_path / "home" / "models" / "compile-cache"
    pipe = PipelineCache(settings).get(str(tiny_dir))
    assert pipe.farm_fast_path == FastPath(
        sdpa=True,
        fuse_qkv=True,
        channels_last_vae=True,
        compile="default",
        compile_cache=settings.compile_cache_path,
    )
    assert {type(p) for p in pipe.transformer.attn_processors.values()} == {FusedAttnProcessor2_0}
    assert pipe.transformer._compiled_call_impl is not None and pipe.vae.decoder._compiled_call_impl is not None
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(settings.compile_cache_path)
    assert settings.compile_cache_path.is_dir()

    default = PipelineCache(load_settings({}, home=str(tmp_path / "h2"), device="cpu")).get(str(tiny_dir))
    assert default.farm_fast_path == default_fast_path("cpu")


def test_the_worker_command_refuses_a_bad_fast_path(tmp_path: Path) -> None:
    from tests.support.processes import farm_env, run_farm

    env = farm_env(FARM_HOME=str(tmp_path / "home"), FARM_DEVICE="cpu")
    bad = run_farm(["worker", "--fast-path", "sdpa,turbo"], env)
    assert bad.returncode == 2 and "unknown item 'turbo'" in bad.stderr, bad.stderr
    fp8 = run_farm(["worker", "--fast-path", "fp8-dynamic"], env)
    assert fp8.returncode == 2 and "FP8 tensor cores" in fp8.stderr, fp8.stderr


def test_flop_count_matches_torchs_counter(tiny_dir: Path) -> None:
    """models/flops.py against torch.utils.flop_counter on the real tiny model (CPU) and on PixArt-δ 1024's full
    transformer and VAE (meta tensors: shapes only), and the figure per 1024 px image."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from models.flops import image_flops, render_flops, transformer_flops, vae_decode_flops

    pipe = load_pipeline(str(tiny_dir), device="cpu")
    # The math attention: torch's counter does not count the CPU's fused SDPA kernel (it does the GPU's).
    apply_fast_path(pipe, parse_fast_path("none"))
    transformer, vae = pipe.transformer, pipe.vae
    latents = torch.randn(2, 4, 16, 16)
    embeds = torch.randn(2, 120, transformer.config.caption_channels)
    with FlopCounterMode(display=False) as counted, torch.inference_mode():
        transformer(
            latents, encoder_hidden_states=embeds, timestep=torch.tensor([999, 999]), added_cond_kwargs=NO_CONDITIONS
        )
    assert counted.get_total_flops() == pytest.approx(
        transformer_flops(transformer.config, 128, 128, batch=2), rel=1e-6
    )
    with FlopCounterMode(display=False) as counted, torch.inference_mode():
        vae.decode(latents)
    assert counted.get_total_flops() == pytest.approx(vae_decode_flops(vae.config, 128, 128, batch=2), rel=1e-6)
    assert image_flops(pipe, 128, 128, 4) == render_flops(transformer.config, vae.config, 128, 128, 4)
    assert image_flops(object(), 128, 128, 4) is None  # not a PixArt pipeline: no count rather than a wrong one

    with torch.device("meta"):
        full = PixArtTransformer2DModel(
            num_attention_heads=16,
            attention_head_dim=72,
            in_channels=4,
            out_channels=8,
            num_layers=28,
            cross_attention_dim=1152,
            caption_channels=4096,
            sample_size=128,
            patch_size=2,
            norm_type="ada_norm_single",
            use_additional_conditions=True,
        )
        sd_vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=1024,
        )
        big = torch.randn(1, 4, 128, 128)
        cond = {"resolution": torch.tensor([[1024.0, 1024.0]]), "aspect_ratio": torch.tensor([[1.0]])}
        with FlopCounterMode(display=False) as counted, torch.inference_mode():
            full(
                big,
                encoder_hidden_states=torch.randn(1, 120, 4096),
                encoder_attention_mask=torch.ones(1, 120),
                timestep=torch.tensor([999]),
                added_cond_kwargs=cond,
            )
        assert counted.get_total_flops() == pytest.approx(transformer_flops(full.config, 1024, 1024), rel=1e-6)
        with FlopCounterMode(display=False) as counted, torch.inference_mode():
            sd_vae.decode(big)
        assert counted.get_total_flops() == pytest.approx(vae_decode_flops(sd_vae.config, 1024, 1024), rel=1e-6)
    per_image = render_flops(full.config, sd_vae.config, 1024, 1024, 4)
    assert per_image == pytest.approx(36.5e12, rel=0.01)  # 4 × 6.51 (transformer) + 10.47 (decode) TFLOPs
    assert render_flops(full.config, sd_vae.config, 1024, 1024, 4, cfg=True) == pytest.approx(
        per_image + 4 * transformer_flops(full.config, 1024, 1024)
    )


def test_peak_table_and_override() -> None:
    from models.flops import device_peak_flops, peak_bf16_flops

    assert peak_bf16_flops("NVIDIA H200") == 989e12
    assert peak_bf16_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_bf16_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_bf16_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_bf16_flops("NVIDIA L40S") == 362e12 and peak_bf16_flops("NVIDIA L4") == 121e12
    assert peak_bf16_flops("Some Future GPU") is None
    assert device_peak_flops("cpu") is None  # a CPU has no MFU unless a peak is configured
    assert device_peak_flops("cpu", 1.5) == 1.5e12


def test_settings_and_pools_carry_the_fast_path(tmp_path: Path) -> None:
    from farm.errors import ConfigError
    from farm.settings import load_settings

    env = {"FARM_FAST_PATH": "compile=max-autotune", "FARM_PEAK_TFLOPS": "774", "FARM_COMPILE_CACHE": "/models/cc"}
    settings = load_settings(env, home=str(tmp_path))
    assert (settings.fast_path, settings.peak_tflops) == ("compile=max-autotune", 774.0)
    assert settings.compile_cache_path == Path("/models/cc")
    assert load_settings({}, home=str(tmp_path)).fast_path == "default"
    with pytest.raises(ConfigError, match="peak_tflops"):
        load_settings({"FARM_PEAK_TFLOPS": "-1"}, home=str(tmp_path))
    config = tmp_path / "farm.toml"
    config.write_text('[pools.h200]\nfast_path = "compile,fp8-dynamic"\ndtype = "bfloat16"\n')
    assert load_settings({}, home=str(tmp_path), config_file=config).pool("h200")["fast_path"] == "compile,fp8-dynamic"
    config.write_text("[pools.h200]\nfast_path = true\n")
    with pytest.raises(ConfigError, match="fast_path must be str"):
        load_settings({}, home=str(tmp_path), config_file=config)

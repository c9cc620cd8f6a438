"""Tests for models.controlnet: the ControlNet-Transformer's wiring, zero behaviour and checkpoint formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import PixArtTransformer2DModel
from safetensors.torch import load_file, save_file

from models.controlnet import (
    PixArtControlNetAdapter,
    PixArtControlNetTransformer,
    convert_original_controlnet,
    load_controlnet,
)
from models.tiny import build_tiny_transformer


@pytest.fixture(scope="module")
def transformer() -> torch.nn.Module:
    """The tiny 2-block PixArt transformer with fixed random weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return build_tiny_transformer()


def _inputs(batch: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random latents, text, mask and timesteps shaped as the pipeline passes them."""
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, 120)
    mask[:, 40:] = 0
    return {
        "hidden_states": torch.randn(batch, 4, 16, 16, generator=generator),
        "encoder_hidden_states": torch.randn(batch, 120, 32, generator=generator),
        "encoder_attention_mask": mask,
        "timestep": torch.tensor([999, 259] * batch)[:batch],
    }


def _condition(batch: int = 2, seed: int = 1) -> torch.Tensor:
    """Random condition latents."""
    return torch.randn(batch, 4, 16, 16, generator=torch.Generator().manual_seed(seed))


def _nonzero(adapter: PixArtControlNetAdapter, seed: int = 3) -> PixArtControlNetAdapter:
    """Give every before_proj/after_proj random non-zero weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, param in adapter.named_parameters():
            if "_proj." in name:
                torch.nn.init.normal_(param, std=0.1)
    return adapter


def _run(model: torch.nn.Module, **kwargs: torch.Tensor | float) -> torch.Tensor:
    """Run a transformer forward without autograd and return the sample."""
    with torch.no_grad():
        return model(**kwargs).sample


def test_zero_adapter_gives_exactly_base_output(transformer: torch.nn.Module) -> None:
    """An adapter fresh from from_transformer leaves the base output bit-identical."""
    adapter = PixArtControlNetAdapter.from_transformer(transformer, num_layers=1)
    for param_name, param in adapter.named_parameters():
        if "_proj." in param_name:
            assert not param.any(), param_name
    controlled = PixArtControlNetTransformer(transformer, adapter)
    inputs = _inputs()
    base = _run(transformer, **inputs)
    assert torch.equal(_run(controlled, **inputs, controlnet_cond=_condition()), base)
    # Without a condition the wrapper is the base model.
    assert torch.equal(_run(controlled, **inputs), base)


def test_copies_start_as_base_blocks(transformer: torch.nn.Module) -> None:
    """from_transformer copies base block i's weights into copy i and takes its hyper-parameters."""
    adapter = PixArtControlNetAdapter.from_transformer(transformer, num_layers=1)
    copied = adapter.controlnet_blocks[0].transformer_block.state_dict()
    for key, value in transformer.transformer_blocks[0].state_dict().items():
        assert torch.equal(copied[key], value), key
    assert adapter.config.num_attention_heads == transformer.config.num_attention_heads
    assert adapter.config.cross_attention_dim == transformer.config.cross_attention_dim
    with pytest.raises(ValueError, match="num_layers"):
        PixArtControlNetAdapter.from_transformer(transformer, num_layers=2)


def test_nonzero_projections_change_output_and_scale_zero_restores_base(transformer: torch.nn.Module) -> None:
    """Trained projections steer the output; conditioning_scale=0 gives the base output exactly."""
    controlled = PixArtControlNetTransformer(
        transformer, _nonzero(PixArtControlNetAdapter.from_transformer(transformer, 1))
    )
    inputs = _inputs()
    base = _run(transformer, **inputs)
    steered = _run(controlled, **inputs, controlnet_cond=_condition())
    assert (steered - base).abs().max() > 1e-3
    assert torch.equal(_run(controlled, **inputs, controlnet_cond=_condition(), conditioning_scale=0.0), base)
    other = _run(controlled, **inputs, controlnet_cond=_condition(seed=9))
    assert not torch.equal(steered, other)


def test_condition_repeats_over_a_cfg_doubled_batch(transformer: torch.nn.Module) -> None:
    """Conditions for B images line up with the 2B rows classifier-free guidance runs."""
    controlled = PixArtControlNetTransformer(
        transformer, _nonzero(PixArtControlNetAdapter.from_transformer(transformer, 1))
    )
    cond = _condition(batch=2)
    doubled = {key: torch.cat([value, value]) for key, value in _inputs(batch=2).items()}
    out = _run(controlled, **doubled, controlnet_cond=cond)
    single = _run(controlled, **_inputs(batch=2), controlnet_cond=cond)
    torch.testing.assert_close(out[:2], single, rtol=0, atol=1e-5)
    torch.testing.assert_close(out[2:], single, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="spread"):
        _run(controlled, **_inputs(batch=2), controlnet_cond=_condition(batch=3))


def test_tuple_output_matches_base(transformer: torch.nn.Module) -> None:
    """return_dict=False returns a one-tuple like the base model."""
    controlled = PixArtControlNetTransformer(transformer, PixArtControlNetAdapter.from_transformer(transformer, 1))
    with torch.no_grad():
        out = controlled(**_inputs(), controlnet_cond=_condition(), return_dict=False)
    assert isinstance(out, tuple) and len(out) == 1
    assert controlled.config is transformer.config
    assert (controlled.dtype, controlled.device) == (transformer.dtype, transformer.device)


def test_save_and_load_keeps_outputs_bit_identical(transformer: torch.nn.Module, tmp_path: Path) -> None:
    """save_pretrained then from_pretrained round-trips config and weights exactly."""
    adapter = _nonzero(PixArtControlNetAdapter.from_transformer(transformer, 1))
    adapter.save_pretrained(tmp_path / "adapter")
    loaded = PixArtControlNetAdapter.from_pretrained(tmp_path / "adapter")
    inputs = {**_inputs(), "controlnet_cond": _condition()}
    expected = _run(PixArtControlNetTransformer(transformer, adapter), **inputs)
    assert torch.equal(_run(PixArtControlNetTransformer(transformer, loaded), **inputs), expected)
    drop = {"_name_or_path"}
    assert {k: v for k, v in loaded.config.items() if k not in drop} == {
        k: v for k, v in adapter.config.items() if k not in drop
    }


def test_diffusers_format_key_names(transformer: torch.nn.Module, tmp_path: Path) -> None:
    """Saved keys follow the released diffusers-format adapter's naming."""
    adapter = PixArtControlNetAdapter(num_layers=3, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16)
    adapter.save_pretrained(tmp_path / "adapter")
    keys = set(load_file(tmp_path / "adapter" / "diffusion_pytorch_model.safetensors"))
    block_keys = {f"transformer_block.{k}" for k in transformer.transformer_blocks[0].state_dict()}
    expected = {"controlnet_blocks.0.before_proj.weight", "controlnet_blocks.0.before_proj.bias"}
    for index in range(3):
        expected |= {f"controlnet_blocks.{index}.{k}" for k in block_keys}
        expected |= {f"controlnet_blocks.{index}.after_proj.weight", f"controlnet_blocks.{index}.after_proj.bias"}
    assert keys == expected
    assert "controlnet_blocks.1.transformer_block.attn1.to_q.weight" in keys


def test_released_config_with_only_num_layers_means_xl2_sizes(tmp_path: Path) -> None:
    """A folder whose config holds only num_layers (the released HED form) loads with PixArt-XL-2 sizes."""
    folder = tmp_path / "hed"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "PixArtControlNetAdapterModel", "num_layers": 1}))
    reference = PixArtControlNetAdapter(num_layers=1)
    save_file(reference.state_dict(), folder / "diffusion_pytorch_model.safetensors")
    loaded = PixArtControlNetAdapter.from_pretrained(folder)
    assert (loaded.config.num_attention_heads, loaded.config.attention_head_dim) == (16, 72)
    assert loaded.controlnet_blocks[0].after_proj.weight.shape == (1152, 1152)
    assert PixArtControlNetAdapter().config.num_layers == 13
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# Inverse of convert_original_controlnet, for the round-trip test: ours → the original repository's names.
_INVERSE_PLAIN = {
    "scale_shift_table": "scale_shift_table",
    "attn1.to_out.0": "attn.proj",
    "attn2.to_q": "cross_attn.q_linear",
    "attn2.to_out.0": "cross_attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}


def _to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Build an original-format checkpoint (fused qkv and kv) from an adapter state dict."""
    original: dict[str, torch.Tensor] = {}
    indices = {int(key.split(".")[1]) for key in state}
    for i in indices:
        block = f"controlnet_blocks.{i}.transformer_block."
        out = f"controlnet.{i}.copied_block."
        for param in ("weight", "bias"):
            original[f"{out}attn.qkv.{param}"] = torch.cat([state[f"{block}attn1.to_{x}.{param}"] for x in "qkv"])
            original[f"{out}cross_attn.kv_linear.{param}"] = torch.cat(
                [state[f"{block}attn2.to_{x}.{param}"] for x in "kv"]
            )
            for ours, theirs in _INVERSE_PLAIN.items():
                if ours != "scale_shift_table":
                    original[f"{out}{theirs}.{param}"] = state[f"{block}{ours}.{param}"]
            for proj in ("before_proj", "after_proj"):
                key = f"controlnet_blocks.{i}.{proj}.{param}"
                if key in state:
                    original[f"controlnet.{i}.{proj}.{param}"] = state[key]
        original[f"{out}scale_shift_table"] = state[f"{block}scale_shift_table"]
    return original


def test_original_checkpoint_converts_to_the_same_model(transformer: torch.nn.Module) -> None:
    """An original-format state dict, converted and loaded, gives the outputs of the weights set directly."""
    big = PixArtTransformer2DModel.from_config({**transformer.config, "num_layers": 4})
    adapter = PixArtControlNetAdapter.from_transformer(big, num_layers=3)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        for param in adapter.parameters():
            torch.nn.init.normal_(param, std=0.1)
    original = _to_original(adapter.state_dict())
    assert "controlnet.0.copied_block.attn.qkv.weight" in original
    # Base-model keys in the same file are ignored, and a DDP "module." prefix is accepted.
    original["blocks.0.attn.qkv.weight"] = torch.zeros(3)
    converted = convert_original_controlnet({f"module.{k}": v for k, v in original.items()})
    assert set(converted) == set(adapter.state_dict())
    fresh = PixArtControlNetAdapter.from_config(adapter.config)
    fresh.load_state_dict(converted, strict=True)
    inputs = {**_inputs(), "controlnet_cond": _condition()}
    expected = _run(PixArtControlNetTransformer(big, adapter), **inputs)
    assert torch.equal(_run(PixArtControlNetTransformer(big, fresh), **inputs), expected)


def test_unknown_controlnet_key_is_named(transformer: torch.nn.Module) -> None:
    """A controlnet key the converter does not know raises ValueError naming it."""
    original = _to_original(PixArtControlNetAdapter.from_transformer(transformer, 1).state_dict())
    original["controlnet.0.copied_block.attn.rope.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"controlnet\.0\.copied_block\.attn\.rope\.weight"):
        convert_original_controlnet(original)
    with pytest.raises(ValueError, match="no `controlnet"):
        convert_original_controlnet({"blocks.0.attn.qkv.weight": torch.zeros(1)})


def test_load_controlnet_reads_original_xl2_file(tmp_path: Path) -> None:
    """An original-format file at PixArt-XL-2 width loads through load_controlnet with its layer count."""
    adapter = PixArtControlNetAdapter(num_layers=1)
    # The original repository saves {"state_dict": ...}.
    torch.save({"state_dict": _to_original(adapter.state_dict())}, tmp_path / "PixArt-ControlNet.pth")
    loaded = load_controlnet(tmp_path / "PixArt-ControlNet.pth", dtype=torch.float32)
    assert loaded.config.num_layers == 1
    for key, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key

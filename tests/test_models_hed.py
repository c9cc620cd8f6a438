"""Tests for models.hed (the HED soft-edge network and its loader), the HED condition encoding and the
`farm condition hed` / `farm models make-random-hed` commands. Random weights only: nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image

from farm.cli import main
from models.conditions import encode_condition, fit_condition, hed, load_condition_image
from models.hed import (
    HED_FILENAME,
    HED_HUB_ID,
    HEDLoadError,
    HEDNetwork,
    edge_map_image,
    load_hed,
    save_random_hed,
    soft_edges,
    weights_sha256,
)
from models.tiny import build_tiny_vae

# ControlNetHED.pth's layout (lllyasviel/Annotators), written out: the loader must accept exactly these.
CHECKPOINT_LAYOUT: list[tuple[str, tuple[int, ...]]] = [
    ("norm", (1, 3, 1, 1)),
    ("block1.convs.0.weight", (64, 3, 3, 3)),
    ("block1.convs.0.bias", (64,)),
    ("block1.convs.1.weight", (64, 64, 3, 3)),
    ("block1.convs.1.bias", (64,)),
    ("block1.projection.weight", (1, 64, 1, 1)),
    ("block1.projection.bias", (1,)),
    ("block2.convs.0.weight", (128, 64, 3, 3)),
    ("block2.convs.0.bias", (128,)),
    ("block2.convs.1.weight", (128, 128, 3, 3)),
    ("block2.convs.1.bias", (128,)),
    ("block2.projection.weight", (1, 128, 1, 1)),
    ("block2.projection.bias", (1,)),
    ("block3.convs.0.weight", (256, 128, 3, 3)),
    ("block3.convs.0.bias", (256,)),
    ("block3.convs.1.weight", (256, 256, 3, 3)),
    ("block3.convs.1.bias", (256,)),
    ("block3.convs.2.weight", (256, 256, 3, 3)),
    ("block3.convs.2.bias", (256,)),
    ("block3.projection.weight", (1, 256, 1, 1)),
    ("block3.projection.bias", (1,)),
    ("block4.convs.0.weight", (512, 256, 3, 3)),
    ("block4.convs.0.bias", (512,)),
    ("block4.convs.1.weight", (512, 512, 3, 3)),
    ("block4.convs.1.bias", (512,)),
    ("block4.convs.2.weight", (512, 512, 3, 3)),
    ("block4.convs.2.bias", (512,)),
    ("block4.projection.weight", (1, 512, 1, 1)),
    ("block4.projection.bias", (1,)),
    ("block5.convs.0.weight", (512, 512, 3, 3)),
    ("block5.convs.0.bias", (512,)),
    ("block5.convs.1.weight", (512, 512, 3, 3)),
    ("block5.convs.1.bias", (512,)),
    ("block5.convs.2.weight", (512, 512, 3, 3)),
    ("block5.convs.2.bias", (512,)),
    ("block5.projection.weight", (1, 512, 1, 1)),
    ("block5.projection.bias", (1,)),
]


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random HED weights in the checkpoint's layout, written once for the module."""
    return save_random_hed(tmp_path_factory.mktemp("hed") / "nested" / HED_FILENAME, seed=0)


@pytest.fixture(scope="module")
def net(weights: Path) -> HEDNetwork:
    return load_hed(weights)


def _photo(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """A noisy image with a bright square: some structure for edges, some texture for the VAE."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 64, size=(size[1], size[0], 3), dtype=np.uint8)
    pixels[size[1] // 4 : 3 * size[1] // 4, size[0] // 4 : 3 * size[0] // 4] += 160
    return Image.fromarray(pixels)


# ---- the network and its weights ----------------------------------------------------------------------


def test_state_dict_is_the_checkpoint_layout() -> None:
    """Key names, order and shapes are ControlNetHED.pth's: 1 norm, 13 convs, 5 projections."""
    layout = [(key, tuple(t.shape)) for key, t in HEDNetwork().state_dict().items()]
    assert layout == CHECKPOINT_LAYOUT
    assert sum(key.endswith("weight") and ".convs." in key for key, _ in layout) == 13
    assert sum(key.endswith("projection.weight") for key, _ in layout) == 5


def test_forward_gives_five_side_outputs_halved_by_each_pool() -> None:
    outputs = HEDNetwork()(torch.rand(1, 3, 37, 50))
    assert [tuple(o.shape) for o in outputs] == [
        (1, 1, 37, 50),
        (1, 1, 18, 25),
        (1, 1, 9, 12),
        (1, 1, 4, 6),
        (1, 1, 2, 3),
    ]


def test_save_random_hed_is_seeded_float16_and_leaves_the_global_rng_alone(tmp_path: Path, weights: Path) -> None:
    before = torch.random.get_rng_state()
    again = save_random_hed(tmp_path / "again" / HED_FILENAME, seed=0)
    assert torch.equal(torch.random.get_rng_state(), before)
    # Byte for byte under the same file name (torch.save records the name in its archive).
    assert weights_sha256(again) == weights_sha256(weights)
    other = torch.load(save_random_hed(tmp_path / "other.pth", seed=1), weights_only=True)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    assert [(k, tuple(t.shape)) for k, t in state.items()] == CHECKPOINT_LAYOUT
    assert all(t.dtype == torch.float16 for t in state.values())
    assert bool((state["norm"] != 0).all())
    assert not torch.equal(other["block1.convs.0.weight"], state["block1.convs.0.weight"])


def test_load_hed_gives_the_saved_network(tmp_path: Path) -> None:
    """A saved network loads strictly (from .pth and .safetensors) and computes exactly what it did."""
    from safetensors.torch import save_file

    torch.manual_seed(5)
    original = HEDNetwork().eval()
    with torch.no_grad():
        original.norm.fill_(100.0)
    torch.save(original.state_dict(), tmp_path / "hed.pth")
    save_file(original.state_dict(), str(tmp_path / "hed.safetensors"))
    x = torch.rand(1, 3, 32, 32) * 255
    with torch.no_grad():
        expected = original(x)
    for name in ("hed.pth", "hed.safetensors"):
        loaded = load_hed(tmp_path / name)
        assert not loaded.training
        assert all(not p.requires_grad and p.dtype == torch.float32 for p in loaded.parameters())
        for got, want in zip(loaded(x), expected, strict=True):
            assert torch.equal(got, want)


def test_load_hed_refuses_extra_missing_and_misshapen_keys(tmp_path: Path, weights: Path) -> None:
    state = torch.load(weights, map_location="cpu", weights_only=True)
    extra = {**state, "block6.projection.weight": torch.zeros(1, 512, 1, 1)}
    missing = {k: v for k, v in state.items() if k != "block3.convs.2.bias"}
    misshapen = {**state, "block2.projection.bias": torch.zeros(2)}
    for name, bad, key in [
        ("extra.pth", extra, "block6.projection.weight"),
        ("missing.pth", missing, "block3.convs.2.bias"),
        ("misshapen.pth", misshapen, "block2.projection.bias"),
    ]:
        torch.save(bad, tmp_path / name)
        with pytest.raises(HEDLoadError, match=key) as caught:
            load_hed(tmp_path / name)
        assert name in str(caught.value)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(HEDLoadError, match=r"garbage\.pth"):
        load_hed(tmp_path / "garbage.pth")
    with pytest.raises(HEDLoadError, match=r"nowhere\.pth"):
        load_hed(tmp_path / "nowhere.pth")
    assert isinstance(HEDLoadError("x"), RuntimeError)


def test_load_hed_checks_the_expected_sha256(weights: Path) -> None:
    actual = weights_sha256(weights)
    load_hed(weights, expected_sha256=actual)
    with pytest.raises(HEDLoadError) as caught:
        load_hed(weights, expected_sha256="0" * 64)
    assert actual in str(caught.value) and "0" * 64 in str(caught.value)


def test_load_hed_from_the_hub_id_downloads_the_checkpoint(weights: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hub id resolves through hf_hub_download (faked here: no network in tests)."""
    import huggingface_hub

    calls: list[tuple[str, str, bool]] = []

    def fake_download(repo_id: str, filename: str, *, local_files_only: bool = False) -> str:
        calls.append((repo_id, filename, local_files_only))
        return str(weights)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    load_hed(HED_HUB_ID, local_files_only=True)
    assert calls == [("lllyasviel/Annotators", "ControlNetHED.pth", True)]


# ---- soft edges ---------------------------------------------------------------------------------------


def test_soft_edges_follow_the_recipe_at_any_size(net: HEDNetwork) -> None:
    """1×1×H×W in [0, 1], deterministic, and sigmoid(mean of the side outputs bilinearly upsampled)."""
    image = _photo((50, 37))
    edges = soft_edges(net, image)
    assert edges.shape == (1, 1, 37, 50) and edges.dtype == torch.float32
    assert 0.0 <= float(edges.min()) <= float(edges.max()) <= 1.0
    assert torch.equal(edges, soft_edges(net, image))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0
    with torch.no_grad():
        sides = [torch.nn.functional.interpolate(p, size=(37, 50), mode="bilinear") for p in net(x * 255.0)]
    expected = torch.sigmoid(torch.cat(sides, dim=1).mean(dim=1, keepdim=True))
    torch.testing.assert_close(edges, expected, rtol=0, atol=1e-6)


def test_edge_map_image_is_rounded_grey_in_three_channels(net: HEDNetwork, tmp_path: Path) -> None:
    edges = soft_edges(net, _photo((50, 37)))
    picture = edge_map_image(edges)
    assert (picture.mode, picture.size) == ("RGB", (50, 37))
    pixels = np.asarray(picture)
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    assert np.array_equal(pixels[..., 0], (edges[0, 0].numpy() * 255).round().astype(np.uint8))
    with pytest.raises(ValueError, match="edge map"):
        edge_map_image(torch.zeros(1, 3, 4, 4))


def test_hed_writes_the_edge_map_of_the_file(net: HEDNetwork, tmp_path: Path) -> None:
    _photo((50, 37)).save(tmp_path / "in.png")
    out = hed(tmp_path / "in.png", tmp_path / "edges" / "out.png", net)
    with Image.open(out) as written:
        assert (written.format, written.mode, written.size) == ("PNG", "RGB", (50, 37))
        expected = edge_map_image(soft_edges(net, load_condition_image(tmp_path / "in.png")))
        assert np.array_equal(np.asarray(written), np.asarray(expected))


# ---- encoding through the VAE -------------------------------------------------------------------------


def test_encode_condition_with_hed_encodes_the_soft_edges(net: HEDNetwork) -> None:
    torch.manual_seed(0)
    vae = build_tiny_vae()
    image = _photo((96, 48))
    latents = encode_condition(vae, image, 64, 64, hed=net)
    assert latents.shape == (1, 4, 8, 8)
    assert torch.equal(latents, encode_condition(vae, image, 64, 64, hed=net))
    assert not torch.allclose(latents, encode_condition(vae, image, 64, 64), atol=1e-3)
    edges = soft_edges(net, fit_condition(image, 64, 64))
    with torch.no_grad():
        expected = vae.encode(edges.repeat(1, 3, 1, 1) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(latents, expected, rtol=0, atol=1e-6)


# ---- the command line ---------------------------------------------------------------------------------


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("FARM_"):
            monkeypatch.delenv(key)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # no farm.toml of the shell's directory
    return tmp_path / "home"


def _farm(home: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["--home", str(home), *args], env=env, catch_exceptions=False)


def test_cli_make_random_hed_then_condition_hed(home: Path, tmp_path: Path) -> None:
    made = _farm(home, "models", "make-random-hed")
    assert made.exit_code == 0, made.output
    default = home / "models" / "hed" / "ControlNetHED.pth"
    assert str(default) in made.output and weights_sha256(default) in made.output
    _photo((50, 37)).save(tmp_path / "photo.png")
    result = _farm(home, "condition", "hed", str(tmp_path / "photo.png"), str(tmp_path / "out" / "edges.png"))
    assert result.exit_code == 0, result.output
    with Image.open(tmp_path / "out" / "edges.png") as edges:
        assert (edges.format, edges.mode, edges.size) == ("PNG", "RGB", (50, 37))
        expected = edge_map_image(soft_edges(load_hed(default), load_condition_image(tmp_path / "photo.png")))
        assert np.array_equal(np.asarray(edges), np.asarray(expected))

    elsewhere = tmp_path / "w" / "hed.pth"
    assert _farm(home, "models", "make-random-hed", str(elsewhere), "--seed", "2").exit_code == 0
    result = _farm(
        home, "condition", "hed", str(tmp_path / "photo.png"), str(tmp_path / "b.png"), "--weights", str(elsewhere)
    )
    assert result.exit_code == 0, result.output
    bad = _farm(home, "condition", "hed", str(tmp_path / "nope.png"), str(tmp_path / "c.png"))
    assert bad.exit_code == 2 and "nope.png" in bad.output


def test_cli_condition_hed_without_weights_says_where_to_get_them(home: Path, tmp_path: Path) -> None:
    _photo().save(tmp_path / "photo.png")
    result = _farm(home, "condition", "hed", str(tmp_path / "photo.png"), str(tmp_path / "out.png"))
    assert result.exit_code == 2
    assert str(home / "models" / "hed" / "ControlNetHED.pth") in result.output
    assert "lllyasviel/Annotators" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.png").exists()
    missing = tmp_path / "no" / "weights.pth"
    result = _farm(
        home, "condition", "hed", str(tmp_path / "photo.png"), str(tmp_path / "out.png"), "--weights", str(missing)
    )
    assert result.exit_code == 2 and str(missing) in result.output
    env_weights = tmp_path / "env" / "hed.pth"
    result = _farm(
        home,
        "condition",
        "hed",
        str(tmp_path / "photo.png"),
        str(tmp_path / "out.png"),
        env={"FARM_HED_WEIGHTS": str(env_weights)},
    )
    assert result.exit_code == 2 and str(env_weights) in result.output


def test_cli_condition_hed_refuses_weights_of_another_layout(home: Path, tmp_path: Path) -> None:
    _photo().save(tmp_path / "photo.png")
    torch.save({"norm": torch.zeros(1, 3, 1, 1)}, tmp_path / "partial.pth")
    partial = str(tmp_path / "partial.pth")
    result = _farm(home, "condition", "hed", str(tmp_path / "photo.png"), str(tmp_path / "o.png"), "--weights", partial)
    assert result.exit_code == 2
    assert "partial.pth" in result.output and "block1.convs.0.weight" in result.output

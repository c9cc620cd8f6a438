"""farm.profiles: what `--model` may name, and where a worker loads each stored model string from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from farm.errors import InvalidSubmission
from farm.profiles import (
    CONTROLNET_PROFILES,
    PROFILES,
    controlnet_source,
    model_source,
    resolve_controlnet,
    resolve_model,
)
from farm.settings import Settings, load_settings


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return load_settings({"FARM_HOME": str(tmp_path / "home")})


def _pipeline_folder(path: Path, sample_size: int | None) -> Path:
    path.mkdir(parents=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": "PixArtAlphaPipeline"}), encoding="utf-8")
    if sample_size is not None:
        (path / "transformer").mkdir()
        (path / "transformer" / "config.json").write_text(json.dumps({"sample_size": sample_size}), encoding="utf-8")
    return path


def test_builtin_profiles() -> None:
    assert set(PROFILES) >= {"tiny", "pixart-lcm-1024"}
    assert PROFILES["pixart-lcm-1024"].hub_id == "PixArt-alpha/PixArt-LCM-XL-2-1024-MS"
    assert PROFILES["pixart-lcm-1024"].native_size == 1024
    assert PROFILES["tiny"].hub_id is None


@pytest.mark.parametrize("name", ["tiny", "pixart-lcm-1024"])
def test_profile_name_resolves_to_itself(name: str) -> None:
    choice = resolve_model(name)
    assert choice.name == name
    assert choice.native_size == PROFILES[name].native_size


def test_local_folder_reads_native_size_from_transformer_config(tmp_path: Path) -> None:
    folder = _pipeline_folder(tmp_path / "my-model", sample_size=64)
    choice = resolve_model(str(folder))
    assert choice.name == str(folder.resolve())
    assert choice.native_size == 512


def test_local_folder_given_relatively_is_stored_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _pipeline_folder(tmp_path / "rel", sample_size=16)
    monkeypatch.chdir(tmp_path)
    choice = resolve_model("rel")
    assert choice.name == str((tmp_path / "rel").resolve())
    assert choice.native_size == 128


def test_local_folder_without_transformer_config_defaults_to_1024(tmp_path: Path) -> None:
    assert resolve_model(str(_pipeline_folder(tmp_path / "m", sample_size=None))).native_size == 1024


def test_folder_without_model_index_is_an_error(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(InvalidSubmission) as info:
        resolve_model(str(folder))
    assert info.value.field == "model"
    assert "model_index.json" in str(info.value)
    assert str(folder) in str(info.value)


@pytest.mark.parametrize("ref", ["org/name", "a.b/c_d-e"])
def test_hub_id_is_accepted(ref: str) -> None:
    choice = resolve_model(ref)
    assert choice.name == ref
    assert choice.native_size == 1024
    assert choice.sampler.name == "own"  # checked against generic limits here, by the worker for real


def test_a_released_hub_id_takes_its_profiles_size_and_sampler() -> None:
    choice = resolve_model("PixArt-alpha/PixArt-XL-2-512x512")
    assert (choice.native_size, choice.sampler.name, choice.sampler.default_steps) == (512, "dpm-solver++", 14)
    assert resolve_model("PixArt-alpha/PixArt-LCM-XL-2-1024-MS").sampler.name == "lcm"


@pytest.mark.parametrize(
    "ref",
    ["not a model!", "just-a-name", "a/b/c", "/org/name", "./org/name", "org/name\n", "org/", "../x/y"],
)
def test_garbage_is_rejected(ref: str) -> None:
    with pytest.raises(InvalidSubmission) as info:
        resolve_model(ref)
    assert info.value.field == "model"
    assert info.value.value == ref
    assert "unknown model" in str(info.value)


def test_empty_reference_is_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Path("") is the working directory; it is not a pipeline folder here, so this is an error.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidSubmission) as info:
        resolve_model("")
    assert info.value.field == "model"


def test_model_source_maps_tiny_to_farm_home(settings: Settings) -> None:
    assert model_source("tiny", settings) == str(settings.home / "models" / "tiny")


def test_model_source_prefers_a_local_copy_of_a_hub_profile(settings: Settings) -> None:
    assert model_source("pixart-lcm-1024", settings) == "PixArt-alpha/PixArt-LCM-XL-2-1024-MS"
    _pipeline_folder(settings.models_dir / "pixart-lcm-1024", sample_size=128)
    assert model_source("pixart-lcm-1024", settings) == str(settings.models_dir / "pixart-lcm-1024")


def test_model_source_passes_other_strings_through(settings: Settings, tmp_path: Path) -> None:
    assert model_source("org/name", settings) == "org/name"
    assert model_source(str(tmp_path / "m"), settings) == str(tmp_path / "m")


# ---- ControlNet adapters --------------------------------------------------------------------------------


def test_builtin_controlnet_profiles() -> None:
    assert CONTROLNET_PROFILES["pixart-hed-controlnet"].hub_id == "raulc0399/pixart-alpha-hed-controlnet"
    assert CONTROLNET_PROFILES["tiny-controlnet"].hub_id is None
    assert resolve_controlnet("tiny-controlnet") == "tiny-controlnet"


def test_controlnet_folder_and_checkpoint_files_are_stored_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "net"
    folder.mkdir()
    (folder / "config.json").write_text("{}", encoding="utf-8")
    checkpoint = tmp_path / "PixArt-XL-2-1024-ControlNet.pth"
    checkpoint.write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    assert resolve_controlnet("net") == str(folder)
    assert resolve_controlnet(checkpoint.name) == str(checkpoint)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("empty-folder", "no config.json"),
        ("missing.safetensors", "does not exist"),
        ("notes.txt", "neither a diffusers folder"),
        ("not a controlnet!", "unknown controlnet"),
        ("", "empty controlnet"),
    ],
)
def test_bad_controlnet_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, message: str) -> None:
    (tmp_path / "empty-folder").mkdir()
    (tmp_path / "notes.txt").write_text("hi", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InvalidSubmission, match=message) as info:
        resolve_controlnet(name)
    assert (info.value.field, info.value.value) == ("controlnet", name)


def test_controlnet_hub_id_is_accepted() -> None:
    assert resolve_controlnet("PixArt-alpha/PixArt-ControlNet") == "PixArt-alpha/PixArt-ControlNet"


def test_controlnet_source(settings: Settings, tmp_path: Path) -> None:
    assert controlnet_source("tiny-controlnet", settings) == str(settings.models_dir / "tiny-controlnet")
    assert controlnet_source("pixart-hed-controlnet", settings) == "raulc0399/pixart-alpha-hed-controlnet"
    local = settings.models_dir / "pixart-hed-controlnet"
    local.mkdir(parents=True)
    (local / "config.json").write_text("{}", encoding="utf-8")
    assert controlnet_source("pixart-hed-controlnet", settings) == str(local)  # a local copy wins
    assert controlnet_source(str(tmp_path / "x.pth"), settings) == str(tmp_path / "x.pth")

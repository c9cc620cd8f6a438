"""Model profiles and model references: what `--model` may name, resolved without importing torch."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from farm.errors import InvalidSubmission
from farm.settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class Profile:
    """A named model: where its weights come from and the size it was trained for."""

    name: str
    hub_id: str | None
    native_size: int
    description: str

    def source(self, settings: Settings) -> str:
        """A local copy under FARM_HOME/models/NAME wins over the hub id (offline machines, caches)."""
        local = settings.models_dir / self.name
        if (local / "model_index.json").is_file() or self.hub_id is None:
            return str(local)
        return self.hub_id


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "pixart-lcm-1024",
            "PixArt-alpha/PixArt-LCM-XL-2-1024-MS",
            1024,
            "PixArt-δ release: PixArt-XL-2 1024px distilled with LCM (4 steps, guidance distilled in)",
        ),
        Profile(
            "bench-small",
            None,
            256,
            "random-weight PixArt-α at 256 px, ~0.3 s a render on a CPU: the load `farm bench` times the farm with",
        ),
        Profile(
            "tiny",
            None,
            128,
            "random-weight PixArt-α architecture for demos and tests (`farm models make-tiny`)",
        ),
    )
}


@dataclass(frozen=True)
class ModelChoice:
    """A validated `--model`: the string stored on each job and the size to default to."""

    name: str
    native_size: int


def resolve_model(ref: str) -> ModelChoice:
    """Accept a profile name, a local diffusers folder or a hub id; anything else is an error."""
    if ref in PROFILES:
        return ModelChoice(ref, PROFILES[ref].native_size)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InvalidSubmission(f"folder {ref!r} has no model_index.json", field="model", value=ref)
        return ModelChoice(str(path.resolve()), _folder_native_size(path))
    if HUB_ID.fullmatch(ref) and not ref.startswith((".", "/")):
        return ModelChoice(ref, 1024)
    known = ", ".join(PROFILES)
    raise InvalidSubmission(
        f"unknown model {ref!r}: not a profile ({known}), an existing folder with model_index.json, "
        "or a hub id like org/name",
        field="model",
        value=ref,
    )


def model_source(model: str, settings: Settings) -> str:
    """What a worker passes to the pipeline loader for a job's stored model string."""
    profile = PROFILES.get(model)
    return profile.source(settings) if profile else model


def _folder_native_size(path: Path) -> int:
    # PixArt's transformer config gives its latent size; the VAE downsamples by 8.
    try:
        config = json.loads((path / "transformer" / "config.json").read_text(encoding="utf-8"))
        return int(config["sample_size"]) * 8
    except (OSError, ValueError, KeyError, TypeError):
        return 1024


# ---- ControlNet adapters ------------------------------------------------------------------------------

CONTROLNET_SUFFIXES = (".pth", ".safetensors")  # original-format checkpoints, converted by the worker


@dataclass(frozen=True)
class ControlNetProfile:
    """A named ControlNet adapter: where its weights come from."""

    name: str
    hub_id: str | None
    description: str

    def source(self, settings: Settings) -> str:
        """A local diffusers folder under FARM_HOME/models/NAME wins over the hub id."""
        local = settings.models_dir / self.name
        if (local / "config.json").is_file() or self.hub_id is None:
            return str(local)
        return self.hub_id


CONTROLNET_PROFILES: dict[str, ControlNetProfile] = {
    p.name: p
    for p in (
        ControlNetProfile(
            "pixart-hed-controlnet",
            "raulc0399/pixart-alpha-hed-controlnet",
            "the released PixArt-α ControlNet (HED soft edges, 13 copied blocks), diffusers format",
        ),
        ControlNetProfile(
            "tiny-controlnet",
            None,
            "random-weight adapter for the tiny model (`farm models make-tiny-controlnet`)",
        ),
    )
}


def resolve_controlnet(ref: str) -> str:
    """The string stored on each job for `--controlnet`: a profile, a local folder or file, or a hub id."""
    if ref in CONTROLNET_PROFILES:
        return ref
    if not ref.strip():
        raise InvalidSubmission("empty controlnet reference", field="controlnet", value=ref)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InvalidSubmission(
                f"folder {ref!r} has no config.json (a diffusers ControlNet folder)", field="controlnet", value=ref
            )
        return str(path.resolve())
    if path.suffix.lower() in CONTROLNET_SUFFIXES:
        if not path.is_file():
            raise InvalidSubmission(f"checkpoint file {ref!r} does not exist", field="controlnet", value=ref)
        return str(path.resolve())
    if path.exists():
        raise InvalidSubmission(
            f"{ref!r} is neither a diffusers folder nor a {' or '.join(CONTROLNET_SUFFIXES)} checkpoint",
            field="controlnet",
            value=ref,
        )
    if HUB_ID.fullmatch(ref) and not ref.startswith((".", "/")):
        return ref
    known = ", ".join(CONTROLNET_PROFILES)
    raise InvalidSubmission(
        f"unknown controlnet {ref!r}: not a profile ({known}), an existing folder with config.json, "
        f"a {' or '.join(CONTROLNET_SUFFIXES)} checkpoint, or a hub id like org/name",
        field="controlnet",
        value=ref,
    )


def controlnet_source(name: str, settings: Settings) -> str:
    """What a worker passes to models.controlnet.load_controlnet for a job's stored controlnet string."""
    profile = CONTROLNET_PROFILES.get(name)
    return profile.source(settings) if profile else name

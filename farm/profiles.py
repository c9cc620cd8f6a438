"""Model profiles and model references: what `--model` may name, resolved without importing torch."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from farm.errors import InvalidSubmission
from farm.settings import Settings

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class Sampler:
    """How a model is sampled, as its release samples it: the scheduler, its defaults and the limits submit checks.

    The worker loads the scheduler itself (models/scheduler.py); this is what the control plane knows without torch.
    """

    name: str  # "lcm", "dpm-solver++", or "own" (a hub id not seen yet: the worker reads its scheduler)
    default_steps: int
    default_guidance: float
    max_steps: int
    cfg: bool  # sampled with classifier-free guidance by default (a distilled model is not)
    note: str

    def check_steps(self, steps: int) -> str | None:
        """Why this sampler cannot take this many steps, or None."""
        if not 1 <= steps <= self.max_steps:
            return f"{self.label} takes 1 to {self.max_steps} steps"
        return None

    def guidance_note(self, guidance: float) -> str | None:
        """A warning for a guidance scale that works but wastes time (CFG on a guidance-distilled model)."""
        if not self.cfg and guidance > 1:
            return (
                f"{self.label} has guidance distilled in: guidance_scale {guidance:g} > 1 runs classifier-free "
                "guidance anyway and doubles the work of every step"
            )
        return None

    @property
    def label(self) -> str:
        """The sampler as a sentence names it."""
        return {"own": "the model's own sampler", "lcm": "LCM"}.get(self.name, self.name)


# PixArt-LCM: 4 steps, guidance distilled in at w=4.5 (the release's app_lcm.py); LCM's skeleton has 50 steps.
LCM = Sampler("lcm", 4, 0.0, 50, False, "LCM, 4 steps, guidance 0 (distilled in)")
# PixArt-XL-2: DPM-Solver++ order 2, 14 steps with CFG 4.5 as the original repository's demos sample it.
DPM_SOLVER = Sampler("dpm-solver++", 14, 4.5, 200, True, "DPM-Solver++ order 2, 14 steps, CFG 4.5")
# A hub id with no profile and no local copy: generic limits here; the worker checks its real scheduler.
OWN = Sampler("own", 20, 4.5, 200, True, "the scheduler the model ships, checked by the worker")
SAMPLERS = {s.name: s for s in (LCM, DPM_SOLVER)}
_SCHEDULER_CLASSES = {"LCMScheduler": LCM, "DPMSolverMultistepScheduler": DPM_SOLVER}


def sampler_named(name: str) -> Sampler:
    """The Sampler for a name the worker reports ("lcm", "dpm-solver++"); OWN for anything else."""
    return SAMPLERS.get(name, OWN)


@dataclass(frozen=True)
class Profile:
    """A named model: where its weights come from, the size it was trained for and how its release samples it."""

    name: str
    hub_id: str | None
    native_size: int
    description: str
    sampler: Sampler | None = None  # None: the local folder's own scheduler decides (the random-weight models)
    download_gb: float | None = None  # what a worker fetches from the hub on first use (the repository's files)

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
            LCM,
            # T5-XXL in fp32 (2 shards, ≈ 19 GB), the transformer (≈ 2.4 GB), the VAE (≈ 0.3 GB).
            download_gb=21.8,
        ),
        Profile(
            "pixart-xl-1024",
            "PixArt-alpha/PixArt-XL-2-1024-MS",
            1024,
            "PixArt-α 1024px, the base the released HED ControlNet was trained on (DPM-Solver++, 14 steps, CFG 4.5)",
            DPM_SOLVER,
            download_gb=21.8,
        ),
        Profile(
            "pixart-xl-512",
            "PixArt-alpha/PixArt-XL-2-512x512",
            512,
            "PixArt-α 512px (DPM-Solver++, 14 steps, CFG 4.5)",
            DPM_SOLVER,
            download_gb=21.8,
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
    """A validated `--model`: the string stored on each job, the size to default to and its sampler."""

    name: str
    native_size: int
    sampler: Sampler = OWN


def resolve_model(ref: str, settings: Settings | None = None) -> ModelChoice:
    """Accept a profile name, a local diffusers folder or a hub id; anything else is an error.

    The sampler comes from the profile, else from the folder's scheduler/scheduler_config.json (a profile without
    a hub id reads its folder under FARM_HOME/models when `settings` says where that is).
    """
    if ref in PROFILES:
        profile = PROFILES[ref]
        sampler = profile.sampler
        if sampler is None:
            folder = settings.models_dir / ref if settings is not None else None
            sampler = folder_sampler(folder) if folder is not None and folder.is_dir() else LCM
        return ModelChoice(ref, profile.native_size, sampler)
    path = Path(ref).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise InvalidSubmission(f"folder {ref!r} has no model_index.json", field="model", value=ref)
        return ModelChoice(str(path.resolve()), _folder_native_size(path), folder_sampler(path))
    if HUB_ID.fullmatch(ref) and not ref.startswith((".", "/")):
        released = next((p for p in PROFILES.values() if p.hub_id == ref), None)
        if released is not None:
            return ModelChoice(ref, released.native_size, released.sampler or OWN)
        return ModelChoice(ref, 1024, OWN)
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


def folder_sampler(path: Path) -> Sampler:
    """The sampler a diffusers folder ships (scheduler/scheduler_config.json); OWN when it is another kind."""
    try:
        config = json.loads((path / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return OWN
    sampler = _SCHEDULER_CLASSES.get(str(config.get("_class_name")), OWN)
    if sampler is DPM_SOLVER and config.get("algorithm_type", "dpmsolver++") != "dpmsolver++":
        return OWN
    return sampler


def weights_present(profile: Profile, settings: Settings) -> bool:
    """Whether this machine has the profile's weights: its folder under FARM_HOME/models or the hub cache."""
    if (settings.models_dir / profile.name / "model_index.json").is_file() or profile.hub_id is None:
        return True
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", "~/.cache/huggingface")) / "hub")
    folder = cache.expanduser() / ("models--" + profile.hub_id.replace("/", "--"))
    return any(folder.glob("snapshots/*/model_index.json"))


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
    """A named ControlNet adapter: where its weights come from and the recipe it is run with.

    base_model: the model profile it runs on (the default `--model`; another model is refused).
    steps: the one step count the recipe uses (None: the base model's sampler limits).
    guidance: the default guidance scale. preprocess: the condition preprocessing `--condition` defaults to.
    """

    name: str
    hub_id: str | None
    description: str
    base_model: str | None = None
    steps: int | None = None
    guidance: float | None = None
    preprocess: str | None = None
    experimental: bool = False

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
            "the released PixArt ControlNet (HED soft edges, 13 copied blocks) as the original demo runs it: on "
            "pixart-xl-1024 with DPM-Solver++, 14 steps, CFG 4.5",
            base_model="pixart-xl-1024",
            steps=14,
            guidance=4.5,
            preprocess="hed",
        ),
        ControlNetProfile(
            "pixart-hed-controlnet-lcm",
            "raulc0399/pixart-alpha-hed-controlnet",
            "EXPERIMENTAL: the same adapter on the LCM transformer (pixart-lcm-1024, 4 steps, guidance 0); it was "
            "trained on pixart-xl-1024 and no released code runs it this way",
            base_model="pixart-lcm-1024",
            steps=4,
            guidance=0.0,
            preprocess="hed",
            experimental=True,
        ),
        ControlNetProfile(
            "tiny-controlnet",
            None,
            "random-weight adapter for the tiny model (`farm models make-tiny-controlnet`)",
            base_model="tiny",
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


# ---- Scorers ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScorerProfile:
    """The models that score a yield-targeted line's images on the worker (models/scoring.py).

    One CLIP forward pass gives the image embedding every score uses: the CLIP score against the prompt, the
    aesthetic predictor (an MLP on that embedding) and the safety checker's concept distances.
    """

    name: str
    clip: str | None  # hub ids; None: local only (FARM_HOME/models/NAME/{clip,aesthetic,safety})
    aesthetic: str | None
    safety: str | None
    note: str

    def sources(self, settings: Settings) -> dict[str, str]:
        """Each part's source: a local copy under FARM_HOME/models/NAME/PART wins over the hub id."""
        local = settings.models_dir / self.name
        parts = {"clip": self.clip, "aesthetic": self.aesthetic, "safety": self.safety}
        found: dict[str, str] = {}
        for part, hub_id in parts.items():
            if (local / part).exists() or (hub_id is None and part == "clip"):
                found[part] = str(local / part)
            elif hub_id is not None:
                found[part] = hub_id
        return found


SCORER_PROFILES: dict[str, ScorerProfile] = {
    p.name: p
    for p in (
        ScorerProfile(
            "clip-l14",
            "openai/clip-vit-large-patch14",
            "camenduru/improved-aesthetic-predictor",
            "CompVis/stable-diffusion-safety-checker",
            "CLIP ViT-L/14, the LAION improved aesthetic predictor, the Stable Diffusion safety checker",
        ),
        ScorerProfile(
            "tiny-scorer",
            None,
            None,
            None,
            "random tiny CLIP, aesthetic and safety models for tests (`farm models make-tiny-scorer`)",
        ),
    )
}


def scorer_sources(name: str, settings: Settings) -> dict[str, str]:
    """What a worker loads for a job's scorer: a profile's parts, or a folder holding clip/ (aesthetic/, safety/)."""
    profile = SCORER_PROFILES.get(name)
    if profile is not None:
        return profile.sources(settings)
    folder = Path(name).expanduser()
    return {part: str(folder / part) for part in ("clip", "aesthetic", "safety") if (folder / part).exists()}


def check_scorer(name: str) -> str:
    """A scorer `--scorer` may name: a profile, or a local folder with a clip/ model in it."""
    if name in SCORER_PROFILES or (Path(name).expanduser() / "clip").is_dir():
        return name
    known = ", ".join(SCORER_PROFILES)
    raise InvalidSubmission(
        f"unknown scorer (profiles: {known}; or a folder holding clip/, aesthetic/ and safety/), got {name!r}",
        field="scorer",
        value=name,
    )

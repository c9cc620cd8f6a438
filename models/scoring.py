"""Score decoded images for yield-targeted datasets: CLIP score, LAION aesthetic, safety flag, embedding, pixel hash.

One batched CLIP vision forward pass serves every score: the CLIP score compares its image embedding with the
prompt's text embedding, the LAION improved aesthetic predictor (an MLP) reads the same embedding L2-normalised, and
the Stable Diffusion safety checker's decision is taken on it too. The CompVis safety checker's vision tower is CLIP
ViT-L/14's (same weights, same projection), so running it again would compute the same embedding a second time;
load_scorers checks that the two towers are the same and refuses a pair that is not.

On-disk formats (what load_scorers reads, what save_tiny_scorers writes):
- clip: a transformers CLIPModel folder with its tokenizer and preprocessor_config.json (a hub id such as
  openai/clip-vit-large-patch14, or a local folder of the same layout).
- aesthetic: a PyTorch state dict of the LAION MLP (keys layers.0.weight … layers.7.bias) in a file named
  sac+logos+ava1-l14-linearMSE.pth: a hub id (the file is fetched from that repo), a local folder holding that
  file, or the path of a .pth file itself. The input dimension is read from layers.0.weight. It is loaded with
  torch.load(weights_only=True): tensors only, no pickled code.
- safety: a diffusers StableDiffusionSafetyChecker folder (config.json + weights), or a hub id.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from models.devices import resolve_device, resolve_dtype
from models.pipeline import ModelLoadError, _looks_like_local_path

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPTokenizer

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
DEFAULT_AESTHETIC = "camenduru/improved-aesthetic-predictor"
AESTHETIC_FILE = "sac+logos+ava1-l14-linearMSE.pth"
DEFAULT_SAFETY = "CompVis/stable-diffusion-safety-checker"

# The LAION improved aesthetic predictor's MLP after its input layer: (out_features, dropout after it).
_AESTHETIC_HIDDEN: tuple[tuple[int, float | None], ...] = ((1024, 0.2), (128, 0.2), (64, 0.1), (16, None), (1, None))

# Safety-checker towers may be stored in another precision than the CLIP model (fp16 copies): compare loosely.
_TOWER_RTOL = 1e-3
_TOWER_ATOL = 1e-4

# PIL resample codes (preprocessor_config.json "resample") → torch interpolate modes.
_RESAMPLE = {2: "bilinear", 3: "bicubic"}

# The tiny models: a CLIP with 32 px images (4×4 patches of 8 px) and 16-dim embeddings.
_TINY_IMAGE_SIZE = 32
_TINY_PROJECTION_DIM = 16
_TINY_MAX_LENGTH = 77  # CLIP's text context, kept so truncation behaves as with the real tokenizer
_TINY_CONCEPTS = 17  # StableDiffusionSafetyChecker's fixed counts
_TINY_SPECIAL_CARE = 3


@dataclass(frozen=True)
class ScoreResult:
    """The scores of one image; see the module docstring for what each model is."""

    clip_score: float  # 100 * max(cos(image_embed, text_embed), 0), the CLIP-score convention
    aesthetic: float | None  # LAION improved aesthetic predictor, its own ~1-10 scale; None without the model
    nsfw: bool | None  # the Stable Diffusion safety checker's flag; None without the model
    embedding: bytes  # the L2-normalised CLIP image embedding, float16 little-endian (np.float16 .tobytes())
    pixel_sha256: str  # sha256 of f"{w}x{h}:RGB:" + raw RGB bytes: the pixels, whatever the PNG metadata


@dataclass(frozen=True)
class _ImageSpec:
    """CLIPImageProcessor's settings: resize (shortest edge, or exact size), center crop, normalise."""

    shortest_edge: int | None
    size: tuple[int, int] | None  # (height, width) when the processor resizes to an exact size
    crop: tuple[int, int]  # (height, width)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mode: str  # torch interpolate mode


@dataclass
class _Safety:
    """What the safety checker's decision needs besides the image embedding (its tower is the CLIP scorer's)."""

    concept_embeds: torch.Tensor
    concept_weights: list[float]
    special_care_embeds: torch.Tensor
    special_care_weights: list[float]


def pixel_sha256(image: Image.Image) -> str:
    """sha256 hex of an image's pixels: f"{w}x{h}:RGB:" then the raw RGB bytes (PNG metadata does not count)."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:RGB:".encode("ascii"))
    digest.update(rgb.tobytes())
    return digest.hexdigest()


@dataclass
class Scorers:
    """The loaded scorers; `score` runs them on a batch of decoded images."""

    clip: CLIPModel
    tokenizer: CLIPTokenizer
    image_spec: _ImageSpec
    aesthetic: torch.nn.Module | None = None
    safety: _Safety | None = None
    model_ids: dict[str, str] = field(default_factory=dict)  # {"clip": source, ...} for what is loaded

    @property
    def device(self) -> torch.device:
        """The device every part runs on (the CLIP model's)."""
        return self.clip.device

    @property
    def max_length(self) -> int:
        """Tokens per prompt: CLIP's 77 (longer prompts are truncated)."""
        return min(int(self.tokenizer.model_max_length), int(_config(self.clip).text_config.max_position_embeddings))

    def to(self, device: str | torch.device) -> Scorers:
        """Move every part to `device` and return self."""
        self.clip.to(device)  # type: ignore[arg-type]  # transformers' decorated `to` confuses mypy
        if self.aesthetic is not None:
            self.aesthetic.to(device)
        if self.safety is not None:
            self.safety.concept_embeds = self.safety.concept_embeds.to(device)
            self.safety.special_care_embeds = self.safety.special_care_embeds.to(device)
        return self

    def pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        """CLIPImageProcessor's preprocessing, in torch on the scorers' device: resize the shortest edge (bicubic,
        antialiased, in PIL's two 8-bit passes), center crop, rescale and normalise.

        Images of one size (a render batch) are resized together; the result is N×3×H×W in the CLIP model's dtype."""
        import numpy as np
        import torch

        spec = self.image_spec
        out = torch.empty((len(images), 3, *spec.crop), dtype=torch.float32, device=self.device)
        groups: dict[tuple[int, int], list[int]] = {}
        rgb = [image.convert("RGB") for image in images]
        for index, image in enumerate(rgb):
            groups.setdefault(image.size, []).append(index)
        for (width, height), indices in groups.items():
            stacked = np.stack([np.asarray(rgb[i]) for i in indices])  # N×H×W×3 uint8
            batch = torch.from_numpy(stacked).to(self.device).permute(0, 3, 1, 2).float()
            new_h, new_w = _resize_size(spec, height, width)
            # As PIL resizes (CLIPImageProcessor's PIL backend): width first, then height, 8-bit levels after each
            # pass. One 2-D pass differs from PIL by up to 15 levels in noisy images (PIL clips the overshoot
            # between passes); two passes match it within one level.
            if new_w != width:
                batch = _resize_pass(batch, (height, new_w), spec.mode)
            if new_h != height:
                batch = _resize_pass(batch, (new_h, new_w), spec.mode)
            crop_h, crop_w = spec.crop
            if crop_h > new_h or crop_w > new_w:
                raise ValueError(f"a {width}x{height} image resizes to {new_w}x{new_h}, smaller than the crop")
            top, left = (new_h - crop_h) // 2, (new_w - crop_w) // 2
            out[indices] = batch[:, :, top : top + crop_h, left : left + crop_w]
        mean = torch.tensor(spec.mean, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(spec.std, device=self.device).view(1, 3, 1, 1)
        return ((out / 255.0 - mean) / std).to(self.clip.dtype)

    def score(self, images: list[Image.Image], prompts: list[str]) -> list[ScoreResult]:
        """Score each image against its prompt: one CLIP vision pass for the batch, one text pass for its distinct
        prompts (truncated to 77 tokens); the aesthetic and safety models read the same image embedding."""
        import numpy as np
        import torch

        if len(images) != len(prompts):
            raise ValueError(f"score needs one prompt per image: {len(images)} images, {len(prompts)} prompts")
        if not images:
            return []
        row_of = {prompt: row for row, prompt in enumerate(dict.fromkeys(prompts))}
        distinct = list(row_of)
        with torch.inference_mode():
            image_embeds = self.clip.get_image_features(pixel_values=self.pixel_values(images)).pooler_output.float()
            tokens = self.tokenizer(
                distinct, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            ).to(self.device)
            text_embeds = self.clip.get_text_features(**tokens).pooler_output.float()
            image_unit = torch.nn.functional.normalize(image_embeds, dim=-1)
            text_unit = torch.nn.functional.normalize(text_embeds, dim=-1)
            rows = torch.tensor([row_of[p] for p in prompts], device=self.device)
            cos = (image_unit * text_unit[rows]).sum(dim=-1)
            clip_scores = (100 * cos.clamp(min=0)).tolist()
            aesthetic: list[float | None] = [None] * len(images)
            if self.aesthetic is not None:
                aesthetic = list(self.aesthetic(image_unit).squeeze(-1).tolist())
            nsfw: list[bool | None] = [None] * len(images)
            if self.safety is not None:
                nsfw = list(_safety_flags(self.safety, image_embeds))
            embeddings = image_unit.cpu().numpy().astype(np.dtype("<f2"))
        return [
            ScoreResult(
                clip_score=float(clip_scores[i]),
                aesthetic=aesthetic[i],
                nsfw=nsfw[i],
                embedding=embeddings[i].tobytes(),
                pixel_sha256=pixel_sha256(image),
            )
            for i, image in enumerate(images)
        ]


def _resize_pass(batch: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """One antialiased resize pass (PIL's kernel for downscaling), rounded and clipped to 8-bit levels."""
    import torch

    resized = torch.nn.functional.interpolate(batch, size=size, mode=mode, align_corners=False, antialias=True)
    return resized.clamp(0, 255).round()


def _resize_size(spec: _ImageSpec, height: int, width: int) -> tuple[int, int]:
    """(height, width) after resizing, as transformers' get_resize_output_image_size computes it."""
    if spec.shortest_edge is None:
        assert spec.size is not None
        return spec.size
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = spec.shortest_edge, int(spec.shortest_edge * long / short)
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _safety_flags(safety: _Safety, image_embeds: torch.Tensor) -> list[bool]:
    """StableDiffusionSafetyChecker.forward's decision (diffusers 0.42) on projected CLIP image embeddings: the same
    cosines, thresholds, 3-decimal rounding and 0.01 adjustment once a special-care concept matches."""
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    special_cos_dist = cosine_distance(image_embeds, safety.special_care_embeds).cpu().float().numpy()
    cos_dist = cosine_distance(image_embeds, safety.concept_embeds).cpu().float().numpy()
    flags = []
    for i in range(image_embeds.shape[0]):
        adjustment = 0.0
        for concept_idx, threshold in enumerate(safety.special_care_weights):
            if round(special_cos_dist[i][concept_idx] - threshold + adjustment, 3) > 0:
                adjustment = 0.01
        flags.append(
            any(
                round(cos_dist[i][concept_idx] - threshold + adjustment, 3) > 0
                for concept_idx, threshold in enumerate(safety.concept_weights)
            )
        )
    return flags


def _config(model: Any) -> Any:
    """A model's config, untyped: transformers types sub-configs as `dict | Config | None`."""
    return model.config


def _locate(kind: str, source: str) -> tuple[str, str]:
    """Return (location, "hub id" | "local path"); a source that looks local must exist (ModelLoadError)."""
    if not _looks_like_local_path(source):
        return source, "hub id"
    path = Path(source).expanduser()
    if not path.exists():
        raise ModelLoadError(f"{kind} model {source!r} does not exist.")
    return str(path), "local path"


def _load_failed(kind: str, where: str, source: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(f"Could not load the {kind} model from {where} {source!r}: {type(exc).__name__}: {exc}")


def _image_spec(location: str, vision_image_size: int) -> _ImageSpec:
    """Read the CLIP folder's preprocessor_config.json (CLIPImageProcessor's settings)."""
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # The PIL class reads the same config as CLIPImageProcessor without needing torchvision; only its settings
    # are used here, the preprocessing itself runs in torch (Scorers.pixel_values).
    processor = CLIPImageProcessorPil.from_pretrained(location)
    size, crop = processor.size, processor.crop_size
    resample = int(processor.resample)
    if resample not in _RESAMPLE:
        raise ValueError(f"unsupported resample {resample} in the CLIP preprocessor config (bilinear or bicubic)")
    crop_hw = (int(crop["height"]), int(crop["width"]))
    if crop_hw != (vision_image_size, vision_image_size):
        raise ValueError(f"the CLIP preprocessor crops {crop_hw} but the vision model takes {vision_image_size} px")
    shortest = size.get("shortest_edge")
    return _ImageSpec(
        shortest_edge=int(shortest) if shortest else None,
        size=None if shortest else (int(size["height"]), int(size["width"])),
        crop=crop_hw,
        mean=tuple(float(v) for v in processor.image_mean),  # type: ignore[arg-type]
        std=tuple(float(v) for v in processor.image_std),  # type: ignore[arg-type]
        mode=_RESAMPLE[resample],
    )


def _load_clip(source: str, torch_dtype: torch.dtype) -> tuple[CLIPModel, CLIPTokenizer, _ImageSpec]:
    from transformers import CLIPModel, CLIPTokenizer

    location, where = _locate("CLIP", source)
    try:
        model = CLIPModel.from_pretrained(location, dtype=torch_dtype).eval()
        tokenizer = CLIPTokenizer.from_pretrained(location)
        spec = _image_spec(location, int(_config(model).vision_config.image_size))
    except Exception as exc:
        raise _load_failed("CLIP", where, source, exc) from exc
    return model, tokenizer, spec


def build_aesthetic_mlp(input_dim: int) -> torch.nn.Sequential:
    """The LAION improved aesthetic predictor's MLP: Linear(in,1024)-Dropout(0.2)-Linear(1024,128)-Dropout(0.2)-
    Linear(128,64)-Dropout(0.1)-Linear(64,16)-Linear(16,1). Its state dict keys are "0.weight" …; the released file
    prefixes them with "layers."."""
    from torch import nn

    layers: list[nn.Module] = []
    width = input_dim
    for out_features, dropout in _AESTHETIC_HIDDEN:
        layers.append(nn.Linear(width, out_features))
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        width = out_features
    return nn.Sequential(*layers).eval()


def _load_aesthetic(source: str) -> tuple[torch.nn.Sequential, int]:
    """Load the LAION MLP; return it (float32, eval) and its input dimension."""
    import torch

    location, where = _locate("aesthetic", source)
    try:
        if where == "hub id":
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo_id=source, filename=AESTHETIC_FILE))
        else:
            path = Path(location)
            if path.is_dir():
                path = path / AESTHETIC_FILE
                if not path.is_file():
                    raise FileNotFoundError(f"no {AESTHETIC_FILE} in the folder")
        state = torch.load(path, map_location="cpu", weights_only=True)
        prefix = "layers."
        if not isinstance(state, dict) or f"{prefix}0.weight" not in state:
            raise ValueError(f"expected a state dict with keys {prefix}0.weight …, the LAION MLP's")
        input_dim = int(state[f"{prefix}0.weight"].shape[1])
        mlp = build_aesthetic_mlp(input_dim)
        mlp.load_state_dict({k.removeprefix(prefix): v for k, v in state.items()}, strict=True)
    except Exception as exc:
        raise _load_failed("aesthetic", where, source, exc) from exc
    return mlp.float().eval(), input_dim


def _load_safety(source: str, clip: CLIPModel, clip_source: str) -> _Safety:
    """Load the safety checker, check its vision tower is the CLIP scorer's, and keep only its concepts."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker

    location, where = _locate("safety", source)
    try:
        checker = StableDiffusionSafetyChecker.from_pretrained(location, dtype=torch.float32)
    except Exception as exc:
        raise _load_failed("safety", where, source, exc) from exc
    both = f"safety checker {source!r} and CLIP model {clip_source!r}"
    theirs = (int(checker.concept_embeds.shape[1]), int(_config(checker).vision_config.image_size))
    ours = (int(_config(clip).projection_dim), int(_config(clip).vision_config.image_size))
    if theirs != ours:
        raise ValueError(
            f"{both} differ: (embedding dim, image size) {theirs} vs {ours}; the safety decision is taken on the "
            "CLIP scorer's image embedding, so their vision towers must be the same"
        )
    # transformers 5: both vision_model attributes are CLIPVisionModel (older checkpoints' keys are renamed on load).
    tower = {f"vision_model.{k}": v for k, v in checker.vision_model.state_dict().items()}
    tower.update({f"visual_projection.{k}": v for k, v in checker.visual_projection.state_dict().items()})
    clip_tower = {f"vision_model.{k}": v for k, v in clip.vision_model.state_dict().items()}
    clip_tower.update({f"visual_projection.{k}": v for k, v in clip.visual_projection.state_dict().items()})
    different = sorted(
        name
        for name in tower.keys() | clip_tower.keys()
        if name not in tower
        or name not in clip_tower
        or tower[name].shape != clip_tower[name].shape
        or not torch.allclose(tower[name].float(), clip_tower[name].float(), rtol=_TOWER_RTOL, atol=_TOWER_ATOL)
    )
    if different:
        raise ValueError(
            f"{both} have different vision towers ({len(different)} tensors differ, e.g. {different[0]}); the "
            "safety decision is taken on the CLIP scorer's image embedding, so their vision towers must be the same"
        )
    return _Safety(
        concept_embeds=checker.concept_embeds.detach().float().clone(),
        concept_weights=[float(w) for w in checker.concept_embeds_weights.tolist()],
        special_care_embeds=checker.special_care_embeds.detach().float().clone(),
        special_care_weights=[float(w) for w in checker.special_care_embeds_weights.tolist()],
    )


def load_scorers(
    clip: str,
    aesthetic: str | None = None,
    safety: str | None = None,
    *,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
) -> Scorers:
    """Load the CLIP scorer and, when given, the aesthetic predictor and the safety checker, on `device`.

    Each source is a hub id or a local path (see the module docstring for the formats); a path that looks local
    must exist. dtype is the CLIP model's: None is float32, a name as models.devices.resolve_dtype reads it
    ("auto" is float16 on CUDA), or a torch.dtype. The aesthetic MLP and the safety math run in float32.
    Raises ModelLoadError when a model cannot be loaded, ValueError when the models do not fit together.
    """
    import torch

    resolved_device = resolve_device(device)
    if dtype is None:
        torch_dtype = torch.float32
    elif isinstance(dtype, str):
        torch_dtype = resolve_dtype(dtype, resolved_device)
    else:
        torch_dtype = dtype
    model, tokenizer, spec = _load_clip(clip, torch_dtype)
    scorers = Scorers(clip=model, tokenizer=tokenizer, image_spec=spec, model_ids={"clip": clip})
    if aesthetic is not None:
        mlp, got = _load_aesthetic(aesthetic)
        expected = int(_config(model).projection_dim)
        if got != expected:
            raise ValueError(
                f"aesthetic model {aesthetic!r} takes {got}-dim embeddings but CLIP model {clip!r} gives {expected}"
            )
        scorers.aesthetic, scorers.model_ids["aesthetic"] = mlp, aesthetic
    if safety is not None:
        scorers.safety, scorers.model_ids["safety"] = _load_safety(safety, model, clip), safety
    return scorers.to(resolved_device)


def build_tiny_clip_tokenizer() -> CLIPTokenizer:
    """A byte-level CLIP tokenizer with no merges (every character a token), built with no files and no network.

    Like CLIP's, it appends "</w>" to a word's last piece and puts <|startoftext|> and <|endoftext|> (also the
    padding) after the byte pieces; 77 tokens at most."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    alphabet = sorted(ByteLevel.alphabet())
    pieces = [*alphabet, *(f"{char}</w>" for char in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=[], model_max_length=_TINY_MAX_LENGTH)


def _tiny_clip_config(tokenizer: CLIPTokenizer) -> Any:
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": _TINY_MAX_LENGTH,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": _TINY_IMAGE_SIZE,
            "patch_size": 8,
        },
        projection_dim=_TINY_PROJECTION_DIM,
    )


def save_tiny_scorers(folder: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write tiny random-weight scorers, built offline from the real classes, under `folder`:
    clip/ (CLIPModel + tokenizer + preprocessor_config.json), aesthetic/sac+logos+ava1-l14-linearMSE.pth (the
    MLP's state dict, input dim 16) and safety/ (a StableDiffusionSafetyChecker whose vision tower is a copy of the
    tiny CLIP's, random concepts). Returns {"clip": path, "aesthetic": path, "safety": path} for load_scorers."""
    import torch
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPModel
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    root = Path(folder)
    paths = {"clip": root / "clip", "aesthetic": root / "aesthetic", "safety": root / "safety"}
    tokenizer = build_tiny_clip_tokenizer()
    config = _tiny_clip_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clip = CLIPModel(CLIPConfig.from_dict(config.to_dict())).eval()
        torch.manual_seed(seed + 1)
        mlp = build_aesthetic_mlp(_TINY_PROJECTION_DIM)
        torch.manual_seed(seed + 2)
        # A config object of its own: CLIPModel set sdpa attention on its copy, which the checker does not support.
        checker = StableDiffusionSafetyChecker(CLIPConfig.from_dict(config.to_dict())).eval()
        with torch.no_grad():
            checker.vision_model.load_state_dict(clip.vision_model.state_dict())
            checker.visual_projection.load_state_dict(clip.visual_projection.state_dict())
            checker.concept_embeds.copy_(torch.randn(_TINY_CONCEPTS, _TINY_PROJECTION_DIM))
            checker.special_care_embeds.copy_(torch.randn(_TINY_SPECIAL_CARE, _TINY_PROJECTION_DIM))
            checker.concept_embeds_weights.fill_(0.8)
            checker.special_care_embeds_weights.fill_(0.8)
    clip.save_pretrained(paths["clip"], safe_serialization=True)
    tokenizer.save_pretrained(paths["clip"])
    size = {"shortest_edge": _TINY_IMAGE_SIZE}
    crop = {"height": _TINY_IMAGE_SIZE, "width": _TINY_IMAGE_SIZE}
    CLIPImageProcessorPil(size=size, crop_size=crop).save_pretrained(paths["clip"])
    paths["aesthetic"].mkdir(parents=True, exist_ok=True)
    torch.save({f"layers.{k}": v for k, v in mlp.state_dict().items()}, paths["aesthetic"] / AESTHETIC_FILE)
    checker.save_pretrained(paths["safety"], safe_serialization=True)
    return paths

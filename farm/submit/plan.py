"""Planning a submission: check the options, read every row, expand each into jobs with their seeds and ids.

Nothing is written here: a Plan is what farm/submit/record.py records once every row has passed.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from farm.errors import InvalidSubmission
from farm.job import JobSpec
from farm.profiles import resolve_controlnet, resolve_model
from farm.storage import Storage
from farm.submit.conditions import MAX_CONDITION_BYTES, ConditionImage, ConditionImages, store_condition
from farm.submit.fields import MAX_SEED, OPTIONS, check_field, field_error
from farm.submit.grid import Axis, parse_grid, variations
from farm.submit.inputs import MAX_LINE_BYTES, Row, read_rows

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
QUANTIZE_CHOICES = ("none", "int8")


@dataclass(frozen=True)
class SubmitOptions:
    """Defaults for every row; a row's own fields override them."""

    dataset: str
    model: str = "tiny"
    width: int | None = None
    height: int | None = None
    num_inference_steps: int = 4
    guidance_scale: float = 0.0
    images_per_prompt: int = 1
    seed: int = 0
    control_image: Path | None = None  # the condition of rows without their own control_image
    controlnet: str | None = None  # profile, diffusers folder, .pth/.safetensors file or hub id
    conditioning_scale: float = 1.0  # for rows without their own; ignored without a controlnet
    quantize: str | None = None  # "int8", or None / "none" for full precision
    vary: tuple[str, ...] = ()  # grid axes, as `--vary` gives them: "seed=0..7", "size=1024x1024,768x1344"
    # Folders besides the prompt file's own that its control_image paths may name (`--control-dir`).
    control_dirs: tuple[Path, ...] = ()
    control_image_max_bytes: int = MAX_CONDITION_BYTES
    max_line_bytes: int = MAX_LINE_BYTES  # a longer prompt line is refused without reading the rest


@dataclass(frozen=True)
class Plan:
    """A validated submission, not yet written."""

    dataset: str
    specs: list[JobSpec]
    duplicates: int
    ids: list[str]  # specs[i]'s job id, computed once
    conditions: tuple[ConditionImage, ...] = ()  # distinct condition images, to store before recording
    rows: int = 0  # prompt rows read
    variations: int = 1  # grid variations of each row (1 without --vary)
    images_per_prompt: int = 1  # the option's value; a row may set its own
    negative_prompts: int = 0  # rows with a negative_prompt, which is not used (NEGATIVE_PROMPT_NOTE)

    @property
    def planned(self) -> int:
        """Jobs the rows expand to, duplicates included."""
        return len(self.specs) + self.duplicates


def validate_dataset_name(name: str) -> str:
    """Dataset names become storage path segments: letters, digits, '.', '_' and '-', no '..'."""
    if not DATASET_NAME.fullmatch(name) or ".." in name:
        raise InvalidSubmission(
            "dataset name must be 1-128 letters, digits, '.', '_' or '-', start with a letter or digit "
            f"and not contain '..'; got {name!r}",
            field="dataset",
            value=name,
        )
    return name


def plan_submission(path: Path, options: SubmitOptions) -> Plan:
    """Read and validate every row before anything is written; the first bad value raises.

    Options are checked before the file is read, so a bad option is reported even for a bad file.
    """
    setup = _setup(options, base_dir=path.expanduser().absolute().parent)
    return _plan(setup, read_rows(path, max_line_bytes=options.max_line_bytes))


def plan_rows(rows: Sequence[Row], options: SubmitOptions, *, base_dir: Path | None) -> Plan:
    """plan_submission for rows already read (farm.Client's lists); their control_image paths resolve inside
    base_dir (None: rows may not name control images)."""
    return _plan(_setup(options, base_dir=base_dir), rows)


@dataclass(frozen=True)
class _Setup:
    """The options of a submission, checked once before any row."""

    options: SubmitOptions
    model: str
    defaults: dict[str, Any]
    control: _Control
    grid: _Grid


def _setup(options: SubmitOptions, *, base_dir: Path | None) -> _Setup:
    validate_dataset_name(options.dataset)
    model = resolve_model(options.model)
    defaults = {
        # `is None`, not `or`: an explicit 0 is a mistake to report, not a request for the default.
        "width": model.native_size if options.width is None else options.width,
        "height": model.native_size if options.height is None else options.height,
        "num_inference_steps": options.num_inference_steps,
        "guidance_scale": options.guidance_scale,
        "images_per_prompt": options.images_per_prompt,
    }
    _check_defaults(defaults, options.seed)
    control = _control_context(base_dir, options)
    return _Setup(options, model.name, defaults, control, _grid(options, control))


def _plan(setup: _Setup, rows: Sequence[Row]) -> Plan:
    options, control, grid = setup.options, setup.control, setup.grid
    specs: list[JobSpec] = []
    ids: list[str] = []
    seen: set[str] = set()
    occurrences: Counter[str] = Counter()
    duplicates = negative_prompts = 0
    for row in rows:
        negative_prompts += _has_negative_prompt(row)
        for spec in _expand(row, setup.defaults, options.seed, setup.model, occurrences, control, grid):
            job_id = spec.id_in(options.dataset)
            if job_id in seen:
                duplicates += 1
                continue
            seen.add(job_id)
            specs.append(spec)
            ids.append(job_id)
    return Plan(
        options.dataset,
        specs,
        duplicates,
        ids,
        control.images.distinct(),
        rows=len(rows),
        variations=len(grid.variations),
        images_per_prompt=options.images_per_prompt,
        negative_prompts=negative_prompts,
    )


def store_conditions(plan: Plan, storage: Storage) -> Plan:
    """Upload each distinct condition image once and return the plan with every job's control_uri set.

    Call between plan_submission and record: a recorded job must never name a condition that is not stored.
    A StorageError aborts before any row is written.
    """
    if not plan.conditions:
        return plan
    uris = {image.sha256: store_condition(image, storage).uri for image in plan.conditions}
    specs = [
        replace(spec, control_uri=uris[spec.control_sha256]) if spec.control_sha256 is not None else spec
        for spec in plan.specs
    ]
    return replace(plan, specs=specs)


def derive_seed(base_seed: int, prompt: str, occurrence: int, index: int) -> int:
    """A per-image seed from the base seed, the prompt, which repeat of it this is and the image index.

    Stable when lines are appended or lines of different prompts are reordered, so a resubmitted file maps
    onto the same jobs; moving repeats of one prompt around swaps which repeat gets which seed.
    """
    digest = hashlib.sha256(f"{base_seed}\0{prompt}\0{occurrence}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def _check_defaults(defaults: dict[str, Any], seed: int) -> None:
    for name, value in defaults.items():
        check_field(OPTIONS, name, value, option=True)
    check_field(OPTIONS, "seed", seed, option=True)


@dataclass(frozen=True)
class _Grid:
    """The --vary axes of a submission, expanded once."""

    axes: tuple[Axis, ...]
    variations: list[dict[str, Any]]

    @property
    def fields(self) -> tuple[str, ...]:
        return tuple(name for axis in self.axes for name in axis.fields)


def _grid(options: SubmitOptions, control: _Control) -> _Grid:
    axes = parse_grid(options.vary)
    grid = _Grid(axes, variations(axes))
    if "seed" in grid.fields and options.images_per_prompt != 1:
        raise InvalidSubmission(
            f"--vary seed sets every image's seed, so --images-per-prompt must be 1, got {options.images_per_prompt}",
            field="images_per_prompt",
            value=options.images_per_prompt,
        )
    if "conditioning_scale" in grid.fields and control.controlnet is None:
        raise InvalidSubmission(
            "--vary conditioning_scale needs --controlnet", field="vary", value="conditioning_scale"
        )
    return grid


def _has_negative_prompt(row: Row) -> bool:
    value = row.fields.get("negative_prompt")
    if value is not None and not isinstance(value, str):
        raise field_error(row, "negative_prompt", value, "negative_prompt must be text")
    return bool(value and value.strip())


@dataclass(frozen=True)
class _Control:
    """What every row's control fields are checked against."""

    controlnet: str | None
    default_image: ConditionImage | None
    default_scale: float
    quantize: str | None
    base_dir: Path | None  # relative control_image paths in the prompt file resolve against its folder
    images: ConditionImages


def _control_context(base_dir: Path | None, options: SubmitOptions) -> _Control:
    """Resolve the ControlNet options once; a default condition image is decoded here, before any row."""
    fake = OPTIONS
    controlnet = resolve_controlnet(options.controlnet) if options.controlnet is not None else None
    quantize = options.quantize
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise field_error(
            fake, "quantize", quantize, f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}", option=True
        )
    scale = check_field(fake, "conditioning_scale", options.conditioning_scale, option=True)
    images = ConditionImages(roots=options.control_dirs, max_bytes=options.control_image_max_bytes)
    default_image = None
    if options.control_image is not None:
        value = str(options.control_image)
        if controlnet is None:
            raise field_error(fake, "control_image", value, "--controlnet is required with control images", option=True)
        default_image = images.check_trusted(Path(value), value)
    return _Control(
        controlnet=controlnet,
        default_image=default_image,
        default_scale=scale,
        quantize=None if quantize == "none" else quantize,
        base_dir=base_dir,
        images=images,
    )


def _row_control(row: Row, control: _Control) -> tuple[str | None, float | None, str | None]:
    """(controlnet, conditioning_scale, control_sha256) of one row; all None for a plain row."""
    raw = row.fields.get("control_image")
    image = control.default_image
    if raw is not None:
        if not isinstance(raw, str) or not raw.strip():
            raise field_error(row, "control_image", raw, "control_image must be a path to an image file")
        if control.controlnet is None:
            raise field_error(row, "control_image", raw, "--controlnet is required with control images")
        if control.base_dir is None:
            raise field_error(
                row, "control_image", raw, "rows from Python name control images inside control_dir=…; give one"
            )
        image = control.images.check_row(raw.strip(), base=control.base_dir, origin=row.path, line=row.line)
    if "conditioning_scale" in row.fields and control.controlnet is None:
        raise field_error(
            row, "conditioning_scale", row.fields["conditioning_scale"], "conditioning_scale needs --controlnet"
        )
    if control.controlnet is None:
        return None, None, None
    if image is None:
        raise field_error(
            row,
            "control_image",
            raw,
            "--controlnet needs a control image for every row: give --control-image or a control_image field",
        )
    scale = control.default_scale
    if "conditioning_scale" in row.fields:
        scale = check_field(row, "conditioning_scale", row.fields["conditioning_scale"])
    return control.controlnet, scale, image.sha256


def _expand(
    row: Row,
    defaults: dict[str, Any],
    base_seed: int,
    model: str,
    occurrences: Counter[str],
    control: _Control,
    grid: _Grid,
) -> list[JobSpec]:
    fields = {**defaults, **row.fields}
    prompt = check_field(row, "prompt", fields.get("prompt"))
    for name in grid.fields:
        # A row's own value would silently win over the grid, or the grid over it: neither is what was meant.
        if name in row.fields:
            raise field_error(row, name, row.fields[name], f"the row sets {name}, which --vary also sets")
    values = {k: check_field(row, k, fields[k]) for k in defaults}
    explicit_seed = check_field(row, "seed", fields["seed"]) if "seed" in fields else None
    if "seed" in grid.fields and values["images_per_prompt"] != 1:
        raise field_error(
            row, "images_per_prompt", fields["images_per_prompt"], "--vary seed needs images_per_prompt 1"
        )
    controlnet, conditioning_scale, control_sha256 = _row_control(row, control)
    occurrence = occurrences[prompt]
    occurrences[prompt] += 1
    specs = []
    for variation in grid.variations:
        varied = {**values, **variation}
        for index in range(values["images_per_prompt"]):
            if "seed" in variation:
                seed = variation["seed"]
            elif explicit_seed is not None:
                seed = explicit_seed + index
                if seed > MAX_SEED:
                    raise field_error(row, "seed", explicit_seed, f"seed + images_per_prompt exceeds {MAX_SEED}")
            else:
                # Not varied by the grid: one prompt's variations share their seeds, so they compare.
                seed = derive_seed(base_seed, prompt, occurrence, index)
            specs.append(
                JobSpec(
                    prompt,
                    seed,
                    varied["width"],
                    varied["height"],
                    varied["num_inference_steps"],
                    varied["guidance_scale"],
                    model,
                    int(row.line),
                    controlnet=controlnet,
                    conditioning_scale=varied.get("conditioning_scale", conditioning_scale) if controlnet else None,
                    control_sha256=control_sha256,
                    quantize=control.quantize,
                    source_file=row.path,
                )
            )
    return specs

"""Planning a submission: check the options, read every row, expand each into jobs with their seeds and ids.

Nothing is written here: a Plan is what farm/submit/record.py records once every row has passed.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from farm.errors import InvalidSubmission
from farm.job import JobSpec, derive_seed
from farm.profiles import (
    CONTROLNET_PROFILES,
    PROFILES,
    ModelChoice,
    check_scorer,
    resolve_controlnet,
    resolve_model,
)
from farm.rules import Rules
from farm.settings import Settings
from farm.storage import Storage
from farm.submit.conditions import MAX_CONDITION_BYTES, ConditionImage, ConditionImages, store_condition
from farm.submit.fields import (
    MAX_SEED,
    OPTIONS,
    SIZE_MULTIPLE,
    SIZE_RANGE,
    FieldProblem,
    check_field,
    check_value,
    field_error,
)
from farm.submit.grid import Axis, parse_grid, variations
from farm.submit.inputs import MAX_LINE_BYTES, Row, read_rows
from farm.submit.rules import RULE_FIELDS, check_rule, row_rules

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
QUANTIZE_CHOICES = ("none", "int8", "int8-transformer")
CONDITION_CHOICES = ("none", "hed")
TIMESTEPS_CHOICES = ("original",)
# Settings' default (the release), for SubmitOptions built without a model; `farm submit` passes the dataset's
# model or FARM_DEFAULT_MODEL.
DEFAULT_MODEL = str(Settings.__dataclass_fields__["default_model"].default)
DEFAULT_SCORER = str(Settings.__dataclass_fields__["default_scorer"].default)


@dataclass(frozen=True)
class SubmitOptions:
    """Defaults for every row; a row's own fields override them."""

    dataset: str
    model: str | None = None  # None: the controlnet profile's base model, else DEFAULT_MODEL
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None  # None: the sampler's (or the controlnet recipe's) default
    guidance_scale: float | None = None
    negative_prompt: str | None = None  # for rows without their own; used where guidance_scale > 1
    images_per_prompt: int = 1
    seed: int = 0
    control_image: Path | None = None  # the condition of rows without their own control_image
    controlnet: str | None = None  # profile, diffusers folder, .pth/.safetensors file or hub id
    conditioning_scale: float = 1.0  # for rows without their own; ignored without a controlnet
    quantize: str | None = None  # "int8" (8-bit T5), "int8-transformer", or None / "none" for full precision
    # "hed": the worker derives the condition with the HED network (weights at hed_weights, hashed into the id);
    # "none": the control images are used as they are; None: the controlnet profile's own preprocessing.
    condition: str | None = None
    hed_weights: Path | None = None
    timesteps: str | None = None  # "original": the original repository's 4 LCM timesteps
    vary: tuple[str, ...] = ()  # grid axes, as `--vary` gives them: "seed=0..7", "size=1024x1024,768x1344"
    # Folders besides the prompt file's own that its control_image paths may name (`--control-dir`).
    control_dirs: tuple[Path, ...] = ()
    control_image_max_bytes: int = MAX_CONDITION_BYTES
    max_line_bytes: int = MAX_LINE_BYTES  # a longer prompt line is refused without reading the rest
    # Acceptance rules for every row without its own (farm/submit/rules.py); all None: no yield-targeted lines.
    accept: int | None = None
    max_tries: int | None = None
    min_clip_score: float | None = None
    min_aesthetic: float | None = None
    safety: str | None = None
    dedup: float | None = None
    keep_rejected: bool = True
    scorer: str | None = None  # the scorer profile for rows whose rules need scores; None: DEFAULT_SCORER


@dataclass(frozen=True)
class LinePlan:
    """A yield-targeted line: its rules and what derives its follow-up tries' seeds."""

    line_id: str  # its try 0's job id
    rules: Rules
    base_seed: int
    occurrence: int
    source: str  # FILE:LINE, for errors about it


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
    negative_prompts: int = 0  # rows with a negative_prompt that is not used (NEGATIVE_PROMPT_NOTE)
    notes: tuple[str, ...] = ()  # warnings to show before recording (nothing is refused for them)
    lines: tuple[LinePlan, ...] = ()  # yield-targeted lines (rows with acceptance rules)

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
    with collector_paused():
        return _plan(setup, read_rows(path, max_line_bytes=options.max_line_bytes))


def plan_rows(rows: Sequence[Row], options: SubmitOptions, *, base_dir: Path | None) -> Plan:
    """plan_submission for rows already read (farm.Client's lists); their control_image paths resolve inside
    base_dir (None: rows may not name control images)."""
    setup = _setup(options, base_dir=base_dir)
    with collector_paused():
        return _plan(setup, rows)


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused, then restored. A large plan allocates millions of objects, none in
    a cycle, and each full collection walks every live one: 5–25 % of planning 100k rows here."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True)
class _Setup:
    """The options of a submission, checked once before any row."""

    options: SubmitOptions
    model: str
    defaults: dict[str, Any]
    control: _Control
    grid: _Grid
    choice: ModelChoice
    pinned_steps: int | None  # the controlnet recipe's one step count
    size_from_condition: bool  # rows without a size take their condition's (the original ControlNet demo's rule)
    rule_options: dict[str, Any]  # the acceptance-rule options given, checked (None values left out)
    scorer: str  # the scorer profile of rows whose rules need scores


def _setup(options: SubmitOptions, *, base_dir: Path | None) -> _Setup:
    validate_dataset_name(options.dataset)
    adapter = CONTROLNET_PROFILES.get(options.controlnet or "")
    model = _model_choice(options, adapter)
    steps = options.num_inference_steps
    guidance = options.guidance_scale
    if steps is None:
        steps = adapter.steps if adapter is not None and adapter.steps else model.sampler.default_steps
    if guidance is None:
        guidance = adapter.guidance if adapter is not None and adapter.guidance is not None else None
        guidance = model.sampler.default_guidance if guidance is None else guidance
    defaults = {
        # `is None`, not `or`: an explicit 0 is a mistake to report, not a request for the default.
        "width": model.native_size if options.width is None else options.width,
        "height": model.native_size if options.height is None else options.height,
        "num_inference_steps": steps,
        "guidance_scale": guidance,
        "images_per_prompt": options.images_per_prompt,
    }
    _check_defaults(defaults, options.seed)
    # Checked once here, so a row that does not set a field takes its value without checking it again.
    defaults = {name: check_value(name, value) for name, value in defaults.items()}
    negative = check_field(OPTIONS, "negative_prompt", options.negative_prompt, option=True)
    if negative is not None:
        defaults["negative_prompt"] = negative
    control = _control_context(base_dir, options, adapter)
    grid = _grid(options, control)
    pinned = adapter.steps if adapter is not None else None
    if options.timesteps is not None:
        if options.timesteps not in TIMESTEPS_CHOICES:
            choices = ", ".join(TIMESTEPS_CHOICES)
            raise field_error(OPTIONS, "timesteps", options.timesteps, f"timesteps must be one of {choices}", True)
        if model.sampler.name != "lcm":
            raise field_error(
                OPTIONS,
                "timesteps",
                options.timesteps,
                f"the original repository's timesteps are LCM timesteps; {model.name} samples with "
                f"{model.sampler.label}",
                True,
            )
    for variation in grid.variations:  # the options' own steps (and the grid's), before any row is read
        _check_steps(OPTIONS, model, pinned, options, variation.get("num_inference_steps", steps))
    size_given = options.width is not None or options.height is not None
    from_condition = (
        control.controlnet is not None
        and not size_given
        and (options.condition is not None or (adapter is not None and adapter.preprocess is not None))
    )
    # The rule options given, checked (the ones not given left out, so a row sees at once that there are none).
    checked_rules = {name: _rule_option(name, getattr(options, name)) for name in RULE_FIELDS}
    rule_options = {name: value for name, value in checked_rules.items() if value is not None}
    scorer = check_scorer(options.scorer or DEFAULT_SCORER)
    if rule_options and "seed" in grid.fields:
        raise InvalidSubmission(
            "--vary seed sets every image's seed, but a line with acceptance rules derives its tries' seeds",
            field="vary",
            value="seed",
        )
    return _Setup(
        options,
        model.name,
        defaults,
        control,
        grid,
        model,
        pinned,
        from_condition,
        rule_options,
        scorer,
    )


def _rule_option(name: str, value: Any) -> Any:
    try:
        return check_rule(name, value)
    except FieldProblem as exc:
        raise field_error(OPTIONS, name, exc.shown, exc.message, option=True) from None


def _model_choice(options: SubmitOptions, adapter: Any) -> ModelChoice:
    """The model: as given, or the controlnet recipe's base model, or the release; refuses a recipe's wrong base."""
    base = adapter.base_model if adapter is not None else None
    if options.model is None:
        return resolve_model(base or DEFAULT_MODEL)
    model = resolve_model(options.model)
    # A release recipe (pinned steps) runs on its own base only; the random-weight adapter fits any tiny folder.
    released = PROFILES.get(base or "") if adapter is not None and adapter.steps is not None else None
    if released is not None and model.name not in (released.name, released.hub_id):
        others = [p.name for p in CONTROLNET_PROFILES.values() if p.base_model == model.name]
        hint = f"; for {model.name} use {' or '.join(others)}" if others else ""
        raise InvalidSubmission(
            f"controlnet {adapter.name} runs on {base} (the model it was trained with){hint}, got model "
            f"{options.model!r}",
            field="model",
            value=options.model,
        )
    return model


def _plan(setup: _Setup, rows: Sequence[Row]) -> Plan:
    options, control, grid = setup.options, setup.control, setup.grid
    specs: list[JobSpec] = []
    ids: list[str] = []
    seen: set[str] = set()
    occurrences: Counter[str] = Counter()
    duplicates = negative_prompts = 0
    notes: dict[str, None] = {}
    lines: dict[str, LinePlan] = {}
    guidance_note = functools.cache(setup.choice.sampler.guidance_note)  # a few distinct scales in a file
    for row in rows:
        row_specs = _expand(row, setup, occurrences, lines)
        negative_prompts += _has_negative_prompt(row) and any(spec.negative_prompt is None for spec in row_specs)
        for spec in row_specs:
            note = guidance_note(spec.guidance_scale)
            if note is not None:
                notes[note] = None
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
        notes=tuple(notes),
        lines=tuple(lines.values()),
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


def _check_defaults(defaults: dict[str, Any], seed: int) -> None:
    for name, value in defaults.items():
        check_field(OPTIONS, name, value, option=True)
    check_field(OPTIONS, "seed", seed, option=True)


@dataclass(frozen=True)
class _Grid:
    """The --vary axes of a submission, expanded once."""

    axes: tuple[Axis, ...]
    variations: list[dict[str, Any]]

    @functools.cached_property
    def fields(self) -> tuple[str, ...]:
        """The fields the axes set (read for every row, so built once)."""
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
    preprocess: str | None = None  # "hed:<weights sha256>" when the worker derives the condition


def _preprocess(options: SubmitOptions, adapter: Any, controlnet: str | None) -> str | None:
    """The job's control_preprocess: "hed:<sha256 of the HED weights>", or None (the image is the condition)."""
    condition = options.condition
    if condition is not None and condition not in CONDITION_CHOICES:
        raise field_error(
            OPTIONS, "condition", condition, f"condition must be one of {', '.join(CONDITION_CHOICES)}", True
        )
    if condition is None:
        condition = adapter.preprocess if adapter is not None and adapter.preprocess else "none"
    if condition == "none":
        return None
    if controlnet is None:
        raise field_error(OPTIONS, "condition", condition, "--condition needs --controlnet", True)
    weights = options.hed_weights
    if weights is None or not weights.is_file():
        raise field_error(
            OPTIONS,
            "condition",
            condition,
            f"HED soft edges need the HED weights on this machine (their sha256 joins each job's id): put "
            f"ControlNetHED.pth (lllyasviel/Annotators, ≈ 29 MB) at {weights} or set FARM_HED_WEIGHTS; "
            "or give edge maps you made with `--condition none`",
            True,
        )
    return f"hed:{file_sha256(weights)}"


def file_sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _control_context(base_dir: Path | None, options: SubmitOptions, adapter: Any = None) -> _Control:
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
        preprocess=_preprocess(options, adapter, controlnet),
    )


def _row_control(row: Row, control: _Control) -> tuple[str | None, float | None, ConditionImage | None]:
    """(controlnet, conditioning_scale, condition image) of one row; all None for a plain row."""
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
    return control.controlnet, scale, image


def _condition_size(image: ConditionImage) -> tuple[int, int]:
    """The job size a condition gives when the job gives none: its own, to the nearest multiple of 16 (the
    original demo renders at the bucket nearest its aspect ratio and returns the condition's size)."""
    low, high = SIZE_RANGE

    def fit(side: int) -> int:
        return min(high, max(low, int(side / SIZE_MULTIPLE + 0.5) * SIZE_MULTIPLE))  # half up

    return fit(image.width), fit(image.height)


def _expand(row: Row, setup: _Setup, occurrences: Counter[str], lines: dict[str, LinePlan]) -> list[JobSpec]:
    defaults, base_seed, model = setup.defaults, setup.options.seed, setup.model
    control, grid = setup.control, setup.grid
    fields = {**defaults, **row.fields}
    prompt = check_field(row, "prompt", fields.get("prompt"))
    for name in grid.fields:
        # A row's own value would silently win over the grid, or the grid over it: neither is what was meant.
        if name in row.fields:
            raise field_error(row, name, row.fields[name], f"the row sets {name}, which --vary also sets")
    controlnet, conditioning_scale, image = _row_control(row, control)
    if setup.size_from_condition and image is not None and "width" not in row.fields and "height" not in row.fields:
        fields["width"], fields["height"] = _condition_size(image)
    values = {
        k: fields[k] if k not in row.fields and fields[k] is defaults[k] else check_field(row, k, fields[k])
        for k in defaults
        if k != "negative_prompt"
    }
    negative = check_field(row, "negative_prompt", fields.get("negative_prompt"))
    explicit_seed = check_field(row, "seed", fields["seed"]) if "seed" in fields else None
    if "seed" in grid.fields and values["images_per_prompt"] != 1:
        raise field_error(
            row, "images_per_prompt", fields["images_per_prompt"], "--vary seed needs images_per_prompt 1"
        )
    control_sha256 = image.sha256 if image is not None else None
    occurrence = occurrences[prompt]
    occurrences[prompt] += 1
    rules = row_rules(
        row,
        setup.rule_options,
        values["images_per_prompt"],
        keep_rejected=setup.options.keep_rejected,
        scorer=setup.scorer,
    )
    if rules is not None and "seed" in grid.fields:
        raise field_error(row, "seed", "--vary seed", "a line with acceptance rules derives its tries' seeds")
    count = rules.accept if rules is not None else values["images_per_prompt"]
    specs = []
    for variation in grid.variations:
        varied = {**values, **variation}
        _check_sampler(row, setup, varied, variation)
        line_id: str | None = None
        for index in range(count):
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
                    # Only where CFG runs does a negative prompt change the image (and join the id).
                    negative_prompt=negative if varied["guidance_scale"] > 1 else None,
                    control_preprocess=control.preprocess if controlnet else None,
                    timesteps=setup.options.timesteps,
                )
            )
            if rules is not None:
                # Every try of the line names its try 0, whose id is the line's: the same on every resubmit.
                line_id = line_id or specs[-1].id_in(setup.options.dataset)
                specs[-1] = replace(specs[-1], scorer=rules.scorer, line_id=line_id, try_index=index)
        if rules is not None and line_id is not None and line_id not in lines:
            lines[line_id] = LinePlan(line_id, rules, base_seed, occurrence, f"{row.path}:{row.line}")
    return specs


def _check_sampler(row: Row, setup: _Setup, varied: dict[str, Any], variation: dict[str, Any]) -> None:
    """A row's own steps against the model's sampler (the options' and the grid's were checked up front)."""
    if "num_inference_steps" in row.fields and "num_inference_steps" not in variation:
        _check_steps(row, setup.choice, setup.pinned_steps, setup.options, varied["num_inference_steps"])


def _check_steps(row: Row, model: ModelChoice, pinned: int | None, options: SubmitOptions, steps: Any) -> None:
    """The steps the model's sampler (and a controlnet recipe, and named timesteps) can take."""
    option = row is OPTIONS
    steps = check_field(row, "num_inference_steps", steps, option)
    problem = model.sampler.check_steps(steps)
    if problem is not None:
        raise field_error(row, "num_inference_steps", steps, f"{problem} ({model.name})", option)
    if pinned is not None and steps != pinned:
        message = f"controlnet {options.controlnet} reproduces its release's recipe at {pinned} steps"
        raise field_error(row, "num_inference_steps", steps, message, option)
    if options.timesteps is not None and steps != 4:
        raise field_error(row, "num_inference_steps", steps, f"timesteps {options.timesteps!r} are 4 steps", option)

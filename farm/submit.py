"""Submitting: validate every row of a prompt file, then record the dataset and its jobs in one transaction."""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from sqlalchemy import Column, MetaData, Table, insert, select, true
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from farm.conditions import ConditionImage, ConditionImages, store_condition
from farm.errors import InvalidSubmission
from farm.inputs import Row, read_rows
from farm.profiles import resolve_controlnet, resolve_model
from farm.schema import Dataset, Job, JobStatus, utcnow
from farm.storage import Storage

DATASET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 10_000
_INSERT_CHUNK = 5_000

# Limits (inclusive). Sizes must be multiples of 16: the VAE downsamples by 8 and the transformer's patches are 2.
SIZE_RANGE = (64, 4096)
SIZE_MULTIPLE = 16
STEPS_RANGE = (1, 50)  # LCM cannot take more steps than its 50 original ones
GUIDANCE_RANGE = (0.0, 30.0)
IMAGES_PER_PROMPT_RANGE = (1, 10_000)
CONDITIONING_SCALE_RANGE = (0.0, 2.0)
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


@dataclass(frozen=True)
class JobSpec:
    """One image, fully determined: its id is a hash of the dataset and all of these fields but the line and URI."""

    prompt: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    model: str
    source_line: int
    controlnet: str | None = None
    conditioning_scale: float | None = None
    control_sha256: str | None = None
    control_uri: str | None = None  # set by store_conditions; derived from control_sha256, so not hashed
    quantize: str | None = None

    def job_id(self, dataset: str) -> str:
        """Deterministic: the same image asked for twice in a dataset is one job."""
        # Unambiguous without JSON: the prompt is length-prefixed, and no other field can hold a NUL.
        key = (
            f"{dataset}\0{len(self.prompt)}:{self.prompt}\0{self.seed}\0{self.width}\0{self.height}\0"
            f"{self.num_inference_steps}\0{float(self.guidance_scale)!r}\0{self.model}"
        )
        extras = (self.controlnet, self.conditioning_scale, self.control_sha256, self.quantize)
        # Appended only when set, so a plain job keeps the id it had before these fields existed.
        if any(value is not None for value in extras):
            scale = "" if self.conditioning_scale is None else repr(float(self.conditioning_scale))
            key += f"\0control\0{self.controlnet or ''}\0{scale}\0{self.control_sha256 or ''}\0{self.quantize or ''}"
        return hashlib.sha256(key.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Plan:
    """A validated submission, not yet written."""

    dataset: str
    specs: list[JobSpec]
    duplicates: int
    ids: list[str]  # specs[i]'s job id, computed once
    conditions: tuple[ConditionImage, ...] = ()  # distinct condition images, to store before recording


@dataclass(frozen=True)
class Recorded:
    """What a submission wrote."""

    dataset_id: int
    dataset: str
    new_jobs: int
    already_present: int


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
    """Read and validate every row before anything is written; the first bad value raises."""
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
    control = _control_context(path, options)
    specs: list[JobSpec] = []
    ids: list[str] = []
    seen: set[str] = set()
    occurrences: Counter[str] = Counter()
    duplicates = 0
    for row in read_rows(path):
        for spec in _expand(row, defaults, options.seed, model.name, occurrences, control):
            job_id = spec.job_id(options.dataset)
            if job_id in seen:
                duplicates += 1
                continue
            seen.add(job_id)
            specs.append(spec)
            ids.append(job_id)
    return Plan(options.dataset, specs, duplicates, ids, control.images.distinct())


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


def record(engine: Engine, plan: Plan) -> Recorded:
    """One transaction: the dataset (created if new) and every job as pending; existing ids are skipped.

    Rows are staged in a temporary table (COPY on PostgreSQL) and moved with one INSERT … SELECT … ON
    CONFLICT DO NOTHING, whose row count is exactly the number of new jobs, even with concurrent submits.
    """
    unstored = next((s for s in plan.specs if s.control_sha256 is not None and s.control_uri is None), None)
    if unstored is not None:
        raise ValueError(
            f"line {unstored.source_line}: condition {unstored.control_sha256} is not stored; "
            "call store_conditions(plan, storage) before record"
        )
    now = utcnow()
    with engine.begin() as conn:
        dataset_id = _dataset_id(conn, plan.dataset)
        staging = _staging_table()
        staging.create(conn)
        try:
            rows = (
                {
                    **asdict(spec),
                    "id": job_id,
                    "dataset_id": dataset_id,
                    "status": JobStatus.PENDING.value,
                    "attempts": 0,
                    "created_at": now,
                }
                for spec, job_id in zip(plan.specs, plan.ids, strict=True)
            )
            _stage(conn, staging, rows)
            columns = [c.name for c in staging.columns]
            moved = select(*staging.columns).where(true())  # `WHERE true` lets SQLite parse ON CONFLICT
            # rowcount of an INSERT is only kept when asked for (SQLAlchemy 2: preserve_rowcount).
            stmt = _insert_ignoring_conflicts(conn).from_select(columns, moved)
            added = conn.execute(stmt.execution_options(preserve_rowcount=True)).rowcount
        finally:
            staging.drop(conn)
    return Recorded(dataset_id, plan.dataset, added, len(plan.specs) - added)


_STAGED_COLUMNS = (
    "id",
    "dataset_id",
    "source_line",
    "prompt",
    "seed",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "model",
    "controlnet",
    "conditioning_scale",
    "control_sha256",
    "control_uri",
    "quantize",
    "status",
    "attempts",
    "created_at",
)


def _staging_table() -> Table:
    source = Job.__table__.c
    columns = [Column(name, source[name].type, primary_key=name == "id") for name in _STAGED_COLUMNS]
    return Table("incoming_jobs", MetaData(), *columns, prefixes=["TEMPORARY"])


def _stage(conn: Connection, staging: Table, rows: Iterator[dict[str, Any]]) -> None:
    if conn.dialect.name == "postgresql":
        # COPY is several times faster than multi-row INSERTs for 100k rows.
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor.copy(f"COPY incoming_jobs ({', '.join(_STAGED_COLUMNS)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row[name] for name in _STAGED_COLUMNS])
        return
    batch: list[dict[str, Any]] = []
    for row in rows:
        batch.append(row)
        if len(batch) == _INSERT_CHUNK:
            conn.execute(insert(staging), batch)
            batch = []
    if batch:
        conn.execute(insert(staging), batch)


def _dataset_id(conn: Connection, name: str) -> int:
    found = conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar()
    if found is not None:
        return int(found)
    conn.execute(_insert_ignoring_conflicts(conn, Dataset), {"name": name, "created_at": utcnow()})
    return int(conn.execute(select(Dataset.id).where(Dataset.name == name)).scalar_one())


def _insert_ignoring_conflicts(conn: Connection, table: type[Any] = Job) -> Any:
    dialect = conn.dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table).on_conflict_do_nothing()
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing()
    return insert(table)


def _check_defaults(defaults: dict[str, Any], seed: int) -> None:
    fake = Row("(options)", 0, {})
    for field, value in defaults.items():
        _validated(fake, field, value, option=True)
    _validated(fake, "seed", seed, option=True)


@dataclass(frozen=True)
class _Control:
    """What every row's control fields are checked against."""

    controlnet: str | None
    default_image: ConditionImage | None
    default_scale: float
    quantize: str | None
    base_dir: Path  # relative control_image paths in the prompt file resolve against its folder
    images: ConditionImages


def _control_context(path: Path, options: SubmitOptions) -> _Control:
    """Resolve the ControlNet options once; a default condition image is decoded here, before any row."""
    fake = Row("(options)", 0, {})
    controlnet = resolve_controlnet(options.controlnet) if options.controlnet is not None else None
    quantize = options.quantize
    if quantize not in (None, *QUANTIZE_CHOICES):
        raise _bad(fake, "quantize", quantize, f"quantize must be one of {', '.join(QUANTIZE_CHOICES)}", option=True)
    scale = _validated(fake, "conditioning_scale", options.conditioning_scale, option=True)
    images = ConditionImages()
    default_image = None
    if options.control_image is not None:
        value = str(options.control_image)
        if controlnet is None:
            raise _bad(fake, "control_image", value, "--controlnet is required with control images", option=True)
        default_image = images.check(Path(value).expanduser().absolute(), origin=None, line=None, value=value)
    return _Control(
        controlnet=controlnet,
        default_image=default_image,
        default_scale=scale,
        quantize=None if quantize == "none" else quantize,
        base_dir=path.expanduser().absolute().parent,
        images=images,
    )


def _row_control(row: Row, control: _Control) -> tuple[str | None, float | None, str | None]:
    """(controlnet, conditioning_scale, control_sha256) of one row; all None for a plain row."""
    raw = row.fields.get("control_image")
    image = control.default_image
    if raw is not None:
        if not isinstance(raw, str) or not raw.strip():
            raise _bad(row, "control_image", raw, "control_image must be a path to an image file")
        if control.controlnet is None:
            raise _bad(row, "control_image", raw, "--controlnet is required with control images")
        given = Path(raw.strip()).expanduser()
        image = control.images.check(
            given if given.is_absolute() else control.base_dir / given, origin=row.path, line=row.line, value=raw
        )
    if "conditioning_scale" in row.fields and control.controlnet is None:
        raise _bad(row, "conditioning_scale", row.fields["conditioning_scale"], "conditioning_scale needs --controlnet")
    if control.controlnet is None:
        return None, None, None
    if image is None:
        raise _bad(
            row,
            "control_image",
            raw,
            "--controlnet needs a control image for every row: give --control-image or a control_image field",
        )
    scale = control.default_scale
    if "conditioning_scale" in row.fields:
        scale = _validated(row, "conditioning_scale", row.fields["conditioning_scale"])
    return control.controlnet, scale, image.sha256


def _expand(
    row: Row,
    defaults: dict[str, Any],
    base_seed: int,
    model: str,
    occurrences: Counter[str],
    control: _Control,
) -> list[JobSpec]:
    fields = {**defaults, **row.fields}
    prompt = _validated(row, "prompt", fields.get("prompt"))
    values = {k: _validated(row, k, fields[k]) for k in defaults}
    explicit_seed = _validated(row, "seed", fields["seed"]) if "seed" in fields else None
    controlnet, conditioning_scale, control_sha256 = _row_control(row, control)
    occurrence = occurrences[prompt]
    occurrences[prompt] += 1
    specs = []
    for index in range(values["images_per_prompt"]):
        if explicit_seed is not None:
            seed = explicit_seed + index
            if seed > MAX_SEED:
                raise _bad(row, "seed", explicit_seed, f"seed + images_per_prompt exceeds {MAX_SEED}")
        else:
            seed = derive_seed(base_seed, prompt, occurrence, index)
        specs.append(
            JobSpec(
                prompt,
                seed,
                values["width"],
                values["height"],
                values["num_inference_steps"],
                values["guidance_scale"],
                model,
                row.line,
                controlnet=controlnet,
                conditioning_scale=conditioning_scale,
                control_sha256=control_sha256,
                quantize=control.quantize,
            )
        )
    return specs


def _bad(row: Row, field: str, value: Any, message: str, option: bool = False) -> InvalidSubmission:
    if option:
        return InvalidSubmission(f"{message}, got {value!r}", field=field, value=value)
    return InvalidSubmission(f"{message}, got {value!r}", path=row.path, line=row.line, field=field, value=value)


def _validated(row: Row, field: str, value: Any, option: bool = False) -> Any:
    """Convert and range-check one field; the error names file, line, field and value."""
    if field == "prompt":
        if not isinstance(value, str) or not value.strip():
            raise _bad(row, field, value, "missing or empty prompt")
        if len(value) > MAX_PROMPT_CHARS:
            raise _bad(row, field, f"{value[:40]}…", f"prompt longer than {MAX_PROMPT_CHARS} characters")
        return value.strip()
    if field in ("guidance_scale", "conditioning_scale"):
        number = _number(row, field, value, float, option)
        low, high = GUIDANCE_RANGE if field == "guidance_scale" else CONDITIONING_SCALE_RANGE
        if not low <= number <= high:
            raise _bad(row, field, value, f"{field} must be between {low} and {high}", option)
        return number
    number = _number(row, field, value, int, option)
    if field in ("width", "height"):
        low, high = SIZE_RANGE
        if not low <= number <= high:
            raise _bad(row, field, value, f"{field} must be between {low} and {high}", option)
        if number % SIZE_MULTIPLE:
            raise _bad(row, field, value, f"{field} must be a multiple of {SIZE_MULTIPLE}", option)
    elif field == "num_inference_steps":
        low, high = STEPS_RANGE
        if not low <= number <= high:
            raise _bad(row, field, value, f"num_inference_steps must be between {low} and {high}", option)
    elif field == "images_per_prompt":
        low, high = IMAGES_PER_PROMPT_RANGE
        if not low <= number <= high:
            raise _bad(row, field, value, f"images_per_prompt must be between {low} and {high}", option)
    elif field == "seed" and not 0 <= number <= MAX_SEED:
        raise _bad(row, field, value, f"seed must be between 0 and {MAX_SEED}", option)
    return number


def _number(row: Row, field: str, value: Any, kind: type, option: bool) -> Any:
    if isinstance(value, bool):
        raise _bad(row, field, value, f"{field} must be a number", option)
    if kind is int:
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        raise _bad(row, field, value, f"{field} must be an integer", option)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _bad(row, field, value, f"{field} must be a number", option) from None
    if number != number:  # NaN
        raise _bad(row, field, value, f"{field} must be a number", option)
    return number

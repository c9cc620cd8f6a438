"""The job, defined once: the inputs that determine one image, its id, and which jobs can render together.

Everything that handles a job's fields derives them from here: the columns a submit stages and records
(farm/submit/record.py), what a claim returns (farm/store/transitions.py), the key dispatch groups pending jobs
by (farm/dispatch/publish.py), the export row and its parquet schema (farm/outputs/export.py) and the
Client's FinishedImage. tests/test_job.py checks each of them against these definitions and the jobs table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class JobSpec:
    """One image, fully determined: its id is a hash of the dataset and all of these fields but where it came from
    (file and line) and where its condition is stored."""

    prompt: str
    seed: int
    width: int
    height: int
    num_inference_steps: int
    guidance_scale: float
    model: str
    source_line: int | None
    controlnet: str | None = None
    conditioning_scale: float | None = None
    control_sha256: str | None = None
    control_uri: str | None = None  # set when the condition is stored; derived from control_sha256, so not hashed
    quantize: str | None = None  # T5 precision ("int8"), or "int8-transformer" (T5 and transformer in 8-bit)
    source_file: str | None = None  # the prompt file the line is in (`<prompts>` for a Python list); not hashed
    # Inputs added with the per-model samplers (revision 0009); NULL unless the job uses them:
    negative_prompt: str | None = None  # for models sampled with classifier-free guidance (guidance_scale > 1)
    control_preprocess: str | None = None  # "hed:<sha256 of the HED weights>": the worker derives the condition
    timesteps: str | None = None  # "original": the original repository's LCM timesteps instead of diffusers'
    # Yield-targeted lines (revision 0011), not hashed: NULL for a job without acceptance rules.
    scorer: str | None = None  # the scorer profile that scores the image on the worker (farm/profiles.py)
    line_id: str | None = None  # the line's try 0's job id: every try of one prompt line shares it
    try_index: int | None = None  # which try of its line this job is (0 .. max_tries - 1)

    def id_in(self, dataset: str) -> str:
        """The job's id in ``dataset``, deterministic: the same image asked for twice in a dataset is one job."""
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
        later = (self.negative_prompt, self.control_preprocess, self.timesteps)
        # The same rule for the inputs of revision 0009: absent from the key unless set.
        if any(value is not None for value in later):
            negative = "" if self.negative_prompt is None else f"{len(self.negative_prompt)}:{self.negative_prompt}"
            key += f"\0recipe\0{negative}\0{self.control_preprocess or ''}\0{self.timesteps or ''}"
        return hashlib.sha256(key.encode()).hexdigest()[:32]

    @property
    def render_group(self) -> tuple[object, ...]:
        """Jobs with equal groups can share one pipeline call."""
        return tuple(getattr(self, name) for name in RENDER_GROUP_FIELDS)


# The job's inputs, in order: the jobs-table columns a submit writes and a claim reads back.
INPUT_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(JobSpec))

# What decides whether jobs can share one pipeline call: everything but the prompt, the seed and the condition
# image itself (each image in a batch has its own prompt, generator and condition).
RENDER_GROUP_FIELDS = (
    "model",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "controlnet",
    "conditioning_scale",
    "quantize",
    "control_preprocess",
    "timesteps",
    "scorer",
)


@dataclass(frozen=True, kw_only=True)
class Claimed(JobSpec):
    """A job a worker incarnation now owns: its inputs, its row id and dataset, and which attempt this is."""

    id: str
    dataset_id: int
    attempts: int  # this attempt's number within the job's budget (reset by `farm retry`)
    claim_seq: int  # the fencing token of this attempt: the job's claim count, never reset

    @property
    def held(self) -> tuple[str, int]:
        """(job id, claim sequence): what a worker holds, renews and writes under."""
        return (self.id, self.claim_seq)


# The columns a claim returns, in the order Claimed takes them.
CLAIMED_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Claimed))


@dataclass(frozen=True)
class ExportField:
    """One column of every export format and the jobs column it is read from."""

    name: str
    source: str


# Inputs that leave the farm with each image; the line, the condition's hash and its stored URI stay inside.
EXPORTED_INPUTS = tuple(
    name for name in INPUT_FIELDS if name not in ("source_line", "source_file", "control_sha256", "control_uri")
)

EXPORT_FIELDS: tuple[ExportField, ...] = (
    ExportField("job_id", "id"),
    *(ExportField(name, name) for name in EXPORTED_INPUTS),
    ExportField("uri", "output_uri"),
    ExportField("sha256", "sha256"),
    ExportField("bytes", "bytes"),
    ExportField("recipe", "recipe"),  # how the worker sampled it (JSON): sampler, config, noise, T5 precision
    # Scores and the verdict (revision 0011): NULL where the image was not scored or its line has no rules.
    ExportField("clip_score", "clip_score"),
    ExportField("aesthetic_score", "aesthetic_score"),
    ExportField("nsfw", "nsfw"),
    ExportField("verdict", "verdict"),
    ExportField("verdict_reason", "verdict_reason"),
    ExportField("worker", "worker"),
    ExportField("render_seconds", "render_ms"),  # milliseconds in the row, seconds in the export
    ExportField("finished_at", "finished_at"),  # ISO 8601, UTC
)


def derive_seed(base_seed: int, prompt: str, occurrence: int, index: int) -> int:
    """A per-image seed from the base seed, the prompt, which repeat of it this is and the image (or try) index.

    Deterministic, so a resubmitted file maps onto the same jobs; moving repeats of one prompt around swaps which
    repeat gets which seed. Try k of a yield-targeted line takes index k, so its tries 0 .. N-1 are the same jobs
    as `images_per_prompt` N, and a worker derives the seed of each follow-up try the same way.
    """
    digest = hashlib.sha256(f"{base_seed}\0{prompt}\0{occurrence}\0{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)


@dataclass(frozen=True)
class Scores:
    """What a worker's scorers said about one image (workers/caches.py), recorded with its result."""

    pixel_sha256: str  # sha256 of the decoded pixels: exact duplicates, whatever the PNG's metadata
    clip_score: float | None = None  # 100 * max(cos(image, prompt), 0)
    aesthetic_score: float | None = None  # the LAION improved aesthetic predictor's 1-10 scale
    nsfw: bool | None = None  # the safety checker's flag
    embedding: bytes | None = None  # the unit CLIP image embedding, float16 little-endian
    models: str | None = None  # JSON: which scorer models ({"clip": ..., "aesthetic": ..., "safety": ...})

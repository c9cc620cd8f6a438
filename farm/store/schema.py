"""The job store's tables: datasets and jobs (one row per image). The row is the truth; messages carry ids."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    false,
    text,
    true,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from farm.store.states import FINISHED as FINISHED
from farm.store.states import UNFINISHED as UNFINISHED
from farm.store.states import JobStatus as JobStatus
from farm.store.states import utcnow as utcnow


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is always timezone-aware UTC, on SQLite (which drops the zone) as on PostgreSQL."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the job store; use farm.store.schema.utcnow()")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    """Declarative base of the job store."""


class Dataset(Base):
    """A named collection of jobs; its name is part of every object key."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128), unique=True, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    # A paused dataset's jobs are not claimed; `farm resume` sends them again.
    paused: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())
    # 0–9, higher first: dispatch sends higher-priority datasets first, on Redis priority queues.
    priority: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    # Whether job_counts holds this dataset's exact counts (revision 0010): false only for a dataset that was on a
    # large PostgreSQL store before the counts existed, until `farm db recount` backfills it (farm/store/counts.py).
    counts_ready: Mapped[bool] = mapped_column(Boolean, nullable=False, default=True, server_default=true())
    # Accepted images its yield-targeted lines want in all (the sum of their `accept`; revision 0011), written by
    # submits only: `farm status` projects the tries still needed from it.
    accept_target: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0, server_default="0")


class Job(Base):
    """One image to render: its inputs, its state and, once done, where its object is."""

    __tablename__ = "jobs"

    # Deterministic id (a hash of the dataset and every input), so a resubmission inserts nothing.
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False)
    source_line: Mapped[int | None] = mapped_column(Integer)
    source_file: Mapped[str | None] = mapped_column(Text)  # the prompt file, as given (revision 0008)
    prompt: Mapped[str] = mapped_column(Text, nullable=False)
    seed: Mapped[int] = mapped_column(BigInteger, nullable=False)
    width: Mapped[int] = mapped_column(Integer, nullable=False)
    height: Mapped[int] = mapped_column(Integer, nullable=False)
    num_inference_steps: Mapped[int] = mapped_column(Integer, nullable=False)
    guidance_scale: Mapped[float] = mapped_column(Float, nullable=False)
    model: Mapped[str] = mapped_column(String(512), nullable=False)
    # ControlNet and quantization inputs; all NULL for a plain job (revision 0002).
    controlnet: Mapped[str | None] = mapped_column(String(512))
    conditioning_scale: Mapped[float | None] = mapped_column(Float)
    control_sha256: Mapped[str | None] = mapped_column(String(64))
    control_uri: Mapped[str | None] = mapped_column(Text)  # the stored condition image, content-addressed
    quantize: Mapped[str | None] = mapped_column(String(16))  # "int8", "int8-transformer" or NULL
    # Inputs of revision 0009, NULL unless used (farm/job.py).
    negative_prompt: Mapped[str | None] = mapped_column(Text)
    control_preprocess: Mapped[str | None] = mapped_column(String(80))
    timesteps: Mapped[str | None] = mapped_column(String(16))
    # Yield-targeted lines (revision 0011, farm/store/verdicts.py); NULL for a job submitted without rules.
    scorer: Mapped[str | None] = mapped_column(String(64))  # the scorer profile the worker scores it with
    line_id: Mapped[str | None] = mapped_column(String(32))  # its line's try 0's id (acceptance_lines)
    try_index: Mapped[int | None] = mapped_column(Integer)
    # What the scorers said, written with the result by the attempt that won.
    clip_score: Mapped[float | None] = mapped_column(Float)
    aesthetic_score: Mapped[float | None] = mapped_column(Float)
    nsfw: Mapped[bool | None] = mapped_column(Boolean)
    pixel_sha256: Mapped[str | None] = mapped_column(String(64))  # of the decoded pixels, not the PNG
    scored_by: Mapped[str | None] = mapped_column(Text)  # JSON: the scorer models' ids
    # accepted | rejected | duplicate | unscored, decided in try order for jobs of a line; the job stays succeeded.
    verdict: Mapped[str | None] = mapped_column(String(16))
    verdict_reason: Mapped[str | None] = mapped_column(Text)
    # How the image was rendered, as JSON (models/recipe.py): written with the result by the attempt that won.
    recipe: Mapped[str | None] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16), nullable=False, default=JobStatus.PENDING.value)
    # The attempt budget: reset by `farm retry`.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    # The fencing token: + 1 on every claim, never reset. An attempt's object key and every write it makes carry
    # it, so a late or duplicate attempt can never change what a newer one recorded (revision 0007).
    claim_seq: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")
    # The worker incarnation (label#random, unique per process start) that holds or last held the job.
    worker: Mapped[str | None] = mapped_column(String(255))
    # Where and when the job was last sent to the broker (dispatch keeps a bounded window per queue).
    queue: Mapped[str | None] = mapped_column(String(255))
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    output_uri: Mapped[str | None] = mapped_column(Text)
    sha256: Mapped[str | None] = mapped_column(String(64))
    bytes: Mapped[int | None] = mapped_column(BigInteger)
    render_ms: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    # Why dispatch could not send this pending job anywhere (no live pool serves it); cleared once sent.
    routing_note: Mapped[str | None] = mapped_column(Text)

    __table_args__ = (
        # Jobs of one dataset in one state (`farm db recount`, dispatch per dataset); `farm status` reads job_counts.
        Index("ix_jobs_dataset_status", "dataset_id", "status"),
        # Throughput and ETA: recently finished jobs of a dataset.
        Index("ix_jobs_dataset_finished", "dataset_id", "finished_at"),
        # Dispatch and the reaper look for jobs in one state across datasets.
        Index("ix_jobs_status_created", "status", "created_at"),
        # The dispatch window: queued jobs per queue, oldest send first.
        Index("ix_jobs_status_queued", "status", "queue", "queued_at"),
        # A line's tries in order: the verdicts are decided along it.
        Index(
            "ix_jobs_line_try",
            "line_id",
            "try_index",
            postgresql_where=text("line_id IS NOT NULL"),
            sqlite_where=text("line_id IS NOT NULL"),
        ),
    )


class Verdict(StrEnum):
    """What the acceptance rules said of a rendered try (a job that rendered stays succeeded)."""

    ACCEPTED = "accepted"
    REJECTED = "rejected"  # a threshold or the safety rule
    DUPLICATE = "duplicate"  # the same pixels as, or too close to, an accepted earlier try of its line
    UNSCORED = "unscored"  # its line's rules need scores the worker did not give


class AcceptanceLine(Base):
    """A prompt line that wants `accept` accepted images in at most `max_tries` tries (revision 0011).

    Written by the submit that first names it; then only the transaction that records a try of the line changes
    it, holding its row lock, so the verdicts are decided one line at a time, in try order
    (farm/store/verdicts.py).
    """

    __tablename__ = "acceptance_lines"

    line_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False, index=True)
    rules: Mapped[str] = mapped_column(Text, nullable=False)  # JSON, farm.submit.rules.Rules
    base_seed: Mapped[int] = mapped_column(BigInteger, nullable=False)  # with the prompt and occurrence: the seeds
    occurrence: Mapped[int] = mapped_column(Integer, nullable=False)
    accept: Mapped[int] = mapped_column(Integer, nullable=False)
    max_tries: Mapped[int] = mapped_column(Integer, nullable=False)
    tries: Mapped[int] = mapped_column(Integer, nullable=False)  # tries inserted so far (0 .. tries - 1)
    decided: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")  # in try order
    accepted: Mapped[int] = mapped_column(Integer, nullable=False, default=0, server_default="0")


class JobEmbedding(Base):
    """A scored image's CLIP embedding, float16 (revision 0011): near-duplicate checks and dataset-wide dedup."""

    __tablename__ = "job_embeddings"

    # Gone with its dataset; no key to jobs, so a bulk TRUNCATE of jobs (an operator's) is not refused.
    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), nullable=False, index=True)
    model: Mapped[str] = mapped_column(String(512), nullable=False)
    dim: Mapped[int] = mapped_column(Integer, nullable=False)
    vector: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)  # unit-norm, float16 little-endian


class JobCount(Base):
    """How many jobs of a dataset are in a state: the sum of its rows over the stripes (revision 0010).

    Kept by triggers on jobs (migrations/versions/0010_status_counts.py) in the transaction of every change, so
    `farm status` reads at most 16 rows per state instead of counting the jobs. Besides the six states, the key
    "unroutable" counts pending jobs that carry a routing note. farm/store/counts.py reads and rebuilds them.
    """

    __tablename__ = "job_counts"

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    status: Mapped[str] = mapped_column(String(16), primary_key=True)
    # 0-15: concurrent transactions add to different rows (PostgreSQL), so no single row is hot.
    stripe: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, nullable=False)


class DatasetRecipe(Base):
    """Each distinct render recipe a dataset's images were made with: `farm status` warns when there are two."""

    __tablename__ = "dataset_recipes"

    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), primary_key=True)
    digest: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the recipe's JSON
    recipe: Mapped[str] = mapped_column(Text, nullable=False)
    first_seen: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, default=utcnow)


class Control(Base):
    """A lease on a fleet-wide duty (the reaper and dispatcher loop): one worker incarnation holds it at a time."""

    __tablename__ = "control"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(255))
    expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    last_run_at: Mapped[datetime | None] = mapped_column(UTCDateTime())  # when the duty last ran to the end
    note: Mapped[str | None] = mapped_column(Text)  # what the last run did, or why it failed


class Worker(Base):
    """A worker process, as its last heartbeat described it (`farm workers`)."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # the incarnation: label#random
    pool: Mapped[str | None] = mapped_column(String(64))
    host: Mapped[str] = mapped_column(String(255), nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    device: Mapped[str] = mapped_column(String(128), nullable=False)
    device_memory_bytes: Mapped[int | None] = mapped_column(BigInteger)
    loaded: Mapped[str] = mapped_column(Text, nullable=False, default="{}")  # JSON: models, adapters, caches
    current_jobs: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    images_per_s: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False)
    last_seen: Mapped[datetime] = mapped_column(UTCDateTime(), nullable=False, index=True)
    stopped: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False, server_default=false())

"""A job's states and the store's clock, with no database library behind them (`farm status` imports them)."""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum


class JobStatus(StrEnum):
    """A job's life: pending → queued → running → succeeded | failed; any unfinished state → canceled."""

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


UNFINISHED = (JobStatus.PENDING, JobStatus.QUEUED, JobStatus.RUNNING)
FINISHED = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp in the store is UTC."""
    return datetime.now(UTC)

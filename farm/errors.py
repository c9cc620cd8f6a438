"""The farm's error hierarchy: outside errors are converted at the boundary into these."""

from __future__ import annotations


class FarmError(Exception):
    """Base of every error the farm raises on purpose."""


class ConfigError(FarmError):
    """Settings are missing or malformed."""


class InvalidSubmission(FarmError):
    """A submitted file, row or option is wrong; nothing was written."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        field: str | None = None,
        value: object = None,
    ) -> None:
        self.path, self.line, self.field, self.value = path, line, field, value
        where = ":".join(str(p) for p in (path, line) if p is not None)
        detail = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {detail}{message}" if where else f"{detail}{message}")


class StorageError(FarmError):
    """An object could not be written, confirmed or read."""


class TransientError(FarmError):
    """A failure worth retrying: a dropped connection, a 5xx, a timeout."""


class TransientStorageError(TransientError, StorageError):
    """Storage failed in a way that a retry may fix."""


class BrokerUnavailable(TransientError):
    """The Celery broker could not be reached."""


class UnknownDataset(FarmError):
    """No dataset has that name."""

"""The farm's error hierarchy: outside errors are converted at the boundary into these.

Three families decide how the `farm` command exits (farm/cli/common.py), so a script can tell them apart:
UserError (2: the input can be fixed and the command run again), ServiceUnavailable (3: a service the farm
needs did not answer; the same command may work once it is back) and every other FarmError (1).
"""

from __future__ import annotations


class FarmError(Exception):
    """Base of every error the farm raises on purpose."""


class UserError(FarmError):
    """The input names something that does not exist or is malformed; the user can fix it and run again."""


class ConfigError(FarmError):
    """Settings are missing or malformed."""


class InvalidSubmission(UserError):
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


class ServiceUnavailable(TransientError):
    """A service the farm needs (job database, broker, storage) could not be reached or asked to come back
    later; nothing the user typed is wrong, and the same command may work once the service is back."""


class TransientStorageError(ServiceUnavailable, StorageError):
    """Storage failed in a way that a retry may fix."""


class BrokerUnavailable(ServiceUnavailable):
    """The Celery broker could not be reached."""


class DatabaseUnavailable(ServiceUnavailable):
    """The job database could not be reached (down, a wrong host or port, or it refused the connection)."""


class UnknownDataset(UserError):
    """No dataset has that name."""


class UnknownJob(UserError):
    """No job has that id."""

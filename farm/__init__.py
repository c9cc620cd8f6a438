"""PixArt-δ render farm: the `farm` command, and `from farm import Client` for Python."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farm.client import Client, FinishedImage
    from farm.submit.run import SubmitResult

__all__ = ["Client", "FinishedImage", "SubmitResult"]


def __getattr__(name: str) -> Any:
    # Loaded on first use: `import farm` (and so every `farm` command) stays free of SQLAlchemy and Celery.
    if name in __all__:
        from farm import client

        return getattr(client, name)
    raise AttributeError(f"module 'farm' has no attribute {name!r}")

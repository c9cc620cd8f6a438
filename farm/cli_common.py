"""What every `farm` command module shares: error mapping and the settings on the click context."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import click

from farm.errors import FarmError, InvalidSubmission, UnknownDataset
from farm.settings import Settings


@contextmanager
def errors() -> Iterator[None]:
    """User mistakes exit 2 with the message; other farm errors exit 1; never a traceback for either."""
    try:
        yield
    except (InvalidSubmission, UnknownDataset) as exc:
        raise click.UsageError(str(exc)) from None
    except FarmError as exc:
        raise click.ClickException(str(exc)) from None


def settings_of(ctx: click.Context) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings

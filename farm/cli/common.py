"""What every `farm` command module shares: error mapping and the settings on the click context."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import click

from farm.errors import BrokerUnavailable, FarmError, InvalidSubmission, UnknownDataset
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


def dispatch_or_warn(settings: Settings, engine: Any, dataset_id: int | None) -> None:
    """Publish pending jobs; if the broker is away, say that nothing is lost and exit 3."""
    from farm.dispatch.broker import make_celery
    from farm.dispatch.publish import dispatch_pending

    started = time.perf_counter()
    try:
        sent = dispatch_pending(engine, make_celery(settings), settings, dataset_id=dataset_id)
    except BrokerUnavailable as exc:
        exit_broker_down(exc)
    click.echo(sent.describe(time.perf_counter() - started))


def exit_broker_down(exc: BrokerUnavailable) -> None:
    """The broker is away: say that the jobs are safe as pending, and exit 3."""
    click.echo(
        f"warning: {exc}. The jobs are recorded as pending and nothing is lost: "
        "run `farm dispatch` once the broker is back.",
        err=True,
    )
    sys.exit(3)

"""What every `farm` command module shares: the one place errors become exit codes, and the settings on the
click context.

Commands raise; they never print an error or pick an exit status themselves. FarmGroup (the `farm` group)
turns whatever reaches it into one line on stderr and an exit status a script can branch on:

- 2: input the user can fix (click's usage errors: a bad option value, a missing argument; farm's UserError:
  an invalid submission, an unknown dataset or job);
- 3: a service the farm needs did not answer (ServiceUnavailable: the job database, the broker, storage);
- 1: anything else, including errors nobody foresaw, which also say how to see their traceback.

FARM_DEBUG=1 prints the traceback of any error above its line.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Sequence
from typing import Any

import click

from farm.errors import BrokerUnavailable, FarmError, ServiceUnavailable, UserError
from farm.settings import Settings

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNAVAILABLE = 3
DEBUG_HINT = "(FARM_DEBUG=1 shows the traceback)"


class FarmGroup(click.Group):
    """A click group that answers every error of every subcommand with one line and an exit status."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the command line; whatever goes wrong ends here, as one line and describe()'s exit status."""
        if not standalone_mode:  # a caller embedding the group handles errors itself
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            # click's non-standalone mode raises instead of printing, and returns an Exit's status (ctx.exit,
            # --help); invoke below returns None, so a value here is always such a status.
            status = super().main(args, prog_name, complete_var, False, **extra)
        except click.Abort:
            click.echo("Aborted!", err=True)
            status = EXIT_FAILED
        except click.exceptions.NoArgsIsHelpError as exc:  # `farm` or `farm db` alone: the help is the answer
            exc.show()
            status = exc.exit_code
        except Exception as exc:
            status = report(exc)
        sys.exit(status or 0)

    def invoke(self, ctx: click.Context) -> None:
        """Run the subcommand and drop its return value, so main's only values are Exit statuses."""
        super().invoke(ctx)


def debugging() -> bool:
    """FARM_DEBUG set to anything but empty or 0."""
    return os.environ.get("FARM_DEBUG", "").strip() not in ("", "0")


def report(exc: BaseException) -> int:
    """Print ``exc`` as one line on stderr (its traceback first, with FARM_DEBUG=1); return the exit status."""
    if debugging():
        click.echo("".join(traceback.format_exception(exc)).rstrip(), err=True)
    status, line = describe(exc)
    click.echo(f"error: {line}", err=True)
    return status


def describe(exc: BaseException) -> tuple[int, str]:
    """The exit status and the one line that say what went wrong, without a traceback."""
    if isinstance(exc, click.UsageError):
        where = f" (see `{exc.ctx.command_path} -h`)" if exc.ctx is not None else ""
        return EXIT_USAGE, _one_line(exc.format_message()) + where
    if isinstance(exc, click.ClickException):
        return exc.exit_code, _one_line(exc.format_message())
    if isinstance(exc, UserError):
        return EXIT_USAGE, _text(exc)
    if isinstance(exc, BrokerUnavailable):
        # Every publish takes its jobs (pending → queued) first and puts the unsent ones back on failure.
        return EXIT_UNAVAILABLE, (
            f"{_text(exc)}. The jobs are recorded as pending and nothing is lost: "
            "run `farm dispatch` once the broker is back."
        )
    if isinstance(exc, ServiceUnavailable):
        return EXIT_UNAVAILABLE, f"{_text(exc)} (`farm doctor` checks each service)"
    if isinstance(exc, FarmError):
        return EXIT_FAILED, _text(exc)
    from farm.secrets import scrub

    # Not written for users: a driver's or the OS's words, which may quote a URL with its password.
    text = scrub(_one_line(str(exc)))
    line = f"unexpected {exc.__class__.__name__}" + (f": {text}" if text else "")
    return EXIT_FAILED, line if debugging() else f"{line} {DEBUG_HINT}"


def _text(exc: BaseException) -> str:
    return _one_line(str(exc)) or exc.__class__.__name__


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())


def settings_of(ctx: click.Context) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


def dispatch_now(settings: Settings, engine: Any, dataset_id: int | None) -> None:
    """Publish pending jobs and say how many went; a broker that is away raises BrokerUnavailable (exit 3)."""
    from farm.dispatch.broker import make_celery
    from farm.dispatch.publish import dispatch_pending

    started = time.perf_counter()
    sent = dispatch_pending(engine, make_celery(settings), settings, dataset_id=dataset_id)
    click.echo(sent.describe(time.perf_counter() - started))

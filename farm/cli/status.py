"""`farm status` and `farm jobs`: where a dataset stands, read from the database only."""

from __future__ import annotations

import json
import math
from typing import Any

import click

from farm.cli.common import settings_of
from farm.store.states import JobStatus


def _positive_seconds(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    """A redraw interval: a finite number above 0 (0 would spin a core, nan and -1 used to end in a traceback)."""
    if not math.isfinite(value) or value <= 0:
        raise click.BadParameter(f"must be a number of seconds above 0, got {value}")
    return value


@click.command()
@click.argument("dataset", required=False)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print a JSON array with one object per dataset (`dataset`, `counts`, `total`, `done`, …), for scripts.",
)
@click.option("--watch", is_flag=True, help="Redraw progress bars (one per dataset) until they are finished.")
@click.option(
    "--interval-s",
    type=float,
    default=1.0,
    show_default=True,
    callback=_positive_seconds,
    help="Seconds between redraws.",
)
@click.pass_context
def status(ctx: click.Context, dataset: str | None, as_json: bool, watch: bool, interval_s: float) -> None:
    """Counts per state, images/s and ETA, for one dataset or all."""
    settings = settings_of(ctx)
    if not watch and _quick_status(settings, dataset, as_json):
        return
    from farm.store.engine import open_store
    from farm.store.queries import all_statuses, dataset_status, pool_progress

    engine = open_store(settings)
    if watch:
        from farm.cli.watch import watch_datasets

        # One bar per dataset: the named one, or every dataset unfinished when the watch starts.
        names = [dataset] if dataset else [s.name for s in all_statuses(engine) if not s.done]

        def read() -> list[Any]:
            return [dataset_status(engine, name) for name in names]

        def read_pools() -> list[Any]:
            return pool_progress(engine, names, beat_s=settings.lease_s / 3)

        from rich.console import Console

        # With --json the bars go to stderr, so stdout holds nothing but the JSON a script reads.
        console = Console(stderr=True) if as_json else None
        final = watch_datasets(read, interval_s=interval_s, read_pools=read_pools, console=console)
        _print_statuses(final, as_json)
        return
    statuses = [dataset_status(engine, dataset)] if dataset else all_statuses(engine)
    _print_statuses(statuses, as_json)
    if not as_json:
        _warn_if_nobody_reaps(engine, settings.lease_s, unfinished=any(not s.done for s in statuses))


def _quick_status(settings: Any, dataset: str | None, as_json: bool) -> bool:
    """Answer over the bare driver, without importing SQLAlchemy (farm/store/quick.py); False when the ordinary
    path must (no database yet, a schema to upgrade, a database away)."""
    from farm.store import progress
    from farm.store.quick import open_reader

    with open_reader(settings.database_url) as reader:
        if reader is None:
            return False
        statuses = progress.read_statuses(reader, dataset)
        _print_statuses(statuses, as_json)
        if not as_json:
            unfinished = any(not s.done for s in statuses)
            warning = progress.silence_warning(reader, settings.lease_s, unfinished=unfinished)
            if warning:
                click.echo(warning, err=True)
    return True


def _print_statuses(statuses: list[Any], as_json: bool) -> None:
    if as_json:
        # Always an array, whatever the number of datasets (none: []), so a script reads every answer alike.
        click.echo(json.dumps([s.as_dict() for s in statuses]))
        return
    if not statuses:
        click.echo("no datasets yet: `farm submit FILE --dataset NAME`")
    for s in statuses:
        counts = "  ".join(f"{state} {s.counts[state.value]}" for state in JobStatus)
        eta = "-" if s.eta_s is None else f"{s.eta_s:.0f} s"
        click.echo(f"{s.name}: {s.finished}/{s.total} finished  |  {counts}  |  {s.images_per_s:.2f} img/s  ETA {eta}")
        about = "≈" if s.reasons_estimated else ""
        for reason, n in s.unroutable.items():
            click.echo(f"  unroutable {about}{n}: {reason}")
        if s.acceptance is not None:
            click.echo(f"  {_acceptance_line(s.acceptance)}")
        for warning in s.warnings:
            click.echo(f"  warning: {warning}")


def _acceptance_line(a: Any) -> str:
    """`accepted 37/50  rejected 12  duplicate 1  unscored 0  |  rate 74%  |  ~68 tries to the target`."""
    rate = "-" if a.rate is None else f"{a.rate:.0%}"
    projected = a.projected_tries
    tries = "tries to the target: not known yet" if projected is None else f"~{projected} tries to the target"
    return (
        f"accepted {a.accepted}/{a.target}  rejected {a.rejected}  duplicate {a.duplicate}  unscored {a.unscored}"
        f"  |  acceptance {rate}  |  {tries}"
    )


def _warn_if_nobody_reaps(engine: Any, lease_s: float, *, unfinished: bool) -> None:
    from farm.store.control import silence_warning

    warning = silence_warning(engine, lease_s, unfinished=unfinished)
    if warning:
        click.echo(warning, err=True)


@click.command()
@click.argument("dataset")
@click.option("--state", type=click.Choice([s.value for s in JobStatus]), default=None, help="Only jobs in this state.")
@click.option(
    "--verdict",
    type=click.Choice(["accepted", "rejected", "duplicate", "unscored"]),
    default=None,
    help="Only tries of yield-targeted lines with this verdict (shown with its reason).",
)
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many jobs.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per job (nothing for no jobs).")
@click.pass_context
def jobs(ctx: click.Context, dataset: str, state: str | None, verdict: str | None, limit: int, as_json: bool) -> None:
    """List a dataset's jobs with their state, attempts, output and error (and verdict, for yield-targeted lines)."""
    from farm.store.engine import open_store
    from farm.store.queries import list_jobs

    rows = list_jobs(open_store(settings_of(ctx)), dataset, state=state, verdict=verdict, limit=limit)
    for row in rows:
        if as_json:
            click.echo(json.dumps(row.__dict__))
            continue
        tail = row.error if row.error else (row.output_uri or "")
        if row.verdict is not None:
            scores = f"clip {row.clip_score:.2f}  " if row.clip_score is not None else ""
            if row.aesthetic_score is not None:
                scores += f"aesthetic {row.aesthetic_score:.2f}  "
            reason = f" ({row.verdict_reason})" if row.verdict_reason else ""
            tail = f"try {row.try_index}  {row.verdict}{reason}  {scores}{tail}"
        click.echo(
            f"{row.id}  {row.status:<9} attempts={row.attempts}  {row.source_file or '?'}:{row.source_line}  "
            f"seed {row.seed}  {tail}"
        )

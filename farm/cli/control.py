"""`farm cancel`, `farm retry`, `farm pause`, `farm resume`: steering datasets that are already submitted."""

from __future__ import annotations

import re

import click

from farm.cli.common import dispatch_or_warn, errors, settings_of
from farm.store import transitions

JOB_ID = re.compile(r"^[0-9a-f]{32}$")


@click.command()
@click.argument("target")
@click.pass_context
def cancel(ctx: click.Context, target: str) -> None:
    """Cancel every unfinished job of a dataset, or one job by its id."""
    from farm.store.engine import open_store
    from farm.store.queries import dataset_id

    with errors():
        engine = open_store(settings_of(ctx))
        with engine.begin() as conn:
            if JOB_ID.match(target):
                moved = transitions.cancel(conn, job_ids=[target])
                what = f"job {target}"
            else:
                moved = transitions.cancel(conn, dataset_id=dataset_id(engine, target))
                what = f"dataset {target}"
    click.echo(f"{what}: {moved} unfinished jobs canceled (a worker rendering one discards its result)")


@click.command()
@click.argument("dataset")
@click.option("--failed", is_flag=True, help="Retry the failed jobs (with a fresh set of attempts).")
@click.option("--canceled", is_flag=True, help="Run the canceled jobs after all (with a fresh set of attempts).")
@click.pass_context
def retry(ctx: click.Context, dataset: str, failed: bool, canceled: bool) -> None:
    """Send a dataset's failed (--failed) or canceled (--canceled) jobs again."""
    from farm.store.engine import open_store
    from farm.store.queries import dataset_id
    from farm.store.schema import JobStatus

    if not (failed or canceled):
        raise click.UsageError("say which jobs to retry: --failed, --canceled or both")
    settings = settings_of(ctx)
    with errors():
        engine = open_store(settings)
        ds_id = dataset_id(engine, dataset)
        states = [state for state, wanted in ((JobStatus.FAILED, failed), (JobStatus.CANCELED, canceled)) if wanted]
        with engine.begin() as conn:
            moved = {state: transitions.retry_finished(conn, ds_id, state) for state in states}
        summary = ", ".join(f"{n} {state.value}" for state, n in moved.items())
        click.echo(f"dataset {dataset}: {summary} jobs back to pending")
        dispatch_or_warn(settings, engine, ds_id)


@click.command()
@click.argument("dataset")
@click.pass_context
def pause(ctx: click.Context, dataset: str) -> None:
    """Stop handing out a dataset's jobs; jobs already rendering finish."""
    from farm.store.engine import open_store
    from farm.store.queries import dataset_id

    with errors():
        engine = open_store(settings_of(ctx))
        ds_id = dataset_id(engine, dataset)
        with engine.begin() as conn:
            transitions.set_paused(conn, ds_id, True)
            # Out of the broker's window: their messages become no-ops, and resume sends them again.
            transitions.requeue_queued(conn, ds_id)
    click.echo(f"dataset {dataset} paused: `farm resume {dataset}` sends its waiting jobs again")


@click.command()
@click.argument("dataset")
@click.pass_context
def resume(ctx: click.Context, dataset: str) -> None:
    """Resume a paused dataset and send its waiting jobs again."""
    from farm.store.engine import open_store
    from farm.store.queries import dataset_id

    settings = settings_of(ctx)
    with errors():
        engine = open_store(settings)
        ds_id = dataset_id(engine, dataset)
        with engine.begin() as conn:
            transitions.set_paused(conn, ds_id, False)
            requeued = transitions.requeue_queued(conn, ds_id)  # none, unless paused by an older farm
        click.echo(f"dataset {dataset} resumed ({requeued} waiting jobs)")
        dispatch_or_warn(settings, engine, ds_id)

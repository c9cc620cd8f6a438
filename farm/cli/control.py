"""`farm cancel`, `farm retry`, `farm pause`, `farm resume`: steering datasets that are already submitted."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from farm.cli.common import dispatch_now, settings_of
from farm.errors import UnknownJob, UserError
from farm.store import transitions

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


@click.command()
@click.argument("target", required=False)
@click.option("--job", "job_id", metavar="ID", default=None, help="Cancel this job (its 32-character id).")
@click.option("--dataset", metavar="NAME", default=None, help="Cancel every unfinished job of this dataset.")
@click.pass_context
def cancel(ctx: click.Context, target: str | None, job_id: str | None, dataset: str | None) -> None:
    """Cancel every unfinished job of a dataset, or one job. TARGET is a dataset name or a job id; --job and
    --dataset say which, for a name that could be both."""
    from farm.store.engine import open_store

    if sum(given is not None for given in (target, job_id, dataset)) != 1:
        raise click.UsageError("say what to cancel, once: --job ID, --dataset NAME, or a TARGET that is either")
    engine = open_store(settings_of(ctx))
    if target is not None:
        job_id, dataset = _resolve(engine, target)
    if job_id is not None:
        _cancel_job(engine, job_id)
    else:
        assert dataset is not None
        _cancel_dataset(engine, dataset)


def _resolve(engine: Engine, target: str) -> tuple[str | None, str | None]:
    """(job id, dataset name) for a positional TARGET: whichever exists; both, or neither, is an error (exit 2),
    since a name that looks like a job id is a valid dataset name."""
    from farm.store.queries import find_dataset_id, job_state

    is_dataset = find_dataset_id(engine, target) is not None
    is_job = job_state(engine, target) is not None
    if is_dataset and is_job:
        raise click.UsageError(
            f"{target!r} is both a dataset name and a job id: pass --job {target} or --dataset {target}"
        )
    if not (is_dataset or is_job):
        raise UserError(f"nothing to cancel: no dataset named {target!r} and no job with id {target!r}")
    return (None, target) if is_dataset else (target, None)


def _cancel_job(engine: Engine, job_id: str) -> None:
    from farm.store.queries import job_state

    if job_state(engine, job_id) is None:
        raise UnknownJob(f"no job with id {job_id!r}")
    with engine.begin() as conn:
        moved = transitions.cancel(conn, job_ids=[job_id])
    if moved:
        click.echo(f"job {job_id}: {moved} unfinished jobs canceled (a worker rendering one discards its result)")
    else:
        click.echo(f"job {job_id} is already {job_state(engine, job_id)}: nothing to cancel")


def _cancel_dataset(engine: Engine, name: str) -> None:
    from farm.store.queries import dataset_id, dataset_status

    ds_id = dataset_id(engine, name)
    with engine.begin() as conn:
        moved = transitions.cancel(conn, dataset_id=ds_id)
    if moved:
        click.echo(f"dataset {name}: {moved} unfinished jobs canceled (a worker rendering one discards its result)")
        return
    counts = dataset_status(engine, name).counts
    finished = ", ".join(f"{n} {state}" for state, n in counts.items() if n) or "it has no jobs"
    click.echo(f"dataset {name} is already finished ({finished}): 0 unfinished jobs canceled, nothing to cancel")


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
    engine = open_store(settings)
    ds_id = dataset_id(engine, dataset)
    states = [state for state, wanted in ((JobStatus.FAILED, failed), (JobStatus.CANCELED, canceled)) if wanted]
    with engine.begin() as conn:
        moved = {state: transitions.retry_finished(conn, ds_id, state) for state in states}
    summary = ", ".join(f"{n} {state.value}" for state, n in moved.items())
    click.echo(f"dataset {dataset}: {summary} jobs back to pending")
    dispatch_now(settings, engine, ds_id)


@click.command()
@click.argument("dataset")
@click.pass_context
def pause(ctx: click.Context, dataset: str) -> None:
    """Stop handing out a dataset's jobs; jobs already rendering finish."""
    from farm.store.engine import open_store
    from farm.store.queries import dataset_id

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
    engine = open_store(settings)
    ds_id = dataset_id(engine, dataset)
    with engine.begin() as conn:
        transitions.set_paused(conn, ds_id, False)
        requeued = transitions.requeue_queued(conn, ds_id)  # none, unless paused by an older farm
    click.echo(f"dataset {dataset} resumed ({requeued} waiting jobs)")
    dispatch_now(settings, engine, ds_id)

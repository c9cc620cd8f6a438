"""`farm export`, `farm url` and `farm preview`: getting a dataset, one image, or a look at it out of the farm."""

from __future__ import annotations

from pathlib import Path

import click

from farm.cli.common import settings_of
from farm.outputs.export import DEFAULT_PARALLEL, DEFAULT_SETTLE_S, FORMATS
from farm.storage import storage_for

__all__ = ["export", "url"]


@click.command()
@click.argument("dataset")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(FORMATS),
    required=True,
    help="parquet or jsonl (one row per image, part files), webdataset (tar shards of image + json) "
    "or imagefolder (images + metadata.jsonl for Hugging Face datasets).",
)
@click.option(
    "--to",
    "to",
    required=True,
    help="Destination: a local folder or s3://bucket/prefix (the farm's S3 endpoint and region). "
    "Re-running to the same place adds only rows not exported there yet.",
)
@click.option(
    "--shard-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Images per WebDataset shard.",
)
@click.option(
    "--parallel",
    type=click.IntRange(min=1),
    default=DEFAULT_PARALLEL,
    show_default=True,
    help="Images copied at once (webdataset, imagefolder); 1 copies them one request at a time.",
)
@click.option(
    "--settle-s",
    type=click.FloatRange(min=0),
    default=DEFAULT_SETTLE_S,
    show_default=True,
    help="Export only rows that finished at least this many seconds ago; newer ones wait for the next run, so a "
    "worker whose clock lags or whose commit comes late by less than this is never skipped.",
)
@click.option(
    "--accepted-only/--all",
    "accepted_only",
    default=None,
    help="Only the accepted tries of yield-targeted lines, or every image (default: accepted only when the "
    "dataset has acceptance rules). Each destination keeps the choice of its first export.",
)
@click.pass_context
def export(
    ctx: click.Context,
    dataset: str,
    fmt: str,
    to: str,
    shard_size: int,
    parallel: int,
    settle_s: float,
    accepted_only: bool | None,
) -> None:
    """Export the finished images of DATASET, one row per image, in a format training code reads."""
    from farm.outputs.export import describe_files, export_dataset
    from farm.store.engine import open_store

    settings = settings_of(ctx)
    engine = open_store(settings)
    try:
        result = export_dataset(
            engine,
            storage_for(settings),
            dataset,
            fmt=fmt,
            to=to,
            s3_endpoint_url=settings.s3_endpoint_url,
            s3_region=settings.s3_region,
            shard_size=shard_size,
            parallel=parallel,
            settle_s=settle_s,
            accepted_only=accepted_only,
        )
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    finally:
        engine.dispose()
    waiting = ""
    if result.held_back:
        waiting = f"; {result.held_back} finished in the last {settle_s:g} s wait for the next run"
    click.echo(
        f"exported {result.new_rows} new rows of {dataset} as {fmt} to {to} "
        f"({result.total_rows} in all): {describe_files(result.files, result.images)}{waiting}"
    )


@click.command()
@click.argument("job")
@click.option(
    "--expires-s",
    type=click.IntRange(min=1, max=7 * 24 * 3600),
    default=3600,
    show_default=True,
    help="Seconds the URL stays valid (S3 allows at most 7 days).",
)
@click.pass_context
def url(ctx: click.Context, job: str, expires_s: int) -> None:
    """Print a presigned URL for JOB's image (the file:// URI for local storage)."""
    from farm.outputs.export import NoSuchJob, job_output_uri, presigned_url
    from farm.store.engine import open_store

    settings = settings_of(ctx)
    engine = open_store(settings)
    try:
        uri = job_output_uri(engine, job)
    except NoSuchJob as exc:
        raise click.BadParameter(str(exc), param_hint="JOB") from None
    finally:
        engine.dispose()
    try:
        link = presigned_url(storage_for(settings), uri, expires_s)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(link)


@click.command()
@click.argument("dataset")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder to write the contact sheet and gallery to (default ./DATASET-preview).",
)
@click.option("--limit", type=click.IntRange(min=1), default=64, show_default=True, help="At most this many images.")
@click.option("--columns", type=click.IntRange(min=1), default=8, show_default=True, help="Thumbnails per row.")
@click.option(
    "--thumb",
    type=click.IntRange(min=16, max=1024),
    default=128,
    show_default=True,
    help="Thumbnail size in pixels (the longer side).",
)
@click.option(
    "--verdict",
    type=click.Choice(["accepted", "rejected", "duplicate", "unscored"]),
    default=None,
    help="Only tries with this verdict (yield-targeted lines); scores and verdicts are shown under each image.",
)
@click.pass_context
def preview(
    ctx: click.Context, dataset: str, out: Path | None, limit: int, columns: int, thumb: int, verdict: str | None
) -> None:
    """Write a contact sheet PNG and an HTML gallery of a dataset's finished images."""
    from farm.outputs.preview import make_preview
    from farm.storage import storage_for
    from farm.store.engine import open_store

    settings = settings_of(ctx)
    engine = open_store(settings)
    storage = storage_for(settings)
    target = out or Path(f"{dataset}-preview")
    result = make_preview(
        engine, storage, dataset, target, limit=limit, columns=columns, thumb_px=thumb, verdict=verdict
    )
    for reason in result.skipped:
        click.echo(f"skipped {reason}", err=True)
    click.echo(f"{len(result.images)} images")
    click.echo(f"contact sheet: {result.contact_sheet.resolve()}")
    click.echo(f"gallery: {result.gallery.resolve()}")


@click.command()
@click.argument("dataset", required=False)
@click.option("--dry-run", is_flag=True, help="List what would be deleted; delete nothing.")
@click.pass_context
def gc(ctx: click.Context, dataset: str | None, dry_run: bool) -> None:
    """Delete stored images that no job names (left by late, duplicate, canceled or crashed attempts)."""
    from farm.outputs.gc import collect
    from farm.store.engine import open_store
    from farm.store.queries import dataset_id

    settings = settings_of(ctx)
    engine = open_store(settings)
    if dataset is not None:
        dataset_id(engine, dataset)  # an unknown name is an error, not "nothing to collect"
    result = collect(engine, storage_for(settings), dataset=dataset, dry_run=dry_run)
    for key in result.deleted:
        click.echo(f"{'would delete' if dry_run else 'deleted'} {key}")
    click.echo(result.describe(dry_run))

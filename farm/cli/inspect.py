"""`farm preview` and `farm doctor`: looking at a run's images, and checking that the farm can run at all."""

from __future__ import annotations

from pathlib import Path

import click

from farm.cli.common import errors, settings_of


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
@click.pass_context
def preview(ctx: click.Context, dataset: str, out: Path | None, limit: int, columns: int, thumb: int) -> None:
    """Write a contact sheet PNG and an HTML gallery of a dataset's finished images."""
    from farm.outputs.preview import make_preview
    from farm.storage import storage_for
    from farm.store.engine import open_store

    settings = settings_of(ctx)
    with errors():
        engine = open_store(settings)
        storage = storage_for(settings)
        target = out or Path(f"{dataset}-preview")
        result = make_preview(engine, storage, dataset, target, limit=limit, columns=columns, thumb_px=thumb)
    for reason in result.skipped:
        click.echo(f"skipped {reason}", err=True)
    click.echo(f"{len(result.images)} images")
    click.echo(f"contact sheet: {result.contact_sheet.resolve()}")
    click.echo(f"gallery: {result.gallery.resolve()}")


@click.command()
@click.pass_context
def doctor(ctx: click.Context) -> None:
    """Check the database, broker, storage, models and CUDA; exit 1 if any check fails. Prints no secret."""
    from farm.cli.doctor import Level, run_checks
    from farm.secrets import scrub, secrets_of

    settings = settings_of(ctx)
    hidden = secrets_of(settings)
    results = run_checks(settings)
    for check in results:
        click.echo(scrub(check.line(), hidden=hidden))
    failed = [check.name for check in results if check.level is Level.FAIL]
    if failed:
        click.echo(f"{len(failed)} of {len(results)} checks failed: {', '.join(failed)}")
        ctx.exit(1)
    click.echo("the farm can run here")

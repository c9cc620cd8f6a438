"""The `farm` command: parse, call the library, print. One module per command group:

submit.py (submit, dispatch, reap), worker.py (worker, workers), status.py (status, jobs; watch.py draws the
bars), control.py (cancel, retry, pause, resume), outputs.py (export, url, preview, gc), doctor.py (doctor, config)
and tools.py (db, models, condition, bench). Heavy parts (torch, Celery workers) load only inside the commands
that run them, so `farm submit` and `farm status` start instantly. Errors are answered in one place,
farm/cli/common.py's FarmGroup: one line and an exit status (2 fixable input, 3 a service away, 1 otherwise).
"""

from __future__ import annotations

from pathlib import Path

import click

from farm.cli import control, doctor, outputs, status, submit, tools, worker
from farm.cli.common import FarmGroup
from farm.settings import load_settings


@click.group(cls=FarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State folder for the embedded default (FARM_HOME, default ./.farm).",
)
@click.pass_context
def main(ctx: click.Context, home: Path | None) -> None:
    """PixArt-δ render farm: submit prompt files, render them on GPU workers, collect the dataset."""
    ctx.obj = load_settings(home=str(home) if home else None)


for _command in (
    submit.submit,
    submit.dispatch,
    submit.reap,
    worker.worker,
    worker.workers_command,
    status.status,
    status.jobs,
    control.cancel,
    control.retry,
    control.pause,
    control.resume,
    outputs.export,
    outputs.url,
    outputs.preview,
    outputs.gc,
    doctor.doctor,
    doctor.show_config,
    tools.db,
    tools.models,
    tools.condition,
    tools.bench,
):
    main.add_command(_command)

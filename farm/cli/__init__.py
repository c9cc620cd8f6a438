"""The `farm` command: parse, call the library, print. One module per command group:

submit.py (submit, dispatch, reap), worker.py (worker, workers), status.py (status, jobs; watch.py draws the
bars), control.py (cancel, retry, pause, resume), outputs.py (export, url, preview, gc), doctor.py (doctor, config)
and tools.py (db, models, condition, bench). Heavy parts (torch, Celery workers) load only inside the commands
that run them, and each command's module is imported only when that command runs (or `farm --help` lists them
all), so `farm status` loads neither the export formats nor storage, Celery or alembic, and starts in a fraction
of a second. Errors are answered in one place, farm/cli/common.py's FarmGroup: one line and an exit status (2
fixable input, 3 a service away, 1 otherwise).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import click

from farm.cli.common import FarmGroup
from farm.settings import load_settings

# Command name → (module under farm.cli, the click command in it), in the order `farm --help` lists them.
COMMANDS: dict[str, tuple[str, str]] = {
    "submit": ("submit", "submit"),
    "dispatch": ("submit", "dispatch"),
    "reap": ("submit", "reap"),
    "worker": ("worker", "worker"),
    "workers": ("worker", "workers_command"),
    "status": ("status", "status"),
    "jobs": ("status", "jobs"),
    "cancel": ("control", "cancel"),
    "retry": ("control", "retry"),
    "pause": ("control", "pause"),
    "resume": ("control", "resume"),
    "export": ("outputs", "export"),
    "url": ("outputs", "url"),
    "preview": ("outputs", "preview"),
    "gc": ("outputs", "gc"),
    "doctor": ("doctor", "doctor"),
    "config": ("doctor", "show_config"),
    "db": ("tools", "db"),
    "models": ("tools", "models"),
    "condition": ("tools", "condition"),
    "bench": ("tools", "bench"),
}


class LazyFarmGroup(FarmGroup):
    """FarmGroup whose commands are imported on first use (COMMANDS)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module, attr = COMMANDS[cmd_name]
            command = getattr(importlib.import_module(f"farm.cli.{module}"), attr)
            assert isinstance(command, click.Command) and command.name == cmd_name, (cmd_name, command)
            self.add_command(command)
        return self.commands.get(cmd_name)


@click.group(cls=LazyFarmGroup, context_settings={"help_option_names": ["-h", "--help"]})
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

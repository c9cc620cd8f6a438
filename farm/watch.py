"""`farm status --watch`: a live progress bar until the dataset is finished (or Ctrl-C)."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from farm.status import DatasetStatus


def watch_dataset(
    read: Callable[[], DatasetStatus], *, interval_s: float = 1.0, console: Console | None = None
) -> DatasetStatus:
    """Redraw until every job is finished; returns the last status read."""
    current = read()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(current.name, total=current.total, completed=current.finished, detail=_detail(current))
        try:
            while not current.done:
                time.sleep(interval_s)
                current = read()
                progress.update(task, total=current.total, completed=current.finished, detail=_detail(current))
        except KeyboardInterrupt:
            pass
    return current


def _detail(s: DatasetStatus) -> str:
    eta = "-" if s.eta_s is None else f"{s.eta_s:.0f}s"
    return (
        f"running {s.counts['running']}  queued {s.counts['queued'] + s.counts['pending']}  "
        f"failed {s.counts['failed']}  {s.images_per_s:.2f} img/s  ETA {eta}"
    )

"""`farm status --watch`: live progress bars, one per dataset, until they are finished (or Ctrl-C)."""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from farm.store.queries import DatasetStatus, PoolProgress


def watch_datasets(
    read: Callable[[], list[DatasetStatus]],
    *,
    interval_s: float = 1.0,
    console: Console | None = None,
    read_pools: Callable[[], list[PoolProgress]] | None = None,
) -> list[DatasetStatus]:
    """Redraw a bar per dataset (and per pool, if read_pools is given) until every job of every dataset shown
    is finished; returns the last read."""
    current = read()
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bars: dict[str, TaskID] = {}

        def draw(statuses: list[DatasetStatus]) -> None:
            for s in statuses:
                if s.name not in bars:
                    bars[s.name] = progress.add_task(s.name, total=s.total, completed=s.finished, detail="")
                progress.update(bars[s.name], total=s.total, completed=s.finished, detail=_detail(s))
            # A pool's bar: the images its workers finished out of those plus the jobs they hold now.
            for p in read_pools() if read_pools else []:
                key = f"pool {p.pool}"
                if key not in bars:
                    bars[key] = progress.add_task(key, total=None, completed=0, detail="")
                progress.update(
                    bars[key],
                    total=p.succeeded + p.running,
                    completed=p.succeeded,
                    detail=f"{p.workers_alive} workers alive  running {p.running}  {p.images_per_s:.2f} img/s",
                )

        draw(current)
        try:
            while not all(s.done for s in current):
                time.sleep(interval_s)
                current = read()
                draw(current)
        except KeyboardInterrupt:
            pass
    return current


def _detail(s: DatasetStatus) -> str:
    eta = "-" if s.eta_s is None else f"{s.eta_s:.0f}s"
    return (
        f"running {s.counts['running']}  queued {s.counts['queued'] + s.counts['pending']}  "
        f"failed {s.counts['failed']}  {s.images_per_s:.2f} img/s  ETA {eta}"
    )

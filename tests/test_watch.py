"""`farm status --watch` draws one bar per dataset and returns once they are finished."""

from __future__ import annotations

import io

from rich.console import Console

from farm.status import DatasetStatus
from farm.watch import watch_datasets


def _status(name: str, done: int, total: int) -> DatasetStatus:
    counts = {"pending": 0, "queued": total - done, "running": 0, "succeeded": done, "failed": 0, "canceled": 0}
    return DatasetStatus(name, counts, 1.0, float(total - done))


def test_one_bar_per_dataset_until_all_are_finished() -> None:
    frames = iter(
        [
            [_status("cats", 0, 4), _status("dogs", 1, 2)],
            [_status("cats", 2, 4), _status("dogs", 2, 2)],
            [_status("cats", 4, 4), _status("dogs", 2, 2)],
        ]
    )
    reads: list[int] = []

    def read() -> list[DatasetStatus]:
        reads.append(1)
        return next(frames)

    out = io.StringIO()
    final = watch_datasets(read, interval_s=0, console=Console(file=out, width=120, force_terminal=False))
    assert len(reads) == 3  # stopped as soon as both were finished, not before
    assert [(s.name, s.finished) for s in final] == [("cats", 4), ("dogs", 2)]
    text = out.getvalue()
    assert "cats" in text and "dogs" in text and "4/4" in text and "2/2" in text

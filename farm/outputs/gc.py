"""`farm gc`: remove the objects that no job row names, so each finished job has exactly one object.

Attempts write to keys of their own (``{dataset}/{job_id}-{seq}.png``), and the row names the winner. What a
late, duplicate, canceled or crashed attempt left behind is deleted here; an attempt still running (the row
running under that very claim_seq) is left alone, and so is anything whose name the farm did not write.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.engine import Engine

from farm.storage import Storage, dataset_folder
from farm.store.schema import Dataset, Job, JobStatus

_ATTEMPT = re.compile(r"^(?P<job>[0-9a-f]{32})-(?P<seq>[1-9][0-9]*)\.png$")
_CHUNK = 1000


@dataclass
class Collected:
    """What a collection found: objects kept (a row names them, or their attempt is running), deleted, and
    keys under a dataset's folder that the farm did not write (left alone)."""

    kept: int = 0
    deleted: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    def describe(self, dry_run: bool) -> str:
        verb = "would delete" if dry_run else "deleted"
        line = f"kept {self.kept} objects, {verb} {len(self.deleted)} that no job names"
        if self.foreign:
            line += f"; left {len(self.foreign)} objects the farm did not write (e.g. {self.foreign[0]})"
        return line


def collect(engine: Engine, storage: Storage, *, dataset: str | None = None, dry_run: bool = False) -> Collected:
    """Delete (or with dry_run only list) the attempt objects no row names, in one dataset or all."""
    result = Collected()
    with engine.connect() as conn:
        query = select(Dataset.id, Dataset.name)
        if dataset is not None:
            query = query.where(Dataset.name == dataset)
        datasets = conn.execute(query).all()
    for ds_id, name in datasets:
        for chunk in _chunks(storage.list_keys(dataset_folder(storage.prefix, name))):
            _collect_chunk(engine, storage, ds_id, chunk, result, dry_run)
    return result


def _collect_chunk(
    engine: Engine, storage: Storage, ds_id: int, keys: list[str], result: Collected, dry_run: bool
) -> None:
    attempts: dict[str, tuple[str, int]] = {}
    for key in keys:
        match = _ATTEMPT.match(key.rsplit("/", 1)[-1])
        if match is None:
            result.foreign.append(key)
        else:
            attempts[key] = (match["job"], int(match["seq"]))
    job_ids = sorted({job for job, _seq in attempts.values()})
    with engine.connect() as conn:
        rows = {
            row.id: row
            for row in conn.execute(
                select(Job.id, Job.status, Job.claim_seq, Job.output_uri).where(
                    Job.dataset_id == ds_id, Job.id.in_(job_ids)
                )
            )
        }
    for key, (job_id, seq) in attempts.items():
        row = rows.get(job_id)
        named = row is not None and row.output_uri == storage.uri_for(key)
        running = row is not None and row.status == JobStatus.RUNNING.value and row.claim_seq == seq
        if named or running:
            result.kept += 1
            continue
        if not dry_run:
            storage.delete(key)
        result.deleted.append(key)


def _chunks(keys: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for key in keys:
        chunk.append(key)
        if len(chunk) == _CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk

"""Get a dataset out in the form training code reads: parquet, JSON lines, WebDataset shards or an imagefolder.

An export destination is a local folder or ``s3://bucket/prefix``. Running the same export again after more jobs
finish writes only the new rows, and costs O(new rows) whatever the size of what is already there:

- **A watermark, not a list of ids.** The exported rows are the dataset's succeeded jobs in the order of the key
  (finished_at, id); a succeeded row is final (nothing changes it afterwards), so the key of a row never moves. A
  small manifest (``_farm_export.json``, skipped by pyarrow and ``datasets`` because of its leading underscore)
  keeps the key of the last exported row, and the next run asks the job store only for rows after it, in pages
  (keyset pagination: no OFFSET, never the whole table in memory).
- **The late-commit rule.** ``finished_at`` is the *worker's* clock when its UPDATE ran
  (farm/store/transitions.py ``mark_succeeded``), and the row becomes visible only when that transaction commits.
  A worker whose clock is behind, or whose commit comes late, can therefore make visible a row whose key is
  *older* than rows an export has already read; a plain watermark would skip it forever. So an export only takes
  rows that finished more than ``settle_s`` seconds ago (default 60) by the exporter's clock: a row is exported
  once its key is older than ``now - settle_s``, and any row still uncommitted or stamped by a lagging clock is
  caught as long as (worker clock lag + commit delay + exporter clock lead) stays under ``settle_s``. (A dataset
  with no pending, queued or running job has no commit in flight: then everything finished so far goes.) Newer rows
  are left for the next run (``ExportResult.held_back`` says how many).
- **New parts, not rewrites.** parquet and jsonl write one new ``part-NNNNN`` file a run, WebDataset continues its
  shard numbers, and imagefolder adds its new images and *appends* their lines to ``metadata.jsonl``: the
  ``datasets`` imagefolder loader reads only files named exactly ``metadata.jsonl`` (or .csv/.parquet), one per
  folder, so a flat folder has exactly one, and the manifest records its length so an append resumes at the right
  byte (a local file is truncated back to it and appended; on S3 the object is composed server-side, see
  destinations.py).
- **Bounded parallel copies.** Images are copied storage → destination (each checked against its recorded
  sha256) by ``parallel`` threads, at most ``2 × parallel`` images held at once, consumed in key order.
- **Failures.** When a copy fails, the export stops taking new rows, lets the copies in flight finish, writes
  what was copied, records the watermark at the last row of the contiguous prefix that was fully copied (the
  few copied past a failed row are listed in the manifest as ``ahead`` so a rerun does not copy them again), and
  raises CopyFailed naming the job. A rerun continues from there.

A destination written by the first version of this module (a manifest listing every exported id) is converted
on its next run: that run reads the dataset once from the start, skips the listed ids and exports every other row
older than the cutoff (including any row the old code missed), and then stores a watermark instead of the list.
"""

from __future__ import annotations

import json
import tarfile
import time
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import IO, Any, TypeVar

from sqlalchemy import BigInteger, Boolean, Float, Integer, and_, func, or_, select
from sqlalchemy.engine import Engine

from farm.errors import FarmError, StorageError
from farm.job import EXPORT_FIELDS, ExportField
from farm.outputs.destinations import Destination, open_destination
from farm.storage import Storage
from farm.store.queries import dataset_id
from farm.store.schema import AcceptanceLine, Job, JobStatus, utcnow

__all__ = [
    "DEFAULT_PARALLEL",
    "DEFAULT_SETTLE_S",
    "FIELDS",
    "FORMATS",
    "MANIFEST",
    "CopyFailed",
    "ExportResult",
    "NoSuchJob",
    "describe_files",
    "export_dataset",
    "job_output_uri",
    "presigned_url",
]

FORMATS = ("parquet", "jsonl", "webdataset", "imagefolder")
MANIFEST = "_farm_export.json"
METADATA = "metadata.jsonl"
# The columns of every format, in this order (farm/job.py's EXPORT_FIELDS).
FIELDS = tuple(field.name for field in EXPORT_FIELDS)
# Images copied at once. Measured (benchmarks/export.py) no faster at 16 or 32 than at 8, and S3Storage's boto3
# client keeps 10 connections (botocore's default pool): more threads than that open and drop connections.
DEFAULT_PARALLEL = 8
DEFAULT_SETTLE_S = 60.0  # rows that finished less than this long ago wait for the next run (the late-commit rule)
_MANIFEST_VERSION = 2  # 1: a list of every exported job id; 2: a watermark
_DB_PAGE = 2000  # rows read from the job store per query (keyset pages)
_CHECKPOINT_S = 60.0  # an imagefolder export records its progress at least this often
T = TypeVar("T")
R = TypeVar("R")

Key = tuple[datetime, str]  # (finished_at, job id): the order of export, only ever growing for new rows


class NoSuchJob(FarmError):
    """No job has that id, or it has no stored image yet."""


class CopyFailed(StorageError):
    """An image could not be copied; what was copied before it is recorded, so running the export again continues."""

    def __init__(self, message: str, *, job_id: str, recorded_rows: int) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.recorded_rows = recorded_rows


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the rows new this time, the rows at the destination in all, the files written.

    ``files`` are the part files, shards and ``metadata.jsonl``; an imagefolder's images are counted in ``images``
    rather than listed (there may be millions). ``held_back``: succeeded rows too recent for this run
    (``settle_s``), exported by a later one.
    """

    dataset: str
    fmt: str
    destination: str
    new_rows: int
    total_rows: int
    files: tuple[str, ...]
    images: int = 0
    held_back: int = 0


# ---- rows --------------------------------------------------------------------------------------------


def _kind(field: ExportField) -> str:
    """The export type of a field: its jobs column's, but seconds and ISO text for the two it converts."""
    if field.source == "render_ms":
        return "float64"
    if field.source == "finished_at":
        return "string"
    column_type = Job.__table__.c[field.source].type
    if isinstance(column_type, BigInteger):
        return "int64"
    if isinstance(column_type, Integer):
        return "int32"
    if isinstance(column_type, Float):
        return "float64"
    if isinstance(column_type, Boolean):
        return "bool_"
    return "string"


_KINDS = {field.name: _kind(field) for field in EXPORT_FIELDS}
_JOB_COLUMNS = tuple(field.source for field in EXPORT_FIELDS)


def _value(field: ExportField, value: Any) -> Any:
    if value is None:
        return None
    if field.source == "render_ms":
        return value / 1000
    if field.source == "finished_at":
        return value.isoformat()
    kind = _KINDS[field.name]
    if kind == "bool_":
        return bool(value)
    return int(value) if kind.startswith("int") else float(value) if kind == "float64" else value


@dataclass(frozen=True, slots=True)
class _Row:
    """One succeeded job: its export key and its export row (timestamps as ISO 8601 UTC, render time in s)."""

    key: Key
    data: dict[str, Any]

    @property
    def job_id(self) -> str:
        return self.key[1]


def _row(job: Any) -> _Row:
    return _Row(
        key=(job.finished_at, job.id),
        data={field.name: _value(field, getattr(job, field.source)) for field in EXPORT_FIELDS},
    )


def _succeeded(ds_id: int) -> Any:
    return and_(Job.dataset_id == ds_id, Job.status == JobStatus.SUCCEEDED.value)


def _rows_after(engine: Engine, ds_id: int, after: Key | None, until: datetime | None) -> Iterator[_Row]:
    """The dataset's succeeded rows with a key after ``after`` (and finished by ``until``), in key order.

    Keyset pagination: each page is one short query, ``WHERE key > last key of the page before ORDER BY key
    LIMIT n``, served by the (dataset_id, finished_at) index; no OFFSET and at most one page in memory.
    """
    columns = [getattr(Job, name) for name in _JOB_COLUMNS]
    while True:
        stmt = select(*columns).where(_succeeded(ds_id), Job.finished_at.is_not(None))
        if after is not None:
            at, job_id = after
            # (finished_at, id) > (at, job_id), written so that the index sees a plain range on finished_at.
            stmt = stmt.where(Job.finished_at >= at, or_(Job.finished_at > at, Job.id > job_id))
        if until is not None:
            stmt = stmt.where(Job.finished_at <= until)
        stmt = stmt.order_by(Job.finished_at, Job.id).limit(_DB_PAGE)
        with engine.connect() as conn:
            page = [_row(job) for job in conn.execute(stmt)]
        yield from page
        if len(page) < _DB_PAGE:
            return
        after = page[-1].key


def _count_finished_after(engine: Engine, ds_id: int, cutoff: datetime) -> int:
    with engine.connect() as conn:
        found = conn.execute(select(func.count()).where(_succeeded(ds_id), Job.finished_at > cutoff)).scalar()
    return int(found or 0)


# ---- manifest ----------------------------------------------------------------------------------------


def _key_json(key: Key) -> list[str]:
    return [key[0].isoformat(), key[1]]


def _key_from_json(value: Any) -> Key:
    at, job_id = value
    return (datetime.fromisoformat(at), str(job_id))


@dataclass
class _Manifest:
    """What the destination holds: the watermark, the parts written, counts; small whatever the dataset's size."""

    dataset: str
    fmt: str
    watermark: Key | None = None  # the key of the last row of the exported prefix
    next_part: int = 0  # parts (part files, shards) written so far
    rows: int = 0
    metadata_bytes: int = 0  # imagefolder: the length of metadata.jsonl that the exported rows fill
    ahead: dict[str, Key] = field(default_factory=dict)  # exported rows past the watermark (few, or none)
    legacy_ids: set[str] | None = None  # a version 1 manifest's id list, until a run has converted it
    stored: dict[str, Any] | None = None  # what the destination's manifest says now (to_json, no timestamp)
    accepted_only: bool = False  # only accepted tries of yield-targeted lines (and jobs without rules)

    def to_json(self, *, stamped: bool = True) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "version": _MANIFEST_VERSION,
            "dataset": self.dataset,
            "format": self.fmt,
            "watermark": None if self.watermark is None else _key_json(self.watermark),
            "next_part": self.next_part,
            "rows": self.rows,
            "ahead": [_key_json(key) for key in sorted(self.ahead.values())],
        }
        if stamped:
            doc["updated_at"] = utcnow().isoformat()
        if self.fmt == "imagefolder":
            doc["metadata_bytes"] = self.metadata_bytes
        if self.accepted_only:
            doc["accepted_only"] = True
        if self.legacy_ids is not None:
            doc["job_ids"] = sorted(self.legacy_ids)  # a conversion that did not finish: kept until one does
        return doc


def _read_manifest(dest: Destination, staging: Path, dataset: str, fmt: str, accepted_only: bool) -> _Manifest:
    """The destination's manifest, or an empty one; refuses a destination holding another export."""
    path = staging / MANIFEST
    if not dest.fetch(MANIFEST, path):
        return _Manifest(dataset=dataset, fmt=fmt, accepted_only=accepted_only)
    try:
        doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FarmError(f"the export manifest {MANIFEST} at the destination is unreadable: {exc}") from exc
    path.unlink()
    if doc.get("dataset") != dataset or doc.get("format") != fmt:
        raise ValueError(
            f"the destination already holds a {doc.get('format')} export of dataset "
            f"{doc.get('dataset')!r}; export {fmt} of {dataset!r} to another place"
        )
    if bool(doc.get("accepted_only", False)) != accepted_only:
        held = "only accepted images" if doc.get("accepted_only") else "every image"
        raise ValueError(
            f"the destination holds an export of {held} of {dataset!r}; export "
            f"{'only accepted images' if accepted_only else 'every image'} to another place"
        )
    version = int(doc.get("version", 1))
    if version > _MANIFEST_VERSION:
        raise FarmError(f"the export manifest {MANIFEST} is version {version}, written by a newer farm; upgrade")
    try:
        manifest = _Manifest(
            dataset=dataset, fmt=fmt, next_part=int(doc.get("next_part", 0)), accepted_only=accepted_only
        )
        if version == 1:
            # The first format: every exported id. The converting run needs them (and they are in memory anyway).
            manifest.legacy_ids = set(doc["job_ids"])
            manifest.rows = len(manifest.legacy_ids)
            if fmt == "imagefolder":
                # Version 1 rewrote metadata.jsonl whole before its manifest, so the file is what it recorded.
                manifest.metadata_bytes = dest.size(METADATA) or 0
            return manifest
        manifest.watermark = None if doc["watermark"] is None else _key_from_json(doc["watermark"])
        manifest.rows = int(doc["rows"])
        manifest.metadata_bytes = int(doc.get("metadata_bytes", 0))
        manifest.ahead = {key[1]: key for key in map(_key_from_json, doc.get("ahead", []))}
        if "job_ids" in doc:  # a conversion that stopped at a failed copy
            manifest.legacy_ids = set(doc["job_ids"])
        manifest.stored = manifest.to_json(stamped=False)  # (a version 1 manifest has none: it is always rewritten)
    except (KeyError, TypeError, ValueError) as exc:
        raise FarmError(f"the export manifest {MANIFEST} at the destination is malformed: {exc!r}") from exc
    return manifest


def _write_manifest(dest: Destination, staging: Path, manifest: _Manifest) -> None:
    path = staging / MANIFEST
    path.write_text(json.dumps(manifest.to_json(), indent=0) + "\n", encoding="utf-8")
    dest.publish(path, MANIFEST)
    manifest.stored = manifest.to_json(stamped=False)


# ---- what to write: the plan, and progress along it ------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Item:
    row: _Row
    new: bool  # False: exported by an earlier run (listed in a version 1 manifest, or `ahead`); only passes by


def _plan(engine: Engine, ds_id: int, manifest: _Manifest, cutoff: datetime) -> Iterator[_Item]:
    """_all_rows, or with ``manifest.accepted_only`` the accepted tries (and rows without rules) only.

    A try whose verdict is not decided yet (it waits for an earlier try of its line) stops the run there: the
    watermark stays before it, and the next run starts from it once it is decided. Tries that were not accepted
    pass by, not written."""
    for item in _all_rows(engine, ds_id, manifest, cutoff):
        if not manifest.accepted_only or item.row.data.get("line_id") is None:
            yield item
            continue
        verdict = item.row.data.get("verdict")
        if verdict is None:
            return
        yield item if verdict == "accepted" else _Item(item.row, False)


def _all_rows(engine: Engine, ds_id: int, manifest: _Manifest, cutoff: datetime) -> Iterator[_Item]:
    """The rows after the watermark that finished by ``cutoff``, in key order, each marked new or not.

    Rows in ``manifest.ahead`` (and, while converting a version 1 manifest, its ids) were exported already: they
    pass by (the watermark moves over them) without being written again. While converting, the scan has no upper
    bound in SQL, so ids of the old list that finished after the cutoff are found and kept as ``ahead``.
    """
    legacy = manifest.legacy_ids
    if legacy is None:
        for row in _rows_after(engine, ds_id, manifest.watermark, cutoff):
            yield _Item(row, row.job_id not in manifest.ahead)
        return
    for row in _rows_after(engine, ds_id, manifest.watermark, None):
        if row.key[0] <= cutoff:
            yield _Item(row, row.job_id not in legacy and row.job_id not in manifest.ahead)
        elif row.job_id in legacy:
            manifest.ahead[row.job_id] = row.key


class _Progress:
    """Rows seen in key order: the contiguous prefix done (the watermark), rows done past a failure, failures."""

    def __init__(self, manifest: _Manifest) -> None:
        self.manifest = manifest
        self.watermark = manifest.watermark
        self.base_rows = manifest.rows
        self.new_rows = 0
        self.failures: list[tuple[str, BaseException]] = []

    def done(self, item: _Item) -> None:
        if item.new:
            self.new_rows += 1
        if self.failures:
            self.manifest.ahead[item.row.job_id] = item.row.key  # written, but past a failed row
        else:
            self.watermark = item.row.key

    def failed(self, item: _Item, error: BaseException) -> None:
        self.failures.append((item.row.job_id, error))

    @property
    def stopping(self) -> bool:
        return bool(self.failures)

    def checkpoint(self, complete: bool) -> None:
        """Bring the manifest up to what is done (the caller has published every file it names)."""
        m = self.manifest
        m.watermark = self.watermark
        m.rows = self.base_rows + self.new_rows
        if m.watermark is not None:
            m.ahead = {job_id: key for job_id, key in m.ahead.items() if key > m.watermark}
        if complete and not self.failures:
            m.legacy_ids = None  # converted: every listed id is now behind the watermark or in `ahead`

    def error(self) -> CopyFailed:
        job_id, first = self.failures[0]
        more = f" ({len(self.failures) - 1} more images failed too)" if len(self.failures) > 1 else ""
        return CopyFailed(
            f"copying the image of job {job_id} failed: {first}{more}; the export recorded "
            f"{self.base_rows + self.new_rows} rows in all — run it again to continue from job {job_id}",
            job_id=job_id,
            recorded_rows=self.base_rows + self.new_rows,
        )


def _ordered(
    items: Iterable[_Item], work: Callable[[_Row], R], parallel: int, progress: _Progress
) -> Generator[tuple[_Item, R | None, BaseException | None], None, None]:
    """``work`` on the new items by ``parallel`` threads; every item back in input order with its result or error.

    At most ``2 × parallel`` items are taken and not yet handed back, so memory stays flat whatever the number of
    rows. Once ``progress`` has a failure no more items are taken; those already taken still come back. With
    ``parallel`` 1 the work runs in this thread, one request at a time.
    """
    if parallel <= 1:
        for item in items:
            if progress.stopping:
                return
            if not item.new:
                yield item, None, None
                continue
            try:
                yield item, work(item.row), None
            except Exception as exc:
                yield item, None, exc
        return
    pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="farm-export")
    window: deque[tuple[_Item, Future[R] | None]] = deque()
    source = iter(items)
    exhausted = False
    try:
        while True:
            while not exhausted and not progress.stopping and len(window) < 2 * parallel:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                window.append((item, pool.submit(work, item.row) if item.new else None))
            if not window:
                return
            item, future = window.popleft()
            if future is None:
                yield item, None, None
                continue
            try:
                yield item, future.result(), None
            except Exception as exc:
                yield item, None, exc
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- images from the farm's storage ----------------------------------------------------------------


def _fetch(storage: Storage, row: _Row) -> bytes:
    """A job's image, checked against the SHA-256 recorded when it was rendered."""
    uri, job_id = row.data["uri"], row.job_id
    if not uri:
        raise StorageError(f"job {job_id} succeeded without a recorded image URI")
    return storage.read_verified(uri, row.data["sha256"], what=f"the image of job {job_id}")


# ---- writers -----------------------------------------------------------------------------------------


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _write_parquet(rows: Iterable[dict[str, Any]], path: Path) -> int:
    """Rows to one parquet file with a fixed schema, so every part reads as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _KINDS.items()])
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in _chunks(rows, _DB_PAGE):
            writer.write_table(pa.Table.from_pylist(chunk, schema=schema))
            count += len(chunk)
    return count


def _write_jsonl(rows: Iterable[dict[str, Any]], f: IO[str]) -> int:
    count = 0
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        count += 1
    return count


def _add_member(tar: tarfile.TarFile, name: str, data: bytes, mtime: float) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(mtime)
    info.mode = 0o644
    tar.addfile(info, BytesIO(data))


@dataclass
class _Run:
    """One export run: where it writes, what it has written, and how far it got."""

    dest: Destination
    staging: Path
    storage: Storage
    manifest: _Manifest
    progress: _Progress
    parallel: int
    files: list[str] = field(default_factory=list)
    images: int = 0

    def checkpoint(self, *, complete: bool = False) -> None:
        """Record progress in the manifest, unless it already says exactly this."""
        self.progress.checkpoint(complete)
        if self.manifest.to_json(stamped=False) != self.manifest.stored:
            _write_manifest(self.dest, self.staging, self.manifest)


def _export_table(fmt: str, run: _Run, items: Iterable[_Item]) -> None:
    """One more part file holding only the new rows; nothing is written when there are none."""

    def new_rows() -> Iterator[dict[str, Any]]:
        for item in items:
            run.progress.done(item)
            if item.new:
                yield item.row.data

    name = f"part-{run.manifest.next_part:05d}.{fmt}"
    path = run.staging / name
    if fmt == "parquet":
        count = _write_parquet(new_rows(), path)
    else:
        with path.open("w", encoding="utf-8") as f:
            count = _write_jsonl(new_rows(), f)
    if count:
        run.dest.publish(path, name)
        run.manifest.next_part += 1
        run.files.append(name)
    run.checkpoint(complete=True)


class _Shard:
    """The WebDataset shard being filled in the staging folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115 (closed when published)
        self.count = 0


def _export_webdataset(run: _Run, items: Iterable[_Item], *, shard_size: int) -> None:
    """New rows in new shards (``shard-000000.tar``, …), each sample ``{job_id}.png`` + ``{job_id}.json``.

    The manifest is brought up to date after each shard is published, so an interrupted export loses at most the
    shard it was filling (the next run writes it again under the same name).
    """
    now = utcnow().timestamp()
    shard: _Shard | None = None

    def close(shard: _Shard) -> None:
        shard.tar.close()
        name = shard.path.name
        run.dest.publish(shard.path, name)
        run.manifest.next_part += 1
        run.files.append(name)
        if run.manifest.legacy_ids is None:  # converting: the id list is written once, at the end
            run.checkpoint()

    fetched = closing(_ordered(items, lambda row: _fetch(run.storage, row), run.parallel, run.progress))
    with fetched as results:
        for item, image, error in results:
            if error is not None:
                run.progress.failed(item, error)
                continue
            if item.new:
                assert image is not None
                if shard is None:
                    shard = _Shard(run.staging / f"shard-{run.manifest.next_part:06d}.tar")
                job_id = item.row.job_id
                meta = json.dumps(item.row.data, ensure_ascii=False).encode()
                _add_member(shard.tar, f"{job_id}.png", image, now)
                _add_member(shard.tar, f"{job_id}.json", meta, now)
                shard.count += 1
            run.progress.done(item)
            if shard is not None and shard.count >= shard_size:
                close(shard)
                shard = None
    if shard is not None:  # the last, shorter shard; after a failure it holds what was fetched past it too
        close(shard)
    run.checkpoint(complete=True)


def _export_imagefolder(run: _Run, items: Iterable[_Item]) -> None:
    """New images as ``{job_id}.png``, copied in parallel; their lines appended to ``metadata.jsonl``.

    A line is staged only once its image is at the destination, and the staged lines are appended (then the
    manifest written) at least every _CHECKPOINT_S seconds and at the end: metadata.jsonl only ever names images
    that are there, and the manifest records its length, so a run that dies mid-append is truncated back to it.
    """
    lines_path = run.staging / "metadata.new.jsonl"
    lines = lines_path.open("w", encoding="utf-8")
    pending = 0
    last = time.monotonic()

    def copy(row: _Row) -> int:
        data = _fetch(run.storage, row)
        run.dest.put_bytes(f"{row.job_id}.png", data)
        return len(data)

    def flush() -> None:
        nonlocal lines, pending, last
        lines.close()
        if pending:
            run.manifest.metadata_bytes = run.dest.append(METADATA, lines_path, at=run.manifest.metadata_bytes)
            if METADATA not in run.files:
                run.files.append(METADATA)
        lines = lines_path.open("w", encoding="utf-8")
        pending = 0
        last = time.monotonic()

    try:
        with closing(_ordered(items, copy, run.parallel, run.progress)) as results:
            for item, _, error in results:
                if error is not None:
                    run.progress.failed(item, error)
                    continue
                if item.new:
                    name = f"{item.row.job_id}.png"
                    lines.write(json.dumps({"file_name": name, **item.row.data}, ensure_ascii=False) + "\n")
                    pending += 1
                    run.images += 1
                run.progress.done(item)
                if time.monotonic() - last >= _CHECKPOINT_S and run.manifest.legacy_ids is None:
                    flush()
                    run.checkpoint()
        flush()
        run.checkpoint(complete=True)
    finally:
        lines.close()


# ---- the export --------------------------------------------------------------------------------------


def export_dataset(
    engine: Engine,
    storage: Storage,
    dataset: str,
    *,
    fmt: str,
    to: str,
    s3_endpoint_url: str | None = None,
    s3_region: str | None = None,
    shard_size: int = 1000,
    parallel: int = DEFAULT_PARALLEL,
    settle_s: float = DEFAULT_SETTLE_S,
    accepted_only: bool | None = None,
) -> ExportResult:
    """Export the succeeded images of ``dataset`` to ``to``; rows exported there before are not written again.

    ``storage`` is the farm's image storage (webdataset and imagefolder copy the images out of it, ``parallel``
    at a time); ``s3_endpoint_url``/``s3_region`` apply to an ``s3://`` destination. Only rows that finished
    more than ``settle_s`` seconds ago are exported (the late-commit rule, in this module's docstring).
    Raises UnknownDataset, ValueError for a bad format, destination or option, CopyFailed when an image is
    missing, does not match its sha256 or cannot be written (after recording what was copied before it).
    ``accepted_only``: only the accepted tries of yield-targeted lines (None: when the dataset has such lines).
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    if settle_s < 0:
        raise ValueError(f"settle_s must not be negative, got {settle_s}")
    # 1. The dataset must exist before anything is created at the destination.
    ds_id = dataset_id(engine, dataset)
    dest = open_destination(to, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
    # A dataset with nothing unfinished has no commit in flight (a late attempt is fenced out): everything that
    # finished before this moment is final, so the margin is not needed (a finished run exports all of it).
    settled = _nothing_unfinished(engine, ds_id)
    cutoff = utcnow() - timedelta(seconds=0 if settled else settle_s)
    with dest.staging() as tmp:
        staging = Path(tmp)
        # 2. What is already there.
        if accepted_only is None:
            accepted_only = _has_rules(engine, ds_id)
        manifest = _read_manifest(dest, staging, dataset, fmt, accepted_only)
        run = _Run(dest, staging, storage, manifest, _Progress(manifest), parallel)
        # 3. The rows after the watermark, in key order, written as new parts; the manifest after each part.
        items = _plan(engine, ds_id, manifest, cutoff)
        if fmt in ("parquet", "jsonl"):
            _export_table(fmt, run, items)
        elif fmt == "webdataset":
            _export_webdataset(run, items, shard_size=shard_size)
        else:
            _export_imagefolder(run, items)
        if run.progress.failures:
            raise run.progress.error()
    exported_late = sum(1 for key in manifest.ahead.values() if key[0] > cutoff)
    return ExportResult(
        dataset=dataset,
        fmt=fmt,
        destination=to,
        new_rows=run.progress.new_rows,
        total_rows=manifest.rows,
        files=tuple(run.files),
        images=run.images,
        held_back=max(0, _count_finished_after(engine, ds_id, cutoff) - exported_late),
    )


def _has_rules(engine: Engine, ds_id: int) -> bool:
    """Whether the dataset has yield-targeted lines (one indexed probe)."""
    with engine.connect() as conn:
        probe = select(AcceptanceLine.line_id).where(AcceptanceLine.dataset_id == ds_id).limit(1)
        return conn.execute(probe).first() is not None


def _nothing_unfinished(engine: Engine, ds_id: int) -> bool:
    """True when no job of the dataset is pending, queued or running (one indexed probe)."""
    unfinished = [JobStatus.PENDING.value, JobStatus.QUEUED.value, JobStatus.RUNNING.value]
    with engine.connect() as conn:
        probe = select(Job.id).where(Job.dataset_id == ds_id, Job.status.in_(unfinished)).limit(1)
        return conn.execute(probe).first() is None


# ---- links to single images --------------------------------------------------------------------------


def job_output_uri(engine: Engine, job_id: str) -> str:
    """The stored image URI of a succeeded job, or NoSuchJob."""
    with engine.connect() as conn:
        found = conn.execute(select(Job.status, Job.output_uri).where(Job.id == job_id)).first()
    if found is None:
        raise NoSuchJob(f"no job with id {job_id!r}")
    if found.output_uri is None:
        raise NoSuchJob(f"job {job_id} has no stored image (it is {found.status})")
    return str(found.output_uri)


def presigned_url(storage: Storage, uri: str, expires_s: int = 3600) -> str:
    """An HTTP(S) URL anyone can GET for ``expires_s`` seconds, for an object in the farm's storage.

    For local storage there is nothing to sign: the ``file://`` URI itself is returned, which only works on
    the machine (or shared filesystem) holding the folder.
    """
    if expires_s < 1:
        raise ValueError(f"expires_s must be at least 1, got {expires_s}")
    return storage.presign(storage.key_for_uri(uri), expires_s)


def describe_files(files: Sequence[str], images: int = 0) -> str:
    """Files written, shortened for a one-line report; ``images`` copied as files of their own are counted."""
    named = (
        "" if not files else ", ".join(files) if len(files) <= 4 else f"{files[0]}, … {files[-1]} ({len(files)} files)"
    )
    counted = f"{images} image{'s' if images != 1 else ''}" if images else ""
    return " + ".join(part for part in (named, counted) if part) or "no files"

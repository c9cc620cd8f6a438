"""Get a dataset out in the form training code reads: parquet, JSON lines, WebDataset shards or an imagefolder.

An export destination is a local folder or ``s3://bucket/prefix``. A small manifest (``_farm_export.json``,
skipped by pyarrow and ``datasets`` because of its leading underscore) lists the exported job ids, so running
the same export again after more jobs finish writes only the new rows: one more part file or shard, and for
imagefolder the new images plus a rewritten ``metadata.jsonl``.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import IO, Any, TypeVar

from sqlalchemy import BigInteger, Float, Integer, select
from sqlalchemy.engine import Engine

from farm.errors import FarmError, StorageError
from farm.job import EXPORT_FIELDS, ExportField
from farm.outputs.destinations import Destination, open_destination
from farm.storage import Storage
from farm.store.queries import dataset_id
from farm.store.schema import Job, JobStatus, utcnow

__all__ = [
    "FIELDS",
    "FORMATS",
    "MANIFEST",
    "ExportResult",
    "NoSuchJob",
    "describe_files",
    "export_dataset",
    "job_output_uri",
    "presigned_url",
]

FORMATS = ("parquet", "jsonl", "webdataset", "imagefolder")
MANIFEST = "_farm_export.json"
# The columns of every format, in this order (farm/job.py's EXPORT_FIELDS).
FIELDS = tuple(field.name for field in EXPORT_FIELDS)
_MANIFEST_VERSION = 1
_DB_CHUNK = 1000  # rows read from the job store at a time
_FETCH_CHUNK = 32  # images held in memory at once while fetching in parallel
_FETCH_THREADS = 8
T = TypeVar("T")


class NoSuchJob(FarmError):
    """No job has that id, or it has no stored image yet."""


@dataclass(frozen=True)
class ExportResult:
    """What an export wrote: the rows new this time, the rows at the destination in all, the files written."""

    dataset: str
    fmt: str
    destination: str
    new_rows: int
    total_rows: int
    files: tuple[str, ...]


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
    return "string"


_KINDS = {field.name: _kind(field) for field in EXPORT_FIELDS}


def _value(field: ExportField, value: Any) -> Any:
    if value is None:
        return None
    if field.source == "render_ms":
        return value / 1000
    if field.source == "finished_at":
        return value.isoformat()
    kind = _KINDS[field.name]
    return int(value) if kind.startswith("int") else float(value) if kind == "float64" else value


def _row(job: Any) -> dict[str, Any]:
    """One export row from a jobs row; timestamps as ISO 8601 UTC, render time in seconds."""
    return {field.name: _value(field, getattr(job, field.source)) for field in EXPORT_FIELDS}


def _succeeded_rows(engine: Engine, ds_id: int, skip: set[str]) -> Iterator[dict[str, Any]]:
    """Rows of the dataset's succeeded jobs not in ``skip``, oldest first, read in chunks."""
    columns = [getattr(Job, name) for name in _JOB_COLUMNS]
    stmt = (
        select(*columns)
        .where(Job.dataset_id == ds_id, Job.status == JobStatus.SUCCEEDED.value)
        .order_by(Job.finished_at, Job.id)
    )
    with engine.connect() as conn:
        for job in conn.execution_options(yield_per=_DB_CHUNK).execute(stmt):
            if job.id not in skip:
                yield _row(job)


_JOB_COLUMNS = tuple(field.source for field in EXPORT_FIELDS)


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    chunk: list[T] = []
    for item in items:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---- images from the farm's storage ----------------------------------------------------------------


def _fetch(storage: Storage, dataset: str, row: dict[str, Any]) -> bytes:
    """A job's image, checked against the SHA-256 recorded when it was rendered."""
    if not row["uri"]:
        raise StorageError(f"job {row['job_id']} succeeded without a recorded image URI")
    return storage.read_verified(row["uri"], row["sha256"], what=f"the image of job {row['job_id']}")


def _with_images(
    storage: Storage, dataset: str, rows: Iterable[dict[str, Any]]
) -> Iterator[tuple[dict[str, Any], bytes]]:
    """Rows paired with their images, in order, fetched a few in parallel (S3 latency dominates)."""
    with ThreadPoolExecutor(max_workers=_FETCH_THREADS, thread_name_prefix="farm-export") as pool:
        for chunk in _chunks(rows, _FETCH_CHUNK):
            images = pool.map(lambda row: _fetch(storage, dataset, row), chunk)
            yield from zip(chunk, images, strict=True)


# ---- manifest ----------------------------------------------------------------------------------------


def _read_manifest(dest: Destination, staging: Path, dataset: str, fmt: str) -> dict[str, Any]:
    """The destination's manifest, or an empty one; refuses a destination holding another export."""
    path = staging / MANIFEST
    if not dest.fetch(MANIFEST, path):
        return {"version": _MANIFEST_VERSION, "dataset": dataset, "format": fmt, "next_part": 0, "job_ids": []}
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise FarmError(f"the export manifest {MANIFEST} at the destination is unreadable: {exc}") from exc
    path.unlink()
    if manifest.get("dataset") != dataset or manifest.get("format") != fmt:
        raise ValueError(
            f"the destination already holds a {manifest.get('format')} export of dataset "
            f"{manifest.get('dataset')!r}; export {fmt} of {dataset!r} to another place"
        )
    return manifest


# ---- writers -----------------------------------------------------------------------------------------


def _write_parquet(rows: Iterable[dict[str, Any]], path: Path) -> int:
    """Rows to one parquet file with a fixed schema, so every part reads as one table."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(name, getattr(pa, kind)()) for name, kind in _KINDS.items()])
    count = 0
    with pq.ParquetWriter(path, schema) as writer:
        for chunk in _chunks(rows, _DB_CHUNK):
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


def _export_parquet_or_jsonl(
    fmt: str, rows: Iterable[dict[str, Any]], staging: Path, dest: Destination, manifest: dict[str, Any]
) -> tuple[list[str], list[str]]:
    """One more part file holding only the new rows; nothing is written when there are none."""
    ids: list[str] = []

    def tracked() -> Iterator[dict[str, Any]]:
        for row in rows:
            ids.append(row["job_id"])
            yield row

    name = f"part-{int(manifest['next_part']):05d}.{fmt}"
    path = staging / name
    if fmt == "parquet":
        _write_parquet(tracked(), path)
    else:
        with path.open("w", encoding="utf-8") as f:
            _write_jsonl(tracked(), f)
    if not ids:
        return [], []
    dest.publish(path, name)
    manifest["next_part"] = int(manifest["next_part"]) + 1
    return [name], ids


def _export_webdataset(
    rows: Iterable[dict[str, Any]],
    staging: Path,
    dest: Destination,
    manifest: dict[str, Any],
    *,
    storage: Storage,
    dataset: str,
    shard_size: int,
) -> tuple[list[str], list[str]]:
    """New rows in new shards (``shard-000000.tar``, …), each sample ``{job_id}.png`` + ``{job_id}.json``."""
    written: list[str] = []
    ids: list[str] = []
    now = utcnow().timestamp()
    for shard in _chunks(_with_images(storage, dataset, rows), shard_size):
        name = f"shard-{int(manifest['next_part']):06d}.tar"
        path = staging / name
        with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
            for row, image in shard:
                _add_member(tar, f"{row['job_id']}.png", image, now)
                _add_member(tar, f"{row['job_id']}.json", json.dumps(row, ensure_ascii=False).encode(), now)
        dest.publish(path, name)
        manifest["next_part"] = int(manifest["next_part"]) + 1
        written.append(name)
        ids.extend(row["job_id"] for row, _ in shard)
    return written, ids


def _export_imagefolder(
    rows: Iterable[dict[str, Any]],
    staging: Path,
    dest: Destination,
    *,
    storage: Storage,
    dataset: str,
) -> tuple[list[str], list[str]]:
    """New images as ``{job_id}.png``; ``metadata.jsonl`` rewritten as the old lines plus the new ones."""
    metadata = staging / "metadata.jsonl"
    if not dest.fetch("metadata.jsonl", metadata):
        metadata.touch()
    written: list[str] = []
    ids: list[str] = []
    with metadata.open("a", encoding="utf-8") as f:
        for row, image in _with_images(storage, dataset, rows):
            name = f"{row['job_id']}.png"
            path = staging / name
            path.write_bytes(image)
            dest.publish(path, name)
            f.write(json.dumps({"file_name": name, **row}, ensure_ascii=False) + "\n")
            written.append(name)
            ids.append(row["job_id"])
    if ids:
        # After the images, so every line of metadata.jsonl names a file that is already there.
        dest.publish(metadata, "metadata.jsonl")
        written.append("metadata.jsonl")
    return written, ids


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
) -> ExportResult:
    """Export the succeeded images of ``dataset`` to ``to``; rows exported there before are not written again.

    ``storage`` is the farm's image storage (webdataset and imagefolder copy the images out of it);
    ``s3_endpoint_url``/``s3_region`` apply to an ``s3://`` destination. Raises UnknownDataset, ValueError
    for a bad format or destination, StorageError when an image is missing or does not match its sha256.
    """
    if fmt not in FORMATS:
        raise ValueError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    # 1. The dataset must exist before anything is created at the destination.
    ds_id = dataset_id(engine, dataset)
    dest = open_destination(to, s3_endpoint_url=s3_endpoint_url, s3_region=s3_region)
    with dest.staging() as tmp:
        staging = Path(tmp)
        # 2. What is already there.
        manifest = _read_manifest(dest, staging, dataset, fmt)
        done = set(manifest["job_ids"])
        rows = _succeeded_rows(engine, ds_id, done)
        # 3. Write and publish the new rows' files.
        if fmt in ("parquet", "jsonl"):
            files, ids = _export_parquet_or_jsonl(fmt, rows, staging, dest, manifest)
        elif fmt == "webdataset":
            files, ids = _export_webdataset(
                rows, staging, dest, manifest, storage=storage, dataset=dataset, shard_size=shard_size
            )
        else:
            files, ids = _export_imagefolder(rows, staging, dest, storage=storage, dataset=dataset)
        # 4. The manifest last: a crash before this leaves files that the next run overwrites.
        if ids:
            manifest["job_ids"] = [*manifest["job_ids"], *ids]
            manifest["updated_at"] = utcnow().isoformat()
            path = staging / MANIFEST
            path.write_text(json.dumps(manifest, indent=0) + "\n", encoding="utf-8")
            dest.publish(path, MANIFEST)
    return ExportResult(
        dataset=dataset,
        fmt=fmt,
        destination=to,
        new_rows=len(ids),
        total_rows=len(manifest["job_ids"]),
        files=tuple(files),
    )


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


def describe_files(files: Sequence[str]) -> str:
    """Files written, shortened for a one-line report."""
    if not files:
        return "no files"
    return ", ".join(files) if len(files) <= 4 else f"{files[0]}, … {files[-1]} ({len(files)} files)"

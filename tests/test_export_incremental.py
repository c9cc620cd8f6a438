"""farm.outputs.export at dataset scale: a watermark instead of an id list, the late-commit rule, new parts only,
bounded parallel copies, failures that a rerun completes, and destinations exported by the first version.

Real parts throughout, as in tests/test_export.py: a SQLite job store (and PostgreSQL for the concurrent
late commit), LocalStorage or moto's S3 server over HTTP, real PNG bytes. A counting wrapper around the real
storage tells how many images each run read.
"""

from __future__ import annotations

import io
import json
import tarfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import insert, select, update
from sqlalchemy.engine import Engine

import farm.outputs.export as export_module
from farm.errors import StorageError
from farm.outputs.destinations import open_destination
from farm.outputs.export import MANIFEST, CopyFailed, export_dataset
from farm.settings import Settings, load_settings
from farm.storage import Storage, StoredObject, object_key, open_storage
from farm.storage.local import LocalStorage
from farm.store import transitions
from farm.store.engine import make_engine, open_store
from farm.store.schema import Dataset, Job, JobStatus, utcnow
from tests.support.s3 import S3Server
from tests.test_export import HEIGHT, WIDTH, _png, add_jobs

FORMATS = ("parquet", "jsonl", "webdataset", "imagefolder")


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return load_settings({}, home=str(tmp_path / "home"))


@pytest.fixture()
def engine(settings: Settings) -> Iterator[Engine]:
    eng = open_store(settings)
    yield eng
    eng.dispose()


class CountingStorage(Storage):
    """A real storage that counts the objects read from it, per key (thread-safe)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.prefix = inner.prefix
        self.reads: Counter[str] = Counter()
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes:
        with self._lock:
            self.reads[key] += 1
        return self.inner.get(key)

    def reads_of(self, job_ids: list[str], dataset: str = "ds") -> list[int]:
        return [self.reads[object_key(self.prefix, dataset, job_id, 1)] for job_id in job_ids]

    def put(
        self, key: str, data: bytes, *, content_type: str = "image/png", metadata: Mapping[str, str] | None = None
    ) -> StoredObject:
        return self.inner.put(key, data, content_type=content_type, metadata=metadata)

    def put_file(self, key: str, path: Path, *, content_type: str) -> StoredObject:
        return self.inner.put_file(key, path, content_type=content_type)

    def head(self, key: str) -> StoredObject | None:
        return self.inner.head(key)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def list_keys(self, prefix: str) -> Iterator[str]:
        return self.inner.list_keys(prefix)

    def uri_for(self, key: str) -> str:
        return self.inner.uri_for(key)

    def key_for_uri(self, uri: str) -> str:
        return self.inner.key_for_uri(uri)

    def presign(self, key: str, expires_s: int) -> str:
        return self.inner.presign(key, expires_s)

    def describe(self) -> str:
        return self.inner.describe()


@pytest.fixture()
def storage(settings: Settings) -> CountingStorage:
    return CountingStorage(open_storage(settings.storage_url))


def _snapshot(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Every file under ``folder``: (size, mtime in ns, inode); a rewritten file changes at least one."""
    found: dict[str, tuple[int, int, int]] = {}
    for path in folder.rglob("*"):
        if path.is_file():
            st = path.stat()
            found[path.relative_to(folder).as_posix()] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return found


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


def _exported_ids(dest: Path, fmt: str) -> list[str]:
    """The job ids at a local destination, in file order, read the way each format's users read it."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return [
            i for part in sorted(dest.glob("part-*.parquet")) for i in pq.read_table(part).column("job_id").to_pylist()
        ]
    if fmt == "jsonl":
        return [row["job_id"] for part in sorted(dest.glob("part-*.jsonl")) for row in _read_jsonl(part)]
    if fmt == "webdataset":
        ids: list[str] = []
        for shard in sorted(dest.glob("shard-*.tar")):
            with tarfile.open(shard) as tar:
                for name in tar.getnames():
                    if name.endswith(".json"):
                        meta = json.loads(tar.extractfile(name).read())  # type: ignore[union-attr]
                        assert name == f"{meta['job_id']}.json"
                        ids.append(meta["job_id"])
        return ids
    lines = _read_jsonl(dest / "metadata.jsonl")
    assert all((dest / line["file_name"]).is_file() for line in lines)
    return [line["job_id"] for line in lines]


def _manifest(dest: Path) -> dict[str, Any]:
    return dict(json.loads((dest / MANIFEST).read_text(encoding="utf-8")))


def _later(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The exporter's clock, ``seconds`` from now: how a test lets rows age past the settle time."""
    base = utcnow() + timedelta(seconds=seconds)
    monkeypatch.setattr(export_module, "utcnow", lambda: base)


def _key_order(engine: Engine, ids: list[str]) -> list[str]:
    with engine.connect() as conn:
        rows = conn.execute(select(Job.id, Job.finished_at).where(Job.id.in_(ids))).all()
    return [row.id for row in sorted(rows, key=lambda r: (r.finished_at, r.id))]


# ---- O(new rows) -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_second_export_reads_and_writes_only_the_new_rows(
    engine: Engine, storage: CountingStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    first = add_jobs(engine, storage, "ds", 5)
    dest = tmp_path / fmt
    export_dataset(engine, storage, "ds", fmt=fmt, to=str(dest), shard_size=2)
    copies = 1 if fmt in ("webdataset", "imagefolder") else 0
    assert storage.reads_of(first) == [copies] * 5
    before = _snapshot(dest)

    # Count the rows the job store hands back: only the new ones, however many were exported before.
    fetched: list[str] = []
    real_row = export_module._row

    def counting_row(job: Any) -> Any:
        fetched.append(job.id)
        return real_row(job)

    monkeypatch.setattr(export_module, "_row", counting_row)
    more = add_jobs(engine, storage, "ds", 3, first_seed=10)
    again = export_dataset(engine, storage, "ds", fmt=fmt, to=str(dest), shard_size=2)
    assert (again.new_rows, again.total_rows) == (3, 8)
    assert sorted(fetched) == sorted(more)
    assert storage.reads_of(first) == [copies] * 5 and storage.reads_of(more) == [copies] * 3
    assert _exported_ids(dest, fmt) == first + more

    # Nothing there before was rewritten; only metadata.jsonl grew, in place, by the new lines.
    after = _snapshot(dest)
    for name, (size, mtime, inode) in before.items():
        if name == MANIFEST:
            continue
        if name == "metadata.jsonl":
            assert after[name][2] == inode and after[name][0] > size
        else:
            assert after[name] == (size, mtime, inode), name
    new_files = sorted(set(after) - set(before))
    expected = {
        "parquet": ["part-00001.parquet"],
        "jsonl": ["part-00001.jsonl"],
        "webdataset": ["shard-000003.tar", "shard-000004.tar"],
        "imagefolder": sorted(f"{i}.png" for i in more),
    }[fmt]
    assert new_files == expected


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_rerun_with_nothing_new_writes_nothing(
    engine: Engine, storage: CountingStorage, tmp_path: Path, fmt: str
) -> None:
    add_jobs(engine, storage, "ds", 4)
    dest = tmp_path / fmt
    export_dataset(engine, storage, "ds", fmt=fmt, to=str(dest), shard_size=3)
    before, reads = _snapshot(dest), sum(storage.reads.values())
    time.sleep(0.01)  # a rewrite would show in the mtimes
    nothing = export_dataset(engine, storage, "ds", fmt=fmt, to=str(dest), shard_size=3)
    assert (nothing.new_rows, nothing.total_rows, nothing.files, nothing.images) == (0, 4, (), 0)
    assert _snapshot(dest) == before  # the manifest too
    assert sum(storage.reads.values()) == reads


def test_keyset_pages_cross_ties_in_finished_at(
    engine: Engine, storage: CountingStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(export_module, "_DB_PAGE", 3)  # many pages from a few rows
    ids = add_jobs(engine, storage, "ds", 10)
    tie = utcnow() - timedelta(hours=2)
    with engine.begin() as conn:  # every row finished in the same microsecond: the id breaks the tie
        conn.execute(update(Job).where(Job.id.in_(ids)).values(finished_at=tie))
    dest = tmp_path / "jsonl"
    assert export_dataset(engine, storage, "ds", fmt="jsonl", to=str(dest)).new_rows == 10
    assert _exported_ids(dest, "jsonl") == sorted(ids)
    assert _manifest(dest)["watermark"] == [tie.isoformat(), max(ids)]
    more = add_jobs(engine, storage, "ds", 4, first_seed=20)
    assert export_dataset(engine, storage, "ds", fmt="jsonl", to=str(dest)).new_rows == 4
    assert _exported_ids(dest, "jsonl") == [*sorted(ids), *more]


# ---- the late-commit rule ----------------------------------------------------------------------------------


def _running(engine: Engine, storage: Storage, dataset: str, count: int, worker: str) -> list[tuple[str, StoredObject]]:
    """Jobs a worker holds (running, claim 1), their images already stored: (id, object) each."""
    with engine.begin() as conn:
        ds_id = conn.execute(select(Dataset.id).where(Dataset.name == dataset)).scalar_one()
        held: list[tuple[str, StoredObject]] = []
        for n in range(count):
            job_id = uuid.uuid4().hex
            stored = storage.put(object_key(storage.prefix, dataset, job_id, 1), _png(100 + n))
            conn.execute(
                insert(Job).values(
                    id=job_id,
                    dataset_id=ds_id,
                    prompt=f"late {n}",
                    seed=100 + n,
                    width=WIDTH,
                    height=HEIGHT,
                    num_inference_steps=4,
                    guidance_scale=0.0,
                    model="tiny",
                    status=JobStatus.RUNNING.value,
                    attempts=1,
                    claim_seq=1,
                    worker=worker,
                )
            )
            held.append((job_id, stored))
    return held


def _succeed(conn: Any, job: tuple[str, StoredObject], worker: str) -> None:
    assert transitions.mark_succeeded(conn, job[0], worker=worker, seq=1, stored=job[1], render_ms=1000)


def test_a_row_stamped_by_a_lagging_clock_and_committed_late_is_not_skipped(
    engine: Engine, storage: CountingStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite: one writer at a time, so the late row's worker clock lags (the other half of the rule's reason)."""
    base = add_jobs(engine, storage, "ds", 3)
    late, prompt = _running(engine, storage, "ds", 2, "gpu0#a")
    naive, safe = tmp_path / "naive", tmp_path / "safe"
    with engine.begin() as conn:
        _succeed(conn, prompt, "gpu0#a")  # finished now, committed at once
    # The late job: its worker's clock is 30 s behind, and its transaction stays open over the exports.
    real_utcnow = transitions.utcnow
    monkeypatch.setattr(transitions, "utcnow", lambda: real_utcnow() - timedelta(seconds=30))
    with engine.connect() as conn:
        transaction = conn.begin()
        _succeed(conn, late, "gpu0#a")
        monkeypatch.setattr(transitions, "utcnow", real_utcnow)
        first_naive = export_dataset(engine, storage, "ds", fmt="jsonl", to=str(naive), settle_s=0)
        first_safe = export_dataset(engine, storage, "ds", fmt="jsonl", to=str(safe))
        transaction.commit()
    assert first_naive.new_rows == 4  # base + the prompt job; the late one is not visible yet
    assert (first_safe.new_rows, first_safe.held_back) == (3, 1)
    assert _key_order(engine, [late[0], prompt[0]]) == [late[0], prompt[0]]  # the late row sorts earlier

    # Without a settle time its key is already behind the watermark: skipped for good.
    assert export_dataset(engine, storage, "ds", fmt="jsonl", to=str(naive), settle_s=0).new_rows == 0
    assert late[0] not in _exported_ids(naive, "jsonl")
    # With it, both wait until they are a minute old, then go out in key order.
    waiting = export_dataset(engine, storage, "ds", fmt="jsonl", to=str(safe))
    assert (waiting.new_rows, waiting.held_back, waiting.files) == (0, 2, ())
    _later(monkeypatch, 120)
    done = export_dataset(engine, storage, "ds", fmt="jsonl", to=str(safe))
    assert (done.new_rows, done.held_back, done.total_rows) == (2, 0, 5)
    assert _exported_ids(safe, "jsonl") == [*base, late[0], prompt[0]]


def test_a_late_commit_on_postgresql_is_exported_once_it_settles(
    pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: a transaction that marked its job first commits after a later one was committed and read."""
    engine = make_engine(pg_url)
    storage = CountingStorage(LocalStorage(tmp_path / "images"))
    dataset = f"late-{uuid.uuid4().hex[:8]}"
    try:
        base = add_jobs(engine, storage, dataset, 2)
        late, prompt = _running(engine, storage, dataset, 2, "gpu1#b")
        naive, safe = tmp_path / "naive", tmp_path / "safe"
        with engine.connect() as slow:
            transaction = slow.begin()
            _succeed(slow, late, "gpu1#b")  # finished_at stamped now; the commit comes later
            time.sleep(0.01)
            with engine.begin() as fast:
                _succeed(fast, prompt, "gpu1#b")  # finished after it, committed before it
            assert export_dataset(engine, storage, dataset, fmt="jsonl", to=str(naive), settle_s=0).new_rows == 3
            assert export_dataset(engine, storage, dataset, fmt="jsonl", to=str(safe)).held_back == 1
            transaction.commit()
        assert _key_order(engine, [late[0], prompt[0]]) == [late[0], prompt[0]]
        assert export_dataset(engine, storage, dataset, fmt="jsonl", to=str(naive), settle_s=0).new_rows == 0
        assert late[0] not in _exported_ids(naive, "jsonl")  # what the settle time is for
        _later(monkeypatch, 120)
        assert export_dataset(engine, storage, dataset, fmt="jsonl", to=str(safe)).new_rows == 2
        assert _exported_ids(safe, "jsonl") == [*base, late[0], prompt[0]]
    finally:
        engine.dispose()


# ---- destinations written by the first version -------------------------------------------------------------


def _as_version_1(dest: Path, fmt: str, ids: list[str], next_part: int) -> None:
    """The manifest the first version wrote: every exported id (its files are the same as this version's)."""
    doc = {"version": 1, "dataset": "ds", "format": fmt, "next_part": next_part, "job_ids": ids}
    (dest / MANIFEST).write_text(json.dumps(doc, indent=0) + "\n", encoding="utf-8")


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_export_of_the_first_version_is_continued_without_duplicates(
    engine: Engine, storage: CountingStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    # The first version exported everything succeeded at the time, including a job that had just finished.
    old = add_jobs(engine, storage, "ds", 3)
    recent = add_jobs(engine, storage, "ds", 1, first_seed=3, ago_s=5)
    dest = tmp_path / fmt
    first = export_dataset(engine, storage, "ds", fmt=fmt, to=str(dest), settle_s=0, shard_size=2)
    _as_version_1(dest, fmt, old + recent, next_part=len(first.files) if fmt != "imagefolder" else 0)

    # Since then: a row committed late with an old finished_at, and new rows.
    missed = add_jobs(engine, storage, "ds", 1, first_seed=4, ago_s=7200)
    new = add_jobs(engine, storage, "ds", 2, first_seed=5, ago_s=1800)
    converted = export_dataset(engine, storage, "ds", fmt=fmt, to=str(dest), shard_size=2)
    assert (converted.new_rows, converted.total_rows, converted.held_back) == (3, 7, 0)
    copies = 1 if fmt in ("webdataset", "imagefolder") else 0
    assert storage.reads_of(old + recent) == [copies] * 4  # by the first export only
    assert storage.reads_of(missed + new) == [copies] * 3
    manifest = _manifest(dest)
    assert manifest["version"] == 2 and "job_ids" not in manifest and manifest["rows"] == 7
    # The job listed but finished within the settle time is remembered as exported, past the watermark.
    assert [entry[1] for entry in manifest["ahead"]] == recent

    _later(monkeypatch, 120)
    settled = export_dataset(engine, storage, "ds", fmt=fmt, to=str(dest), shard_size=2)
    assert (settled.new_rows, settled.total_rows, settled.files) == (0, 7, ())
    assert _manifest(dest)["ahead"] == []
    exported = _exported_ids(dest, fmt)
    assert sorted(exported) == sorted(old + recent + missed + new) and len(exported) == 7


# ---- failures ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["webdataset", "imagefolder"])
def test_a_failed_copy_records_the_prefix_and_a_rerun_completes_it_without_duplicates(
    engine: Engine, storage: CountingStorage, tmp_path: Path, fmt: str
) -> None:
    ids = add_jobs(engine, storage, "ds", 24)
    assert isinstance(storage.inner, LocalStorage)
    bad = storage.inner.root / object_key("", "ds", ids[6], 1)
    bad.write_bytes(_png(99))
    dest = tmp_path / fmt
    with pytest.raises(CopyFailed, match=f"job {ids[6]}.*sha256.*run it again") as failed:
        export_dataset(engine, storage, "ds", fmt=fmt, to=str(dest), parallel=4, shard_size=4)
    assert failed.value.job_id == ids[6]

    # The watermark stops at the last row before the failed one; rows copied past it are listed as ahead.
    manifest = _manifest(dest)
    with engine.connect() as conn:
        at = conn.execute(select(Job.finished_at).where(Job.id == ids[5])).scalar_one()
    assert manifest["watermark"] == [at.isoformat(), ids[5]]
    ahead = [entry[1] for entry in manifest["ahead"]]
    exported = _exported_ids(dest, fmt)
    assert exported == ids[:6] + ahead and ids[6] not in exported
    assert set(ahead) <= set(ids[7:15])  # at most 2 × parallel rows taken past the failure
    assert manifest["rows"] == len(exported)
    before = _snapshot(dest)

    bad.write_bytes(_png(6))
    again = export_dataset(engine, storage, "ds", fmt=fmt, to=str(dest), parallel=4, shard_size=4)
    assert (again.new_rows, again.total_rows) == (24 - len(exported), 24)
    exported = _exported_ids(dest, fmt)
    assert sorted(exported) == sorted(ids) and len(exported) == 24
    # Every image was read once, the failed one twice; nothing at the destination was written again.
    assert storage.reads_of(ids) == [2 if n == 6 else 1 for n in range(24)]
    after = _snapshot(dest)
    assert all(after[name] == stat for name, stat in before.items() if name not in (MANIFEST, "metadata.jsonl"))
    assert _manifest(dest)["ahead"] == []


def test_a_destination_that_refuses_a_write_names_the_job(
    engine: Engine, storage: CountingStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = add_jobs(engine, storage, "ds", 5)
    dest = tmp_path / "folder"
    (dest / f"{ids[2]}.png").mkdir(parents=True)  # a folder where the image goes: the rename fails
    with pytest.raises(CopyFailed, match=f"job {ids[2]}"):
        export_dataset(engine, storage, "ds", fmt="imagefolder", to=str(dest), parallel=2)
    (dest / f"{ids[2]}.png").rmdir()
    export_dataset(engine, storage, "ds", fmt="imagefolder", to=str(dest), parallel=2)
    assert sorted(_exported_ids(dest, "imagefolder")) == sorted(ids)


def test_metadata_left_by_a_run_that_died_mid_append_is_cut_back(
    engine: Engine, storage: CountingStorage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    datasets = pytest.importorskip("datasets")
    ids = add_jobs(engine, storage, "ds", 3)
    dest = tmp_path / "folder"
    export_dataset(engine, storage, "ds", fmt="imagefolder", to=str(dest))
    with (dest / "metadata.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"file_name": "half-a-li')  # a run killed while appending, before its manifest
    more = add_jobs(engine, storage, "ds", 2, first_seed=5)
    export_dataset(engine, storage, "ds", fmt="imagefolder", to=str(dest))
    assert _exported_ids(dest, "imagefolder") == ids + more
    assert (dest / "metadata.jsonl").stat().st_size == _manifest(dest)["metadata_bytes"]
    loaded = datasets.load_dataset("imagefolder", data_dir=str(dest), split="train", cache_dir=str(tmp_path / "hf"))
    assert sorted(loaded["seed"]) == [0, 1, 2, 5, 6]


# ---- bounded parallel copies -------------------------------------------------------------------------------


def test_copies_run_at_most_parallel_at_once_and_hold_at_most_twice_that(monkeypatch: pytest.MonkeyPatch) -> None:
    from farm.outputs.export import _Item, _Manifest, _ordered, _Progress, _Row

    parallel, running, most_running = 3, 0, 0
    pulled = 0
    lock = threading.Lock()

    def items() -> Iterator[_Item]:
        nonlocal pulled
        for n in range(50):
            pulled += 1
            yield _Item(_Row((datetime(2026, 1, 1), f"{n:04d}"), {}), new=n % 7 != 0)

    def work(row: _Row) -> str:
        nonlocal running, most_running
        with lock:
            running += 1
            most_running = max(most_running, running)
        time.sleep(0.002 * (int(row.job_id) % 3))  # finish out of order
        with lock:
            running -= 1
        return row.job_id

    progress = _Progress(_Manifest(dataset="ds", fmt="webdataset"))
    seen: list[str] = []
    for item, result, error in _ordered(items(), work, parallel, progress):
        assert error is None and pulled - len(seen) <= 2 * parallel
        assert result == (item.row.job_id if item.new else None)
        seen.append(item.row.job_id)
    assert seen == [f"{n:04d}" for n in range(50)]  # in input order
    assert 1 < most_running <= parallel


def _s3_tree(server: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    client = server.client()
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    return {key[len(prefix) :]: client.get_object(Bucket=bucket, Key=key)["Body"].read() for key in keys}


def _tar_members(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


@pytest.mark.parametrize("fmt", ["webdataset", "imagefolder"])
def test_parallel_copies_to_s3_give_what_one_at_a_time_gives(
    engine: Engine, s3_server: S3Server, s3_bucket: str, fmt: str
) -> None:
    images = CountingStorage(open_storage(f"s3://{s3_bucket}/images", s3_endpoint_url=s3_server.endpoint_url))
    ids = add_jobs(engine, images, "ds", 14)
    trees = []
    for parallel in (1, 8):
        to = f"s3://{s3_bucket}/p{parallel}"
        result = export_dataset(
            engine,
            images,
            "ds",
            fmt=fmt,
            to=to,
            s3_endpoint_url=s3_server.endpoint_url,
            parallel=parallel,
            shard_size=5,
        )
        assert (result.new_rows, result.total_rows) == (14, 14)
        trees.append(_s3_tree(s3_server, s3_bucket, f"p{parallel}/"))
    sequential, parallel_tree = trees
    assert images.reads_of(ids) == [2] * 14  # once per export
    manifests = [json.loads(tree.pop(MANIFEST)) for tree in trees]
    assert manifests[0]["rows"] == manifests[1]["rows"] == 14
    assert manifests[0]["watermark"] == manifests[1]["watermark"]
    assert sorted(sequential) == sorted(parallel_tree)
    for name, data in sequential.items():
        if name.endswith(".tar"):  # the members' mtime is the run's: compare names and bytes
            assert _tar_members(data) == _tar_members(parallel_tree[name])
        else:
            assert data == parallel_tree[name], name


def test_imagefolder_on_s3_appends_its_metadata_across_runs(
    engine: Engine, s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    images = open_storage(f"s3://{s3_bucket}/images", s3_endpoint_url=s3_server.endpoint_url)
    to = f"s3://{s3_bucket}/folder"
    ids = add_jobs(engine, images, "ds", 3)
    export_dataset(engine, images, "ds", fmt="imagefolder", to=to, s3_endpoint_url=s3_server.endpoint_url)
    more = add_jobs(engine, images, "ds", 2, first_seed=5)
    again = export_dataset(engine, images, "ds", fmt="imagefolder", to=to, s3_endpoint_url=s3_server.endpoint_url)
    assert (again.new_rows, again.total_rows, again.images) == (2, 5, 2)
    tree = _s3_tree(s3_server, s3_bucket, "folder/")
    local = tmp_path / "copy"
    for name, data in tree.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        (local / name).write_bytes(data)
    assert _exported_ids(local, "imagefolder") == ids + more
    assert json.loads(tree[MANIFEST])["metadata_bytes"] == len(tree["metadata.jsonl"])
    datasets = pytest.importorskip("datasets")
    loaded = datasets.load_dataset("imagefolder", data_dir=str(local), split="train", cache_dir=str(tmp_path / "hf"))
    assert loaded.num_rows == 5


def test_s3_append_composes_big_objects_on_the_server(
    s3_server: S3Server, s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest = open_destination(f"s3://{s3_bucket}/big", s3_endpoint_url=s3_server.endpoint_url, s3_region=None)
    old = b"".join(b'{"n": %d, "pad": "%s"}\n' % (n, b"x" * 200) for n in range(30_000))  # about 6.5 MiB
    assert len(old) > 5 * 1024 * 1024
    first, tail, extra = tmp_path / "first", tmp_path / "tail", tmp_path / "extra"
    first.write_bytes(old)
    tail.write_bytes(b'{"n": "new"}\n')
    extra.write_bytes(b'{"n": "left by a crashed run"}\n')
    assert dest.append("metadata.jsonl", first, at=0) == len(old)

    # Above 5 MiB nothing of the old object is downloaded or uploaded again: it is copied on the server.
    gets: list[str] = []
    real_get = dest.storage.get  # type: ignore[attr-defined]
    monkeypatch.setattr(dest.storage, "get", lambda key: gets.append(key) or real_get(key))  # type: ignore[attr-defined]
    assert dest.append("metadata.jsonl", extra, at=len(old)) == len(old) + len(extra.read_bytes())
    # A run that died before its manifest recorded that: the next append starts again from the recorded length.
    assert dest.append("metadata.jsonl", tail, at=len(old)) == len(old) + len(tail.read_bytes())
    assert gets == []
    body = _s3_tree(s3_server, s3_bucket, "big/")["metadata.jsonl"]
    assert body == old + tail.read_bytes()
    with pytest.raises(StorageError, match="shorter than"):
        dest.append("metadata.jsonl", tail, at=len(body) + 1)


# ---- the command line ------------------------------------------------------------------------------------


def test_cli_parallel_and_settle_options(
    engine: Engine, storage: CountingStorage, settings: Settings, tmp_path: Path
) -> None:
    from farm.cli import main

    ids = add_jobs(engine, storage, "ds", 2, ago_s=10)  # finished 10 and 9 s ago
    dest = tmp_path / "cli"
    home = ["--home", str(settings.home)]
    args = [*home, "export", "ds", "--format", "webdataset", "--to", str(dest)]
    waiting = CliRunner().invoke(main, args)
    assert waiting.exit_code == 0, waiting.output
    assert "exported 0 new rows" in waiting.output and "2 finished in the last 60 s wait" in waiting.output
    ok = CliRunner().invoke(main, [*args, "--settle-s", "0", "--parallel", "2"])
    assert ok.exit_code == 0, ok.output
    assert "exported 2 new rows" in ok.output and "shard-000000.tar" in ok.output

    more = add_jobs(engine, storage, "ds", 2, first_seed=5, ago_s=8)  # after the first two
    assert isinstance(storage.inner, LocalStorage)
    (storage.inner.root / object_key("", "ds", more[0], 1)).write_bytes(b"not the image")
    failed = CliRunner().invoke(main, [*args, "--settle-s", "0", "--parallel", "1"])
    assert failed.exit_code == 1
    assert f"job {more[0]}" in failed.output and "run it again" in failed.output
    bad = CliRunner().invoke(main, [*args, "--parallel", "0"])
    assert bad.exit_code == 2 and "--parallel" in bad.output
    assert _exported_ids(dest, "webdataset") == ids


def test_a_finished_dataset_exports_everything_at_once(engine: Engine, storage: Storage, tmp_path: Path) -> None:
    """Nothing pending, queued or running: no commit can be in flight, so the settle margin does not hold back
    images that finished a moment ago; while a job is still unfinished, it does."""
    ids = add_jobs(engine, storage, "fresh", 3, ago_s=10)  # finished seconds ago, plus one pending and one failed
    dest = tmp_path / "out"
    early = export_dataset(engine, storage, "fresh", fmt="jsonl", to=str(dest))
    assert (early.new_rows, early.held_back) == (0, 3)
    with engine.begin() as conn:  # the last unfinished job is canceled: the dataset is done
        conn.execute(update(Job).where(Job.status == JobStatus.PENDING.value).values(status=JobStatus.CANCELED.value))
    done = export_dataset(engine, storage, "fresh", fmt="jsonl", to=str(dest))
    assert (done.new_rows, done.held_back) == (3, 0)
    assert sorted(_exported_ids(dest, "jsonl")) == sorted(ids)

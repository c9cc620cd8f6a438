"""farm.outputs.export and `farm export` / `farm url`: every format read back by the library its users read it with.

Real parts throughout: a SQLite job store at the current schema, LocalStorage or moto's S3 server over HTTP,
real PNG bytes. Jobs are inserted already succeeded, so no workers are needed.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import insert, select
from sqlalchemy.engine import Engine

from farm.errors import StorageError, UnknownDataset
from farm.outputs.export import FIELDS, MANIFEST, CopyFailed, export_dataset, presigned_url
from farm.settings import Settings, load_settings
from farm.storage import Storage, object_key, open_storage
from farm.storage.local import LocalStorage
from farm.storage.s3 import S3Storage
from farm.store.engine import open_store
from farm.store.schema import Dataset, Job, JobStatus, utcnow
from tests.support.s3 import S3Server

WIDTH, HEIGHT = 64, 48


@pytest.fixture()
def settings(tmp_path: Path) -> Settings:
    return load_settings({}, home=str(tmp_path / "home"))


@pytest.fixture()
def engine(settings: Settings) -> Iterator[Engine]:
    """The embedded SQLite job store of ``settings``, created at the current schema."""
    eng = open_store(settings)
    yield eng
    eng.dispose()


@pytest.fixture()
def storage(settings: Settings) -> Storage:
    return open_storage(settings.storage_url)


def _png(seed: int, width: int = WIDTH, height: int = HEIGHT) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), ((seed * 37) % 256, (seed * 91) % 256, 128)).save(buf, format="PNG")
    return buf.getvalue()


def add_jobs(
    engine: Engine, storage: Storage, dataset: str, count: int, *, first_seed: int = 0, ago_s: float = 3600
) -> list[str]:
    """Insert ``count`` succeeded jobs (images stored) plus one failed and one pending job; the succeeded ids.

    Job ``i`` finished ``ago_s`` seconds before now plus ``first_seed + i`` seconds: by default long enough ago
    for an export's settle time (rows that finished in the last minute wait for the next export).
    """
    now = utcnow() - timedelta(seconds=ago_s)
    with engine.begin() as conn:
        ds_id = conn.execute(select(Dataset.id).where(Dataset.name == dataset)).scalar()
        if ds_id is None:
            ds_id = conn.execute(insert(Dataset).values(name=dataset).returning(Dataset.id)).scalar_one()
        ids: list[str] = []
        rows: list[dict[str, Any]] = []
        for i in range(count):
            seed = first_seed + i
            job_id = uuid.uuid4().hex
            stored = storage.put(object_key(storage.prefix, dataset, job_id, 1), _png(seed))
            controlled = seed % 2 == 1
            rows.append(
                {
                    "id": job_id,
                    "dataset_id": ds_id,
                    "prompt": f"a lighthouse at dusk, take {seed}",
                    "seed": seed,
                    "width": WIDTH,
                    "height": HEIGHT,
                    "num_inference_steps": 4,
                    "guidance_scale": 0.0,
                    "model": "tiny",
                    "controlnet": "tiny-controlnet" if controlled else None,
                    "conditioning_scale": 0.75 if controlled else None,
                    "quantize": "int8" if controlled else None,
                    "status": JobStatus.SUCCEEDED.value,
                    "attempts": 1,
                    "worker": "gpu0@box",
                    "finished_at": now + timedelta(seconds=seed),
                    "output_uri": stored.uri,
                    "sha256": stored.sha256,
                    "bytes": stored.bytes,
                    "render_ms": 1500 + seed,
                }
            )
            ids.append(job_id)
        conn.execute(insert(Job), rows)
        for state in (JobStatus.FAILED, JobStatus.PENDING):
            conn.execute(
                insert(Job).values(
                    {
                        "id": uuid.uuid4().hex,
                        "dataset_id": ds_id,
                        "prompt": f"not rendered ({state})",
                        "seed": 999,
                        "width": WIDTH,
                        "height": HEIGHT,
                        "num_inference_steps": 4,
                        "guidance_scale": 0.0,
                        "model": "tiny",
                        "status": state.value,
                        "error": "boom" if state is JobStatus.FAILED else None,
                    }
                )
            )
    return ids


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]


# ---- parquet and jsonl -----------------------------------------------------------------------------


def test_parquet_export_reads_back_with_pyarrow_and_grows_incrementally(
    engine: Engine, storage: Storage, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    first = add_jobs(engine, storage, "ds", 3)
    dest = tmp_path / "out"

    result = export_dataset(engine, storage, "ds", fmt="parquet", to=str(dest))
    assert (result.new_rows, result.total_rows, result.files) == (3, 3, ("part-00000.parquet",))
    table = pq.read_table(dest)
    assert table.column_names == list(FIELDS)
    rows = sorted(table.to_pylist(), key=lambda r: r["seed"])
    assert [r["job_id"] for r in rows] == first
    assert rows[0]["prompt"] == "a lighthouse at dusk, take 0"
    assert rows[1]["controlnet"] == "tiny-controlnet" and rows[1]["conditioning_scale"] == 0.75
    assert rows[1]["quantize"] == "int8" and rows[0]["controlnet"] is None
    assert rows[2]["render_seconds"] == pytest.approx(1.502)
    assert rows[0]["uri"].startswith("file://") and rows[0]["bytes"] == len(_png(0))
    assert rows[0]["sha256"] == hashlib.sha256(_png(0)).hexdigest()

    more = add_jobs(engine, storage, "ds", 2, first_seed=10)
    again = export_dataset(engine, storage, "ds", fmt="parquet", to=str(dest))
    assert (again.new_rows, again.total_rows, again.files) == (2, 5, ("part-00001.parquet",))
    assert sorted(pq.read_table(dest / "part-00001.parquet").column("job_id").to_pylist()) == sorted(more)
    everything = pq.read_table(dest)
    assert everything.num_rows == 5
    assert set(everything.column("job_id").to_pylist()) == {*first, *more}

    nothing = export_dataset(engine, storage, "ds", fmt="parquet", to=str(dest))
    assert (nothing.new_rows, nothing.total_rows, nothing.files) == (0, 5, ())
    assert sorted(p.name for p in dest.iterdir()) == [MANIFEST, "part-00000.parquet", "part-00001.parquet"]


def test_jsonl_export_has_every_field_and_only_succeeded_jobs(engine: Engine, storage: Storage, tmp_path: Path) -> None:
    ids = add_jobs(engine, storage, "ds", 4)
    dest = tmp_path / "jsonl"
    result = export_dataset(engine, storage, "ds", fmt="jsonl", to=dest.as_uri())
    assert result.files == ("part-00000.jsonl",)
    rows = _read_jsonl(dest / "part-00000.jsonl")
    assert [r["job_id"] for r in rows] == ids  # oldest first
    assert all(list(r) == list(FIELDS) for r in rows)
    assert {r["seed"] for r in rows} == {0, 1, 2, 3}
    assert rows[3]["finished_at"].endswith("+00:00")

    add_jobs(engine, storage, "ds", 2, first_seed=20)
    again = export_dataset(engine, storage, "ds", fmt="jsonl", to=str(dest))
    assert (again.new_rows, again.total_rows) == (2, 6)
    assert [r["seed"] for r in _read_jsonl(dest / "part-00001.jsonl")] == [20, 21]


def test_destination_holding_another_export_is_refused(engine: Engine, storage: Storage, tmp_path: Path) -> None:
    add_jobs(engine, storage, "ds", 1)
    add_jobs(engine, storage, "other", 1)
    export_dataset(engine, storage, "ds", fmt="jsonl", to=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="already holds a jsonl export"):
        export_dataset(engine, storage, "ds", fmt="parquet", to=str(tmp_path / "x"))
    with pytest.raises(ValueError, match="dataset 'ds'"):
        export_dataset(engine, storage, "other", fmt="jsonl", to=str(tmp_path / "x"))
    with pytest.raises(UnknownDataset):
        export_dataset(engine, storage, "missing", fmt="jsonl", to=str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()


# ---- webdataset ------------------------------------------------------------------------------------


def test_webdataset_shards_hold_verified_images_and_their_json(
    engine: Engine, storage: Storage, tmp_path: Path
) -> None:
    ids = add_jobs(engine, storage, "ds", 3)
    dest = tmp_path / "wds"
    result = export_dataset(engine, storage, "ds", fmt="webdataset", to=str(dest), shard_size=2)
    assert result.files == ("shard-000000.tar", "shard-000001.tar")

    with tarfile.open(dest / "shard-000000.tar") as tar:
        names = tar.getnames()
        assert names == [f"{ids[0]}.png", f"{ids[0]}.json", f"{ids[1]}.png", f"{ids[1]}.json"]
        png = tar.extractfile(f"{ids[1]}.png").read()  # type: ignore[union-attr]
        meta = json.loads(tar.extractfile(f"{ids[1]}.json").read())  # type: ignore[union-attr]
    assert hashlib.sha256(png).hexdigest() == meta["sha256"] == hashlib.sha256(_png(1)).hexdigest()
    assert meta["seed"] == 1 and meta["controlnet"] == "tiny-controlnet"

    more = add_jobs(engine, storage, "ds", 2, first_seed=5)
    again = export_dataset(engine, storage, "ds", fmt="webdataset", to=str(dest), shard_size=2)
    assert (again.new_rows, again.total_rows, again.files) == (2, 5, ("shard-000002.tar",))

    wds = pytest.importorskip("webdataset")
    urls = [str(dest / f"shard-{i:06d}.tar") for i in range(3)]
    samples = list(wds.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [*ids, *more]
    assert all(s["png"].size == (WIDTH, HEIGHT) for s in samples)
    assert [s["json"]["seed"] for s in samples] == [0, 1, 2, 5, 6]


def test_an_image_that_does_not_match_its_sha256_fails_the_export(
    engine: Engine, storage: Storage, tmp_path: Path
) -> None:
    ids = add_jobs(engine, storage, "ds", 2)
    assert isinstance(storage, LocalStorage)
    (storage.root / object_key("", "ds", ids[1], 1)).write_bytes(_png(42))
    dest = tmp_path / "wds"
    with pytest.raises(StorageError, match=f"job {ids[1]}.*sha256") as failed:
        export_dataset(engine, storage, "ds", fmt="webdataset", to=str(dest))
    # What was copied before the bad image is recorded (a short shard); the bad one is not.
    assert isinstance(failed.value, CopyFailed) and failed.value.job_id == ids[1]
    assert json.loads((dest / MANIFEST).read_text())["rows"] == 1
    with tarfile.open(dest / "shard-000000.tar") as tar:
        assert tar.getnames() == [f"{ids[0]}.png", f"{ids[0]}.json"]
    # Once the image is right again, the next run writes its row and nothing else.
    (storage.root / object_key("", "ds", ids[1], 1)).write_bytes(_png(1))
    again = export_dataset(engine, storage, "ds", fmt="webdataset", to=str(dest))
    assert (again.new_rows, again.total_rows, again.files) == (1, 2, ("shard-000001.tar",))


# ---- imagefolder -----------------------------------------------------------------------------------


def _load_imagefolder(data_dir: Path, cache: Path) -> Any:
    datasets = pytest.importorskip("datasets")
    return datasets.load_dataset("imagefolder", data_dir=str(data_dir), split="train", cache_dir=str(cache))


def test_imagefolder_loads_with_hugging_face_datasets(
    engine: Engine, storage: Storage, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    ids = add_jobs(engine, storage, "ds", 3)
    dest = tmp_path / "folder"
    result = export_dataset(engine, storage, "ds", fmt="imagefolder", to=str(dest))
    # Images are counted, not listed (an export may copy millions).
    assert (result.files, result.images) == (("metadata.jsonl",), 3)
    assert all((dest / f"{i}.png").read_bytes() == _png(n) for n, i in enumerate(ids))
    lines = _read_jsonl(dest / "metadata.jsonl")
    assert [line["file_name"] for line in lines] == [f"{i}.png" for i in ids]

    loaded = _load_imagefolder(dest, tmp_path / "hf-cache-1")
    assert loaded.num_rows == 3
    by_id = {row["job_id"]: row for row in loaded}
    assert by_id[ids[2]]["prompt"] == "a lighthouse at dusk, take 2" and by_id[ids[2]]["seed"] == 2
    assert by_id[ids[0]]["image"].size == (WIDTH, HEIGHT)
    assert by_id[ids[1]]["image"].convert("RGB").getpixel((0, 0)) == (37, 91, 128)

    more = add_jobs(engine, storage, "ds", 2, first_seed=7)
    again = export_dataset(engine, storage, "ds", fmt="imagefolder", to=str(dest))
    assert (again.new_rows, again.total_rows) == (2, 5)
    assert (again.files, again.images) == (("metadata.jsonl",), 2)
    assert [line["file_name"] for line in _read_jsonl(dest / "metadata.jsonl")] == [f"{i}.png" for i in ids + more]
    reloaded = _load_imagefolder(dest, tmp_path / "hf-cache-2")
    assert reloaded.num_rows == 5
    assert sorted(reloaded["seed"]) == [0, 1, 2, 7, 8]


# ---- S3 ------------------------------------------------------------------------------------------------


def test_export_to_s3_lands_objects_in_the_bucket(
    engine: Engine, storage: Storage, s3_server: S3Server, s3_bucket: str, tmp_path: Path
) -> None:
    import pyarrow.parquet as pq

    add_jobs(engine, storage, "ds", 3)
    to = f"s3://{s3_bucket}/exports/ds"
    result = export_dataset(engine, storage, "ds", fmt="parquet", to=to, s3_endpoint_url=s3_server.endpoint_url)
    assert result.new_rows == 3
    add_jobs(engine, storage, "ds", 2, first_seed=10)
    again = export_dataset(engine, storage, "ds", fmt="parquet", to=to, s3_endpoint_url=s3_server.endpoint_url)
    assert (again.new_rows, again.total_rows, again.files) == (2, 5, ("part-00001.parquet",))

    client = s3_server.client()
    keys = sorted(o["Key"] for o in client.list_objects_v2(Bucket=s3_bucket)["Contents"])
    assert keys == [f"exports/ds/{MANIFEST}", "exports/ds/part-00000.parquet", "exports/ds/part-00001.parquet"]
    for i in range(2):
        body = client.get_object(Bucket=s3_bucket, Key=f"exports/ds/part-0000{i}.parquet")["Body"].read()
        (tmp_path / f"part-{i}.parquet").write_bytes(body)
    assert pq.read_table(tmp_path / "part-0.parquet").num_rows == 3
    assert pq.read_table(tmp_path / "part-1.parquet").column("seed").to_pylist() == [10, 11]


def test_webdataset_from_s3_storage_to_s3(engine: Engine, s3_server: S3Server, s3_bucket: str) -> None:
    images = open_storage(f"s3://{s3_bucket}/images", s3_endpoint_url=s3_server.endpoint_url)
    ids = add_jobs(engine, images, "ds", 2)
    to = f"s3://{s3_bucket}/wds"
    export_dataset(engine, images, "ds", fmt="webdataset", to=to, s3_endpoint_url=s3_server.endpoint_url)
    body = s3_server.client().get_object(Bucket=s3_bucket, Key="wds/shard-000000.tar")["Body"].read()
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        assert tar.extractfile(f"{ids[1]}.png").read() == _png(1)  # type: ignore[union-attr]


# ---- farm url and the CLI ----------------------------------------------------------------------------------


def test_presigned_url_downloads_the_exact_bytes(
    tmp_path: Path, s3_server: S3Server, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from farm.cli import main

    home = tmp_path / "home"
    monkeypatch.setenv("FARM_STORAGE_URL", f"s3://{s3_bucket}/renders")
    monkeypatch.setenv("FARM_S3_ENDPOINT_URL", s3_server.endpoint_url)
    settings = load_settings(home=str(home))
    engine = open_store(settings)
    images = open_storage(settings.storage_url, s3_endpoint_url=settings.s3_endpoint_url)
    assert isinstance(images, S3Storage)
    ids = add_jobs(engine, images, "ds", 1)
    engine.dispose()

    result = CliRunner().invoke(main, ["--home", str(home), "url", ids[0], "--expires-s", "600"])
    assert result.exit_code == 0, result.output
    link = result.output.strip()
    assert link.startswith(f"{s3_server.endpoint_url}/{s3_bucket}/renders/ds/{ids[0]}-1.png?")
    assert "Expires=" in link and "Signature" in link
    with urllib.request.urlopen(link, timeout=10) as response:
        data = response.read()
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(_png(0)).hexdigest()

    missing = CliRunner().invoke(main, ["--home", str(home), "url", "0" * 32])
    assert missing.exit_code == 2 and "no job with id" in missing.output


def test_presigned_url_of_local_storage_is_the_file_uri(engine: Engine, storage: Storage) -> None:
    [job] = add_jobs(engine, storage, "ds", 1)
    uri = storage.uri_for(object_key("", "ds", job, 1))
    assert presigned_url(storage, uri) == uri
    assert Path(urllib.request.url2pathname(uri.removeprefix("file://"))).read_bytes() == _png(0)


def test_cli_export_and_unknown_dataset(engine: Engine, storage: Storage, settings: Settings, tmp_path: Path) -> None:
    from farm.cli import main

    add_jobs(engine, storage, "ds", 2)
    dest = tmp_path / "cli-out"
    home = ["--home", str(settings.home)]
    ok = CliRunner().invoke(main, [*home, "export", "ds", "--format", "jsonl", "--to", str(dest)])
    assert ok.exit_code == 0, ok.output
    assert "exported 2 new rows" in ok.output and "(2 in all)" in ok.output
    assert len(_read_jsonl(dest / "part-00000.jsonl")) == 2

    unknown = CliRunner().invoke(main, [*home, "export", "nope", "--format", "jsonl", "--to", str(dest)])
    assert unknown.exit_code == 2 and "no dataset named 'nope'" in unknown.output

    bad = CliRunner().invoke(main, [*home, "export", "ds", "--format", "parquet", "--to", str(dest)])
    assert bad.exit_code == 2 and "already holds a jsonl export" in bad.output

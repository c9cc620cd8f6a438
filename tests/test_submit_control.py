"""Submitting ControlNet and 8-bit jobs: condition images checked, hashed and stored once; ids stay stable."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from farm.cli import main
from farm.errors import InvalidSubmission, StorageError
from farm.job import JobSpec
from farm.storage import StoredObject, open_storage
from farm.storage.local import LocalStorage
from farm.store.engine import ensure_schema, make_engine
from farm.store.schema import Dataset, Job
from farm.submit.conditions import condition_key
from farm.submit.plan import SubmitOptions, plan_submission, store_conditions
from farm.submit.record import record
from tests.support.s3 import S3Server

CONTROLNET = "tiny-controlnet"


def _png(path: Path, color: tuple[int, int, int] = (255, 255, 255), size: tuple[int, int] = (32, 32)) -> Path:
    """A real PNG: black with a coloured square, so different colours give different bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size)
    image.paste(color, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    image.save(path, format="PNG")
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def _options(**changes: Any) -> SubmitOptions:
    return SubmitOptions(**{"dataset": "d", "controlnet": CONTROLNET, **changes})


class CountingStorage(LocalStorage):
    """A real LocalStorage that also counts its writes."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts = 0

    def put(
        self, key: str, data: bytes, *, content_type: str = "image/png", metadata: Mapping[str, str] | None = None
    ) -> StoredObject:
        self.puts += 1
        return super().put(key, data, content_type=content_type, metadata=metadata)


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    eng = make_engine(f"sqlite:///{tmp_path / 'store' / 'farm.db'}")
    ensure_schema(eng, auto_upgrade=True)
    yield eng
    eng.dispose()


@pytest.fixture()
def storage(tmp_path: Path) -> CountingStorage:
    return CountingStorage(tmp_path / "objects")


def _jobs(engine: Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(select(Job).order_by(Job.source_line, Job.seed)).all())


def _count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


# ---- job identity -----------------------------------------------------------------------------------


def test_plain_job_ids_are_unchanged() -> None:
    # Regression guard: these ids were computed with JobSpec.job_id (now in farm/job.py) BEFORE the ControlNet and
    # quantize fields existed. Datasets recorded then must keep their ids; never update these constants.
    assert JobSpec("a red fox in the snow", 1234, 128, 128, 4, 0.0, "tiny", 1).id_in("regress") == (
        "4261b0f0d288fb9eeb0c436636e99768"
    )
    assert JobSpec("héllo\nworld", 2**63 - 1, 1024, 512, 2, 4.5, "pixart-lcm-1024", 7).id_in("ds.1") == (
        "87161b49b3b128069f0b1b0281d3a78c"
    )


def test_every_control_field_but_the_uri_changes_the_id() -> None:
    plain = JobSpec("a", 1, 128, 128, 4, 0.0, "tiny", 1)
    controlled = JobSpec(
        "a", 1, 128, 128, 4, 0.0, "tiny", 1, controlnet=CONTROLNET, conditioning_scale=1.0, control_sha256="0" * 64
    )
    ids = {
        plain.id_in("d"),
        controlled.id_in("d"),
        JobSpec("a", 1, 128, 128, 4, 0.0, "tiny", 1, quantize="int8").id_in("d"),
        JobSpec("a", 1, 128, 128, 4, 0.0, "tiny", 1, controlnet="other/net", conditioning_scale=1.0).id_in("d"),
        JobSpec("a", 1, 128, 128, 4, 0.0, "tiny", 1, controlnet=CONTROLNET, conditioning_scale=0.5).id_in("d"),
        JobSpec("a", 1, 128, 128, 4, 0.0, "tiny", 1, control_sha256="1" * 64).id_in("d"),
    }
    assert len(ids) == 6
    # control_uri follows from the sha (and the storage), so it is not part of what the image is.
    stored = JobSpec(**{**controlled.__dict__, "control_uri": "s3://b/_conditions/x.png"})
    assert stored.id_in("d") == controlled.id_in("d")


def test_different_control_images_give_different_job_ids(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (255, 0, 0))
    _png(tmp_path / "b.png", (0, 255, 0))
    path = _jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "x", "seed": 1, "control_image": "a.png"}, {"prompt": "x", "seed": 1, "control_image": "b.png"}],
    )
    plan = plan_submission(path, _options())
    assert len(set(plan.ids)) == 2
    assert plan.duplicates == 0
    plain = plan_submission(_jsonl(tmp_path / "plain.jsonl", [{"prompt": "x", "seed": 1}]), SubmitOptions(dataset="d"))
    assert plain.ids[0] not in plan.ids


# ---- planning -----------------------------------------------------------------------------------------


def test_control_image_option_applies_to_every_row(tmp_path: Path) -> None:
    image = _png(tmp_path / "edges.png")
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "conditioning_scale": 0.5}])
    plan = plan_submission(path, _options(control_image=image, images_per_prompt=2, conditioning_scale=1.5))
    assert len(plan.specs) == 4
    assert {s.control_sha256 for s in plan.specs} == {_sha(image)}
    assert {s.controlnet for s in plan.specs} == {CONTROLNET}
    assert [s.conditioning_scale for s in plan.specs] == [1.5, 1.5, 0.5, 0.5]
    assert all(s.control_uri is None for s in plan.specs)  # not stored yet: plan_submission does no I/O
    assert [c.sha256 for c in plan.conditions] == [_sha(image)]
    assert not (tmp_path / "objects").exists()


def test_per_row_paths_resolve_against_the_prompt_files_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "batch"
    red = _png(folder / "cond" / "red.png", (255, 0, 0))
    green = _png(folder / "cond" / "green.png", (0, 255, 0))
    default = _png(tmp_path / "default.png", (0, 0, 255))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative row paths must not depend on the working directory
    path = _jsonl(
        folder / "p.jsonl",
        [
            {"prompt": "a", "control_image": "cond/red.png"},
            {"prompt": "b", "control_image": "./cond/green.png"},
            {"prompt": "c", "control_image": str(red)},  # absolute works too
            {"prompt": "d"},
        ],
    )
    plan = plan_submission(path, _options(control_image=default))
    assert [s.control_sha256 for s in plan.specs] == [_sha(red), _sha(green), _sha(red), _sha(default)]
    assert [c.sha256 for c in plan.conditions] == [_sha(default), _sha(red), _sha(green)]


def test_csv_rows_carry_control_image_and_scale(tmp_path: Path) -> None:
    image = _png(tmp_path / "e.png")
    path = tmp_path / "p.csv"
    path.write_text("prompt,control_image,conditioning_scale\na,e.png,0.25\nb,e.png,\n", encoding="utf-8")
    plan = plan_submission(path, _options())
    assert [(s.control_sha256, s.conditioning_scale) for s in plan.specs] == [(_sha(image), 0.25), (_sha(image), 1.0)]


def test_quantize_is_on_every_job_and_none_means_none(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}])
    assert {s.quantize for s in plan_submission(path, SubmitOptions(dataset="d", quantize="int8")).specs} == {"int8"}
    plain = plan_submission(path, SubmitOptions(dataset="d"))
    assert plan_submission(path, SubmitOptions(dataset="d", quantize="none")).ids == plain.ids
    with pytest.raises(InvalidSubmission) as info:
        plan_submission(path, SubmitOptions(dataset="d", quantize="int4"))
    assert (info.value.field, info.value.value) == ("quantize", "int4")


# ---- validation ---------------------------------------------------------------------------------------


def _broken(kind: str, path: Path) -> str:
    """Make a bad control image of one kind; return the value a row gives for it."""
    if kind == "missing":
        return "nowhere.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "not an image":
        path.write_text("this is not a PNG", encoding="utf-8")
    elif kind == "truncated":
        data = _png(path, size=(256, 256)).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "folder":
        path.mkdir()
    return path.name


@pytest.mark.parametrize("kind", ["missing", "empty", "not an image", "truncated", "folder"])
def test_bad_control_image_names_file_line_field_and_value(tmp_path: Path, kind: str) -> None:
    _png(tmp_path / "good.png")
    value = _broken(kind, tmp_path / "bad.png")
    path = _jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "fine", "control_image": "good.png"}, {"prompt": "broken", "control_image": value}],
    )
    with pytest.raises(InvalidSubmission) as info:
        plan_submission(path, _options())
    err = info.value
    assert (err.path, err.line, err.field, err.value) == (str(path), 2, "control_image", value)
    assert f"{path}:2" in str(err)
    assert "control_image" in str(err)
    assert repr(value) in str(err)


def test_bad_default_control_image_names_the_option(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    missing = tmp_path / "missing.png"
    with pytest.raises(InvalidSubmission, match="not found") as info:
        plan_submission(path, _options(control_image=missing))
    assert (info.value.field, info.value.value) == ("control_image", str(missing))


def test_control_image_without_controlnet_is_an_error(tmp_path: Path) -> None:
    image = _png(tmp_path / "e.png")
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b", "control_image": "e.png"}])
    with pytest.raises(InvalidSubmission, match="--controlnet is required with control images") as option:
        plan_submission(path, SubmitOptions(dataset="d", control_image=image))
    assert option.value.field == "control_image"
    with pytest.raises(InvalidSubmission, match="--controlnet is required with control images") as row:
        plan_submission(path, SubmitOptions(dataset="d"))
    assert (row.value.line, row.value.field, row.value.value) == (2, "control_image", "e.png")


def test_controlnet_without_control_image_is_an_error(tmp_path: Path) -> None:
    _png(tmp_path / "e.png")
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "control_image": "e.png"}, {"prompt": "b"}])
    with pytest.raises(InvalidSubmission, match="needs a control image") as info:
        plan_submission(path, _options())
    assert (info.value.path, info.value.line, info.value.field) == (str(path), 2, "control_image")


@pytest.mark.parametrize("value", [-0.1, 2.5, "strong", True])
def test_bad_conditioning_scale(tmp_path: Path, value: Any) -> None:
    image = _png(tmp_path / "e.png")
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "conditioning_scale": value}])
    with pytest.raises(InvalidSubmission) as info:
        plan_submission(path, _options(control_image=image))
    assert (info.value.line, info.value.field, info.value.value) == (1, "conditioning_scale", value)
    with pytest.raises(InvalidSubmission) as option:
        plan_submission(
            _jsonl(tmp_path / "q.jsonl", [{"prompt": "a"}]), _options(control_image=image, conditioning_scale=3)
        )
    assert option.value.field == "conditioning_scale"


def test_conditioning_scale_without_controlnet_is_an_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "conditioning_scale": 0.5}])
    with pytest.raises(InvalidSubmission, match="needs --controlnet") as info:
        plan_submission(path, SubmitOptions(dataset="d"))
    assert info.value.field == "conditioning_scale"


def test_unknown_controlnet_is_an_error(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    with pytest.raises(InvalidSubmission, match="unknown controlnet") as info:
        plan_submission(path, _options(controlnet="not a controlnet!"))
    assert info.value.field == "controlnet"


# ---- storing and recording ----------------------------------------------------------------------------


def test_one_image_for_many_rows_is_stored_once(engine: Engine, storage: CountingStorage, tmp_path: Path) -> None:
    image = _png(tmp_path / "cond" / "e.png")
    copy = tmp_path / "cond" / "same-bytes.png"
    copy.write_bytes(image.read_bytes())
    rows = [{"prompt": f"p{i}", "control_image": "cond/e.png" if i % 2 else "cond/same-bytes.png"} for i in range(20)]
    plan = store_conditions(plan_submission(_jsonl(tmp_path / "p.jsonl", rows), _options()), storage)
    assert storage.puts == 1
    (stored,) = _files(storage.root)
    assert stored.read_bytes() == image.read_bytes()  # the original bytes, not a re-encoding
    assert stored.relative_to(storage.root).as_posix() == f"_conditions/{_sha(image)}.png"

    assert record(engine, plan).new_jobs == 20
    jobs = _jobs(engine)
    assert {(j.control_sha256, j.control_uri, j.controlnet, j.conditioning_scale) for j in jobs} == {
        (_sha(image), stored.as_uri(), CONTROLNET, 1.0)
    }

    # Resubmitting finds the object already there: no second upload, the same jobs.
    again = store_conditions(plan_submission(_jsonl(tmp_path / "p.jsonl", rows), _options()), storage)
    assert storage.puts == 1
    assert record(engine, again).new_jobs == 0


def test_a_stored_object_with_other_bytes_is_replaced(storage: CountingStorage, tmp_path: Path) -> None:
    image = _png(tmp_path / "e.png")
    key = condition_key("", _sha(image), "PNG")
    storage.put(key, b"not the image")
    plan = store_conditions(
        plan_submission(_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}]), _options(control_image=image)), storage
    )
    assert storage.get(key) == image.read_bytes()
    assert plan.specs[0].control_uri == storage.uri_for(key)


def test_record_refuses_a_plan_whose_conditions_are_not_stored(engine: Engine, tmp_path: Path) -> None:
    image = _png(tmp_path / "e.png")
    plan = plan_submission(_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}]), _options(control_image=image))
    with pytest.raises(ValueError, match="store_conditions"):
        record(engine, plan)
    assert _count(engine, Job) == 0


def test_quantize_and_plain_columns_are_recorded(engine: Engine, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}])
    record(engine, plan_submission(path, SubmitOptions(dataset="q", quantize="int8")))
    record(engine, plan_submission(path, SubmitOptions(dataset="plain")))
    jobs = {j.quantize: j for j in _jobs(engine)}
    assert set(jobs) == {"int8", None}
    plain = jobs[None]
    assert (plain.controlnet, plain.conditioning_scale, plain.control_sha256, plain.control_uri) == (None,) * 4


def test_conditions_go_to_s3_under_the_prefix(
    s3_server: S3Server, s3_bucket: str, engine: Engine, tmp_path: Path
) -> None:
    image = _png(tmp_path / "e.png")
    s3 = open_storage(f"s3://{s3_bucket}/renders", s3_endpoint_url=s3_server.endpoint_url, s3_region="us-east-1")
    plan = plan_submission(
        _jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}, {"prompt": "b"}]), _options(control_image=image)
    )
    record(engine, store_conditions(plan, s3))
    key = f"renders/_conditions/{_sha(image)}.png"
    assert {j.control_uri for j in _jobs(engine)} == {f"s3://{s3_bucket}/{key}"}
    assert s3_server.client().get_object(Bucket=s3_bucket, Key=key)["Body"].read() == image.read_bytes()


def test_a_storage_failure_records_nothing(s3_server: S3Server, s3_bucket: str, engine: Engine, tmp_path: Path) -> None:
    image = _png(tmp_path / "e.png")
    s3 = open_storage("s3://no-such-bucket", s3_endpoint_url=s3_server.endpoint_url, s3_region="us-east-1")
    plan = plan_submission(_jsonl(tmp_path / "p.jsonl", [{"prompt": "a"}]), _options(control_image=image))
    with pytest.raises(StorageError, match="no-such-bucket"):
        record(engine, store_conditions(plan, s3))
    assert _count(engine, Job) == 0


@pytest.mark.integration
def test_control_columns_are_recorded_on_postgres(pg_url: str, storage: CountingStorage, tmp_path: Path) -> None:
    # PostgreSQL stages rows with COPY: NULLs and floats of the new columns must survive it.
    import uuid

    image = _png(tmp_path / "e.png")
    dataset = f"pg-control-{uuid.uuid4().hex[:8]}"
    rows = [{"prompt": "a", "conditioning_scale": 0.3}, {"prompt": "b"}]
    controlled = plan_submission(
        _jsonl(tmp_path / "p.jsonl", rows), _options(dataset=dataset, control_image=image, quantize="int8")
    )
    plain = plan_submission(_jsonl(tmp_path / "q.jsonl", [{"prompt": "c"}]), SubmitOptions(dataset=dataset))
    engine = make_engine(pg_url)
    try:
        assert record(engine, store_conditions(controlled, storage)).new_jobs == 2
        assert record(engine, plain).new_jobs == 1
        with engine.connect() as conn:
            found = conn.execute(
                select(Job.prompt, Job.controlnet, Job.conditioning_scale, Job.control_sha256, Job.quantize)
                .join(Dataset)
                .where(Dataset.name == dataset)
                .order_by(Job.prompt)
            ).all()
    finally:
        engine.dispose()
    assert [tuple(r) for r in found] == [
        ("a", CONTROLNET, 0.3, _sha(image), "int8"),
        ("b", CONTROLNET, 1.0, _sha(image), "int8"),
        ("c", None, None, None, None),
    ]


# ---- CLI ----------------------------------------------------------------------------------------------


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("FARM_"):
            monkeypatch.delenv(key)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path / "home"


def _farm(home: Path, *args: str, env: Mapping[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["--home", str(home), *args], env=env, catch_exceptions=False)


def _store(home: Path) -> Engine:
    engine = make_engine(f"sqlite:///{home / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    return engine


def test_cli_submit_with_a_control_image(home: Path, tmp_path: Path) -> None:
    image = _png(tmp_path / "edges.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\na lighthouse\n", encoding="utf-8")
    result = _farm(
        home, "submit", str(prompts), "--dataset", "d", "--control-image", str(image), "--controlnet", CONTROLNET,
        "--conditioning-scale", "0.75", "--quantize", "int8", "--no-dispatch",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 condition images stored" in result.output
    engine = _store(home)
    try:
        jobs = _jobs(engine)
    finally:
        engine.dispose()
    assert len(jobs) == 2
    stored = home / "images" / "_conditions" / f"{_sha(image)}.png"
    assert stored.read_bytes() == image.read_bytes()
    assert {(j.control_uri, j.controlnet, j.conditioning_scale, j.quantize) for j in jobs} == {
        (stored.as_uri(), CONTROLNET, 0.75, "int8")
    }


@pytest.mark.parametrize("kind", ["missing", "empty", "not an image", "truncated"])
def test_cli_bad_control_image_exits_2_and_writes_nothing(home: Path, tmp_path: Path, kind: str) -> None:
    _png(tmp_path / "good.png")
    value = _broken(kind, tmp_path / "bad.png")
    rows = [{"prompt": "fine", "control_image": "good.png"}, {"prompt": "broken", "control_image": value}]
    path = _jsonl(tmp_path / "p.jsonl", rows)
    result = _farm(home, "submit", str(path), "--dataset", "d", "--controlnet", CONTROLNET, "--no-dispatch")
    assert result.exit_code == 2
    assert f"{path}:2" in result.output
    assert "control_image" in result.output
    assert repr(value) in result.output
    assert "Traceback" not in result.output
    assert _files(home / "images") == []
    engine = _store(home)
    try:
        assert (_count(engine, Dataset), _count(engine, Job)) == (0, 0)
    finally:
        engine.dispose()


def test_cli_control_image_without_controlnet_exits_2(home: Path, tmp_path: Path) -> None:
    image = _png(tmp_path / "e.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n", encoding="utf-8")
    result = _farm(home, "submit", str(prompts), "--dataset", "d", "--control-image", str(image), "--no-dispatch")
    assert result.exit_code == 2
    assert "--controlnet is required with control images" in result.output


def test_cli_storage_failure_exits_1_and_records_nothing(
    home: Path, tmp_path: Path, s3_server: S3Server, s3_bucket: str
) -> None:
    image = _png(tmp_path / "e.png")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a\n", encoding="utf-8")
    env = {"FARM_STORAGE_URL": "s3://no-such-bucket", "FARM_S3_ENDPOINT_URL": s3_server.endpoint_url}
    result = _farm(
        home, "submit", str(prompts), "--dataset", "d", "--control-image", str(image), "--controlnet", CONTROLNET,
        "--no-dispatch", env=env,
    )  # fmt: skip
    assert result.exit_code == 1
    assert "no-such-bucket" in result.output
    assert "Traceback" not in result.output
    engine = _store(home)
    try:
        assert (_count(engine, Dataset), _count(engine, Job)) == (0, 0)
    finally:
        engine.dispose()


def test_condition_canny_writes_a_three_channel_png_of_the_same_size(home: Path, tmp_path: Path) -> None:
    source = _png(tmp_path / "photo.png", (200, 200, 200), size=(96, 64))
    out = tmp_path / "out" / "edges.png"
    result = _farm(home, "condition", "canny", str(source), str(out), "--low", "50", "--high", "150")
    assert result.exit_code == 0, result.output
    with Image.open(out) as edges:
        assert (edges.format, edges.mode, edges.size) == ("PNG", "RGB", (96, 64))
        assert edges.getextrema() == ((0, 255),) * 3  # the square's outline is found, the rest is black


def test_condition_canny_rejects_a_bad_input(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_text("nope", encoding="utf-8")
    result = _farm(home, "condition", "canny", str(bad), str(tmp_path / "out.png"))
    assert result.exit_code == 2
    assert "bad.png" in result.output


def test_models_make_tiny_controlnet_writes_a_loadable_adapter(home: Path) -> None:
    from models.controlnet import PixArtControlNetAdapter

    result = _farm(home, "models", "make-tiny-controlnet", "--seed", "3")
    assert result.exit_code == 0, result.output
    assert (home / "models" / "tiny" / "model_index.json").is_file()  # made first, as it was missing
    adapter = PixArtControlNetAdapter.from_pretrained(str(home / "models" / "tiny-controlnet"))
    assert adapter.config.num_layers == 1
    assert any(float(p.detach().abs().sum()) > 0 for n, p in adapter.named_parameters() if "after_proj" in n)

    missing = _farm(home, "models", "make-tiny-controlnet", str(home / "x"), "--model-dir", str(home / "none"))
    assert missing.exit_code == 2
    assert "--model-dir" in missing.output

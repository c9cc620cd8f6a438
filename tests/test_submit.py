"""farm.submit: validate every row before writing, expand into deterministic jobs, record them idempotently."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from farm.errors import InvalidSubmission
from farm.job import JobSpec
from farm.settings import Settings, load_settings
from farm.store.engine import ensure_schema, make_engine
from farm.store.schema import Dataset, Job, JobStatus
from farm.submit.fields import MAX_SEED
from farm.submit.inputs import rows_from_records
from farm.submit.plan import SubmitOptions, derive_seed, plan_rows, plan_submission, validate_dataset_name
from farm.submit.record import record
from farm.submit.run import submit_file, summary_lines


@pytest.fixture()
def engine(tmp_path: Path) -> Iterator[Engine]:
    """A real SQLite job store, upgraded to the current schema by alembic."""
    eng = make_engine(f"sqlite:///{tmp_path / 'store' / 'farm.db'}")
    ensure_schema(eng, auto_upgrade=True)
    yield eng
    eng.dispose()


def _jsonl(tmp_path: Path, rows: list[dict[str, Any]], name: str = "p.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _txt(tmp_path: Path, prompts: list[str], name: str = "p.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return path


def _count(engine: Engine, table: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


# ---- validation -------------------------------------------------------------------------------------


def _invalid(path: Path, **options: Any) -> InvalidSubmission:
    with pytest.raises(InvalidSubmission) as info:
        plan_submission(path, SubmitOptions(dataset=options.pop("dataset", "d"), **options))
    return info.value


def _assert_names(err: InvalidSubmission, path: Path, line: int, field: str, value: Any) -> None:
    message = str(err)
    assert f"{path}:{line}" in message
    assert field in message
    assert repr(value) in message
    assert (err.path, err.line, err.field, err.value) == (str(path), line, field, value)


def test_empty_file_is_rejected(tmp_path: Path) -> None:
    path = _txt(tmp_path, [])
    err = _invalid(path)
    assert str(path) in str(err)
    assert "no prompts" in str(err)


def test_malformed_jsonl_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": \n', encoding="utf-8")
    err = _invalid(path)
    assert err.line == 2
    assert f"{path}:2" in str(err)


@pytest.mark.parametrize("row", [{"seed": 1}, {"prompt": ""}, {"prompt": "   "}, {"prompt": 7}])
def test_missing_prompt_is_rejected(tmp_path: Path, row: dict[str, Any]) -> None:
    path = _jsonl(tmp_path, [{"prompt": "fine"}, row])
    err = _invalid(path)
    assert err.line == 2
    assert err.field == "prompt"
    assert f"{path}:2" in str(err)
    assert "prompt" in str(err)


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("width", 1001, "multiple of 16"),
        ("height", 520, "multiple of 16"),
        ("width", 48, "between 64 and 4096"),
        ("height", 4112, "between 64 and 4096"),
        ("width", "wide", "must be an integer"),
        ("width", 256.5, "must be an integer"),
        ("num_inference_steps", 0, "between 1 and 200"),
        ("num_inference_steps", 51, "LCM takes 1 to 50 steps"),
        ("steps", 51, "LCM takes 1 to 50 steps"),
        ("num_inference_steps", 201, "between 1 and 200"),
        ("guidance_scale", -0.5, "between 0.0 and 30.0"),
        ("guidance_scale", 30.5, "between 0.0 and 30.0"),
        ("guidance_scale", "strong", "must be a number"),
        ("images_per_prompt", 0, "between 1 and"),
        ("seed", -1, "seed must be between 0"),
        ("seed", MAX_SEED + 1, "seed must be between 0"),
        ("seed", True, "must be a number"),
    ],
)
def test_bad_row_value_names_path_line_field_and_value(tmp_path: Path, field: str, value: Any, reason: str) -> None:
    path = _jsonl(tmp_path, [{"prompt": "fine"}, {"prompt": "fine too"}, {"prompt": "bad", field: value}])
    err = _invalid(path)
    canonical = "num_inference_steps" if field == "steps" else field
    _assert_names(err, path, 3, canonical, value)
    assert reason in str(err)


def test_bad_value_in_csv_row(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text('prompt,width\n"a, b",256\nc,1001\n', encoding="utf-8")
    err = _invalid(path)
    _assert_names(err, path, 3, "width", "1001")


def test_nan_guidance_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "guidance_scale": NaN}\n', encoding="utf-8")
    err = _invalid(path)
    assert err.field == "guidance_scale"
    assert err.line == 1


def test_explicit_seed_overflowing_with_images_per_prompt(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "seed": MAX_SEED, "images_per_prompt": 2}])
    err = _invalid(path)
    assert err.field == "seed"
    assert err.line == 1


def test_unknown_model_is_rejected(tmp_path: Path) -> None:
    err = _invalid(_txt(tmp_path, ["a"]), model="not a model!")
    assert err.field == "model"
    assert "not a model!" in str(err)


@pytest.mark.parametrize("name", ["../x", "a/b", "x/../y", "", ".hidden", "a..b", "-dash", "x\n", "é", "a" * 129])
def test_bad_dataset_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(InvalidSubmission) as info:
        validate_dataset_name(name)
    assert info.value.field == "dataset"
    assert repr(name) in str(info.value)
    # plan_submission checks the name before reading anything
    _invalid(tmp_path / "does-not-matter.txt", dataset=name)


@pytest.mark.parametrize("name", ["d", "my-set_v1.2", "A" * 128, "2024.01"])
def test_good_dataset_names(name: str) -> None:
    assert validate_dataset_name(name) == name


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("width", 1001),
        ("height", 32),
        ("width", 0),
        ("num_inference_steps", 0),
        ("num_inference_steps", 51),
        ("guidance_scale", 31.0),
        ("images_per_prompt", 0),
        ("seed", -5),
    ],
)
def test_bad_options_are_rejected_before_rows(tmp_path: Path, option: str, value: Any) -> None:
    err = _invalid(_txt(tmp_path, ["a"]), **{option: value})
    assert err.field == option
    assert err.value == value
    assert option in str(err)
    assert repr(value) in str(err)
    assert err.line is None  # an option, not a line of the file


# ---- expansion and seeds ----------------------------------------------------------------------------


def test_defaults_come_from_the_model_and_options(tmp_path: Path) -> None:
    plan = plan_submission(_txt(tmp_path, ["a"]), SubmitOptions(dataset="d", model="tiny"))
    (spec,) = plan.specs
    assert (spec.width, spec.height) == (128, 128)  # the tiny profile's native size
    assert (spec.num_inference_steps, spec.guidance_scale, spec.model) == (4, 0.0, "tiny")
    assert spec.source_line == 1

    # No model named: the PixArt-δ release, with its sampler's defaults (LCM: 4 steps, guidance 0).
    (spec,) = plan_submission(_txt(tmp_path, ["a"]), SubmitOptions(dataset="d")).specs
    assert (spec.model, spec.width, spec.num_inference_steps, spec.guidance_scale) == ("pixart-lcm-1024", 1024, 4, 0.0)

    plan = plan_submission(
        _txt(tmp_path, ["a"]),
        SubmitOptions(dataset="d", model="pixart-lcm-1024", height=512, num_inference_steps=2, guidance_scale=1.0),
    )
    (spec,) = plan.specs
    assert (spec.width, spec.height, spec.num_inference_steps, spec.guidance_scale) == (1024, 512, 2, 1.0)
    assert spec.model == "pixart-lcm-1024"


def test_row_fields_override_options(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "width": 256, "steps": "3", "guidance_scale": "1.5"}])
    (spec,) = plan_submission(path, SubmitOptions(dataset="d", width=512, height=512)).specs
    assert (spec.width, spec.height, spec.num_inference_steps, spec.guidance_scale) == (256, 512, 3, 1.5)


def test_images_per_prompt_expands(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a"}, {"prompt": "b", "images_per_prompt": 5}])
    plan = plan_submission(path, SubmitOptions(dataset="d", images_per_prompt=3))
    assert [s.prompt for s in plan.specs] == ["a"] * 3 + ["b"] * 5
    assert [s.source_line for s in plan.specs] == [1] * 3 + [2] * 5
    assert len({s.seed for s in plan.specs}) == 8
    assert plan.duplicates == 0


def test_same_file_twice_gives_identical_specs(tmp_path: Path) -> None:
    path = _txt(tmp_path, ["a", "b", "a"])
    options = SubmitOptions(dataset="d", images_per_prompt=2, seed=11)
    first, second = plan_submission(path, options), plan_submission(path, options)
    assert first.specs == second.specs
    assert [s.id_in("d") for s in first.specs] == [s.id_in("d") for s in second.specs]


def test_base_seed_changes_derived_seeds(tmp_path: Path) -> None:
    path = _txt(tmp_path, ["a"])
    one = plan_submission(path, SubmitOptions(dataset="d", seed=1)).specs[0].seed
    two = plan_submission(path, SubmitOptions(dataset="d", seed=2)).specs[0].seed
    assert one != two


def test_explicit_row_seed_plus_index(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "seed": 100, "images_per_prompt": 3}])
    plan = plan_submission(path, SubmitOptions(dataset="d", seed=999))
    assert [s.seed for s in plan.specs] == [100, 101, 102]


def test_derived_seeds_differ_across_images_and_repeats(tmp_path: Path) -> None:
    path = _txt(tmp_path, ["same prompt", "same prompt"])
    plan = plan_submission(path, SubmitOptions(dataset="d", images_per_prompt=2, seed=3))
    seeds = [s.seed for s in plan.specs]
    assert len(seeds) == 4
    assert len(set(seeds)) == 4  # both repeats are kept, each with their own seeds
    assert plan.duplicates == 0
    assert seeds == [
        derive_seed(3, "same prompt", 0, 0),
        derive_seed(3, "same prompt", 0, 1),
        derive_seed(3, "same prompt", 1, 0),
        derive_seed(3, "same prompt", 1, 1),
    ]
    assert all(0 <= s <= MAX_SEED for s in seeds)


def test_derive_seed_is_pure() -> None:
    assert derive_seed(0, "p", 0, 0) == derive_seed(0, "p", 0, 0)
    assert derive_seed(0, "p", 0, 0) != derive_seed(0, "q", 0, 0)


def test_identical_rows_fold_into_one_job(tmp_path: Path) -> None:
    row = {"prompt": "a", "seed": 7}
    path = _jsonl(tmp_path, [row, {"prompt": "b", "seed": 7}, row, row])
    plan = plan_submission(path, SubmitOptions(dataset="d"))
    assert [(s.prompt, s.seed) for s in plan.specs] == [("a", 7), ("b", 7)]
    assert plan.duplicates == 2
    assert plan.specs[0].source_line == 1  # the first occurrence is the one kept


def test_job_id_depends_on_dataset_and_every_input() -> None:
    spec = JobSpec("a", 1, 128, 128, 4, 0.0, "tiny", source_line=1)
    base = spec.id_in("d")
    assert len(base) == 32
    assert spec.id_in("other") != base
    assert JobSpec("a", 1, 128, 128, 4, 0.0, "tiny", source_line=99).id_in("d") == base  # line is not an input
    for changed in (
        JobSpec("b", 1, 128, 128, 4, 0.0, "tiny", 1),
        JobSpec("a", 2, 128, 128, 4, 0.0, "tiny", 1),
        JobSpec("a", 1, 256, 128, 4, 0.0, "tiny", 1),
        JobSpec("a", 1, 128, 256, 4, 0.0, "tiny", 1),
        JobSpec("a", 1, 128, 128, 2, 0.0, "tiny", 1),
        JobSpec("a", 1, 128, 128, 4, 1.0, "tiny", 1),
        JobSpec("a", 1, 128, 128, 4, 0.0, "pixart-lcm-1024", 1),
    ):
        assert changed.id_in("d") != base
    # 0 and 0.0 guidance are the same image
    assert JobSpec("a", 1, 128, 128, 4, 0, "tiny", 1).id_in("d") == base  # type: ignore[arg-type]


# ---- recording --------------------------------------------------------------------------------------


def test_record_writes_pending_jobs(engine: Engine, tmp_path: Path) -> None:
    plan = plan_submission(_txt(tmp_path, ["a", "b"]), SubmitOptions(dataset="d", images_per_prompt=2))
    recorded = record(engine, plan)
    assert (recorded.dataset, recorded.new_jobs, recorded.already_present) == ("d", 4, 0)
    with engine.connect() as conn:
        rows = conn.execute(select(Job.id, Job.status, Job.attempts, Job.dataset_id, Job.prompt, Job.seed)).all()
        ds_id = conn.execute(select(Dataset.id).where(Dataset.name == "d")).scalar_one()
    assert recorded.dataset_id == ds_id
    assert {r.id for r in rows} == {s.id_in("d") for s in plan.specs}
    assert {(r.status, r.attempts, r.dataset_id) for r in rows} == {(JobStatus.PENDING.value, 0, ds_id)}
    assert sorted((r.prompt, r.seed) for r in rows) == sorted((s.prompt, s.seed) for s in plan.specs)


def test_recording_the_same_plan_twice_adds_nothing(engine: Engine, tmp_path: Path) -> None:
    path = _txt(tmp_path, ["a", "b", "c"])
    first = record(engine, plan_submission(path, SubmitOptions(dataset="d", images_per_prompt=2)))
    second = record(engine, plan_submission(path, SubmitOptions(dataset="d", images_per_prompt=2)))
    assert first.new_jobs == 6
    assert (second.new_jobs, second.already_present) == (0, 6)
    assert second.dataset_id == first.dataset_id
    assert _count(engine, Job) == 6
    assert _count(engine, Dataset) == 1


def test_appended_lines_add_only_the_new_jobs(engine: Engine, tmp_path: Path) -> None:
    path = _txt(tmp_path, ["a", "b", "a"])
    before = plan_submission(path, SubmitOptions(dataset="d"))
    record(engine, before)
    with path.open("a", encoding="utf-8") as f:
        f.write("c\na\n")  # a new prompt, and a third repeat of "a"
    after = plan_submission(path, SubmitOptions(dataset="d"))
    recorded = record(engine, after)
    assert (recorded.new_jobs, recorded.already_present) == (2, 3)
    assert after.specs[:3] == before.specs  # the old lines map onto the same jobs
    assert _count(engine, Job) == 5


def test_same_file_in_two_datasets_gives_separate_jobs(engine: Engine, tmp_path: Path) -> None:
    path = _txt(tmp_path, ["a", "b"])
    assert record(engine, plan_submission(path, SubmitOptions(dataset="one"))).new_jobs == 2
    assert record(engine, plan_submission(path, SubmitOptions(dataset="two"))).new_jobs == 2
    assert _count(engine, Job) == 4
    assert _count(engine, Dataset) == 2


def test_nothing_is_written_when_validation_fails(engine: Engine, tmp_path: Path) -> None:
    rows = [{"prompt": f"p{i}"} for i in range(100)] + [{"prompt": "bad", "width": 1001}]
    path = _jsonl(tmp_path, rows)
    with pytest.raises(InvalidSubmission):
        record(engine, plan_submission(path, SubmitOptions(dataset="d")))
    assert _count(engine, Dataset) == 0
    assert _count(engine, Job) == 0


def test_bulk_20k_prompts(engine: Engine, tmp_path: Path) -> None:
    # A sanity check that the batched insert handles a large file; speed is measured by benchmarks, not here.
    path = _txt(tmp_path, [f"prompt number {i}" for i in range(20_000)])
    plan = plan_submission(path, SubmitOptions(dataset="bulk"))
    assert len(plan.specs) == 20_000
    recorded = record(engine, plan)
    assert recorded.new_jobs == 20_000
    assert _count(engine, Job) == 20_000
    assert record(engine, plan).new_jobs == 0


# ---- submit_file: the count first, negative prompts, dry runs -------------------------------------------


def _settings(tmp_path: Path, **overrides: Any) -> Settings:
    return load_settings({}, home=str(tmp_path / "home"), **overrides)


def test_count_is_reported_before_anything_is_written(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    path = _txt(tmp_path, ["a", "b", "c"])
    seen: list[tuple[str, bool]] = []

    def echo(line: str) -> None:
        # What exists at the moment each line is reported: the database file is created by the write.
        seen.append((line, (settings.home / "farm.db").exists()))

    options = SubmitOptions(dataset="d", vary=("seed=0..3", "size=256x256,128x192"))
    result = submit_file(settings, path, options, dispatch=False, echo=echo)
    assert seen[0] == ("3 prompts × 8 variations = 24 jobs", False)
    assert seen[-1][1] is True
    assert (result.planned, result.jobs, result.new_jobs, result.dispatched) == (24, 24, 24, None)
    assert result.dataset_id is not None


def test_images_per_prompt_and_duplicates_in_the_count(tmp_path: Path) -> None:
    plan = plan_submission(_txt(tmp_path, ["a", "b", "a"]), SubmitOptions(dataset="d", images_per_prompt=2))
    assert summary_lines(plan) == ["3 prompts × 2 images = 6 jobs"]  # repeats of a prompt get new seeds
    path = _jsonl(tmp_path, [{"prompt": "a", "seed": 1}, {"prompt": "a", "seed": 1}, {"prompt": "b"}])
    assert summary_lines(plan_submission(path, SubmitOptions(dataset="d"))) == [
        "3 prompts = 3 jobs, 2 distinct (1 duplicates folded)"
    ]


def test_negative_prompt_is_ignored_and_counted_without_cfg(engine: Engine, tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "negative_prompt": "blurry"},
        {"prompt": "b", "negative_prompt": ""},
        {"prompt": "c"},
        {"prompt": "d", "negative_prompt": "low quality"},
    ]
    plain = plan_submission(_jsonl(tmp_path, [{"prompt": r["prompt"]} for r in rows], "plain.jsonl"), _opts())
    plan = plan_submission(_jsonl(tmp_path, rows), _opts())
    assert plan.negative_prompts == 2
    assert plan.ids == plain.ids  # not part of the job: the same image either way
    (count, note) = summary_lines(plan)
    assert count == "4 prompts = 4 jobs"
    assert "negative_prompt is ignored where guidance_scale is 1 or less" in note
    assert "(2 rows had one)" in note
    assert len(summary_lines(plain)) == 1


def _opts() -> SubmitOptions:
    return SubmitOptions(dataset="d")


def test_negative_prompt_must_be_text(tmp_path: Path) -> None:
    path = _jsonl(tmp_path, [{"prompt": "a", "negative_prompt": 3}])
    err = _invalid(path)
    assert (err.line, err.field, err.value) == (1, "negative_prompt", 3)


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    lines: list[str] = []
    path = _txt(tmp_path, [f"prompt {i}" for i in range(8)] + ["prompt 0"])
    result = submit_file(settings, path, _opts(), dry_run=True, echo=lines.append)
    assert result.dry_run
    assert (result.planned, result.jobs, result.duplicates, result.new_jobs) == (9, 9, 0, 0)
    assert result.plan is not None and len(result.plan.specs) == 9
    assert lines[0] == "9 prompts = 9 jobs"
    assert any(line.startswith("dry run: nothing written") for line in lines)
    assert "first 5 of 9 jobs:" in lines
    assert not settings.home.exists()  # no database, no broker file, no storage folder


def test_plan_rows_from_python_records(tmp_path: Path) -> None:
    plan = plan_rows(rows_from_records(["a", {"prompt": "b", "seed": 3}]), _opts(), base_dir=tmp_path)
    assert [(s.prompt, s.source_line) for s in plan.specs] == [("a", 1), ("b", 2)]
    assert plan.specs[1].seed == 3
    with pytest.raises(InvalidSubmission) as info:
        plan_rows(rows_from_records(["a", {"prompt": "b", "steps": 99}]), _opts(), base_dir=tmp_path)
    assert "<prompts>:row 2: field 'num_inference_steps'" in str(info.value)


def test_planning_pauses_the_garbage_collector_and_restores_it(tmp_path: Path) -> None:
    """The collector is left as it was after a plan is built, also when a row is refused."""
    import gc

    good, bad = tmp_path / "good.txt", tmp_path / "bad.jsonl"
    good.write_text("a\nb\n")
    bad.write_text('{"prompt": "a"}\n{"prompt": "b", "width": 7}\n')
    assert gc.isenabled()
    plan_submission(good, SubmitOptions(dataset="gc", model="tiny"))
    assert gc.isenabled()
    with pytest.raises(InvalidSubmission):
        plan_submission(bad, SubmitOptions(dataset="gc", model="tiny"))
    assert gc.isenabled()
    gc.disable()
    try:
        plan_submission(good, SubmitOptions(dataset="gc", model="tiny"))
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()

"""`farm submit`, `farm status` and `farm jobs` through click, on the embedded SQLite default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from sqlalchemy import func, select

from farm.cli import main
from farm.store.engine import ensure_schema, make_engine
from farm.store.schema import Dataset, Job

PROMPTS = ["a red fox in snow", "a lighthouse at dusk", "", "a bowl of ramen", "a city from above"]
N = 4  # non-blank lines


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for key in list(os.environ):
        if key.startswith("FARM_"):
            monkeypatch.delenv(key)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)  # no ./farm.toml, no ./.farm from elsewhere
    return tmp_path / "home"


def _farm(home: Path, *args: str) -> Result:
    return CliRunner().invoke(main, ["--home", str(home), *args], catch_exceptions=False)


def _counts(home: Path) -> tuple[int, int]:
    """(datasets, jobs) in the embedded store under home."""
    engine = make_engine(f"sqlite:///{home / 'farm.db'}")
    try:
        ensure_schema(engine, auto_upgrade=True)
        with engine.connect() as conn:
            datasets = conn.execute(select(func.count()).select_from(Dataset)).scalar_one()
            jobs = conn.execute(select(func.count()).select_from(Job)).scalar_one()
        return int(datasets), int(jobs)
    finally:
        engine.dispose()


@pytest.fixture()
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return path


def test_bad_jsonl_exits_2_naming_file_and_line_and_writes_nothing(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "too wide", "width": 1001}\n', encoding="utf-8")
    result = _farm(home, "submit", str(bad), "--dataset", "d", "--no-dispatch")
    assert result.exit_code == 2
    assert f"{bad}:2" in result.output
    assert "width" in result.output
    assert "1001" in result.output
    assert "Traceback" not in result.output
    assert _counts(home) == (0, 0)


def test_malformed_jsonl_exits_2(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n\n{"prompt": oops}\n', encoding="utf-8")
    result = _farm(home, "submit", str(bad), "--dataset", "d", "--no-dispatch")
    assert result.exit_code == 2
    assert f"{bad}:3" in result.output
    assert _counts(home) == (0, 0)


def test_submit_records_then_resubmit_adds_nothing(home: Path, prompts: Path) -> None:
    first = _farm(home, "submit", str(prompts), "--dataset", "d", "--no-dispatch")
    assert first.exit_code == 0, first.output
    assert f"dataset d: {N} new jobs, 0 already present" in first.output
    assert "no worker is running: the jobs wait as pending" in first.output
    assert (home / "farm.db").is_file()
    assert _counts(home) == (1, N)

    again = _farm(home, "submit", str(prompts), "--dataset", "d", "--no-dispatch")
    assert again.exit_code == 0, again.output
    assert f"dataset d: 0 new jobs, {N} already present" in again.output
    assert _counts(home) == (1, N)


def test_images_per_prompt_option(home: Path, prompts: Path) -> None:
    result = _farm(home, "submit", str(prompts), "--dataset", "d", "--images-per-prompt", "3", "--no-dispatch")
    assert result.exit_code == 0, result.output
    assert f"{3 * N} new jobs" in result.output
    assert _counts(home) == (1, 3 * N)


def test_status_json_and_jobs_listing(home: Path, prompts: Path) -> None:
    assert _farm(home, "submit", str(prompts), "--dataset", "d", "--no-dispatch").exit_code == 0

    status = _farm(home, "status", "d", "--json")
    assert status.exit_code == 0, status.output
    [payload] = json.loads(status.output)
    assert payload["dataset"] == "d"
    assert payload["counts"]["pending"] == N
    assert set(payload["counts"]) == {"pending", "queued", "running", "succeeded", "failed", "canceled"}
    assert sum(payload["counts"].values()) == N
    assert payload["total"] == N
    assert payload["done"] is False

    jobs = _farm(home, "jobs", "d", "--state", "pending")
    assert jobs.exit_code == 0, jobs.output
    lines = jobs.output.strip().splitlines()
    assert len(lines) == N
    assert all("pending" in line for line in lines)
    assert [line.split(f"{prompts}:")[1].split()[0] for line in lines] == ["1", "2", "4", "5"]  # blank 3 skipped

    assert _farm(home, "jobs", "d", "--state", "succeeded").output.strip() == ""

    as_json = _farm(home, "jobs", "d", "--json")
    rows = [json.loads(line) for line in as_json.output.strip().splitlines()]
    assert {r["prompt"] for r in rows} == {p for p in PROMPTS if p}


def test_status_of_unknown_dataset_exits_2(home: Path, prompts: Path) -> None:
    assert _farm(home, "submit", str(prompts), "--dataset", "d", "--no-dispatch").exit_code == 0
    result = _farm(home, "status", "nope", "--json")
    assert result.exit_code == 2
    assert "nope" in result.output


@pytest.mark.parametrize("name", ["../x", "a/b", ".hidden"])
def test_bad_dataset_name_exits_2(home: Path, prompts: Path, name: str) -> None:
    result = _farm(home, "submit", str(prompts), "--dataset", name, "--no-dispatch")
    assert result.exit_code == 2
    assert "dataset name" in result.output
    assert _counts(home) == (0, 0)


@pytest.mark.parametrize(
    ("option", "value", "field"),
    [("--width", "1001", "width"), ("--steps", "51", "num_inference_steps"), ("--guidance-scale", "99", "guidance")],
)
def test_bad_option_values_exit_2(home: Path, prompts: Path, option: str, value: str, field: str) -> None:
    result = _farm(home, "submit", str(prompts), "--dataset", "d", option, value, "--no-dispatch")
    assert result.exit_code == 2
    assert field in result.output
    assert value in result.output
    assert _counts(home) == (0, 0)


def test_missing_file_and_unknown_model_exit_2(home: Path, tmp_path: Path, prompts: Path) -> None:
    missing = _farm(home, "submit", str(tmp_path / "nope.txt"), "--dataset", "d", "--no-dispatch")
    assert missing.exit_code == 2
    assert "not found" in missing.output
    model = _farm(home, "submit", str(prompts), "--dataset", "d", "--model", "not a model!", "--no-dispatch")
    assert model.exit_code == 2
    assert "unknown model" in model.output
    assert _counts(home) == (0, 0)


def test_submit_prints_the_job_count_first(home: Path, prompts: Path) -> None:
    result = _farm(home, "submit", str(prompts), "--dataset", "d", "--no-dispatch", "--vary", "steps=2..4")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == f"{N} prompts × 3 variations = {3 * N} jobs"
    assert _counts(home) == (1, 3 * N)


def test_dry_run_validates_shows_the_plan_and_writes_nothing(home: Path, prompts: Path) -> None:
    result = _farm(home, "submit", str(prompts), "--dataset", "d", "--dry-run", "--vary", "seed=0..1")
    assert result.exit_code == 0, result.output
    assert f"{N} prompts × 2 variations = {2 * N} jobs" in result.output
    assert "dry run: nothing written" in result.output
    assert "first 5 of 8 jobs:" in result.output
    assert "a red fox in snow" in result.output
    assert "dispatched" not in result.output
    assert not home.exists()  # no job database, no broker database, no storage folder
    assert _counts(home) == (0, 0)


def test_dry_run_still_rejects_bad_input(home: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "x", "steps": 0}\n', encoding="utf-8")
    result = _farm(home, "submit", str(bad), "--dataset", "d", "--dry-run")
    assert result.exit_code == 2
    assert f"{bad}:2" in result.output
    assert not home.exists()


def test_negative_prompt_gets_one_note(home: Path, tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text("prompt,negative_prompt\na fox,blurry\na cat,\na whale,low quality\n", encoding="utf-8")
    result = _farm(home, "submit", str(path), "--dataset", "d", "--no-dispatch")
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if "negative_prompt is ignored" in line]
    assert len(notes) == 1
    assert "the LCM model has guidance distilled in" in notes[0]
    assert "(2 rows had one)" in notes[0]
    assert _counts(home) == (1, 3)


def test_parquet_file(home: Path, tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a fox", "a cat"], "seed": [1, None], "width": [256, None]}), path)
    result = _farm(home, "submit", str(path), "--dataset", "d", "--no-dispatch")
    assert result.exit_code == 0, result.output
    assert "dataset d: 2 new jobs" in result.output
    pq.write_table(pa.table({"prompt": ["a fox", "a cat"], "width": [256, 1001]}), path)
    bad = _farm(home, "submit", str(path), "--dataset", "e", "--no-dispatch")
    assert bad.exit_code == 2
    assert f"{path}:row 2" in bad.output
    assert _counts(home) == (1, 2)


def test_the_release_is_the_default_and_a_dataset_keeps_its_model(home: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a fox\na cat\n")
    first = _farm(home, "submit", str(prompts), "--dataset", "rel", "--no-dispatch")
    assert first.exit_code == 0, first.output
    # No weights here: said, without blocking (workers fetch them), with the download's size.
    assert "pixart-lcm-1024's weights are not on this machine" in first.output
    assert "≈ 21.8 GB" in first.output
    tiny = _farm(home, "submit", str(prompts), "--dataset", "small", "--model", "tiny", "--no-dispatch")
    assert tiny.exit_code == 0, tiny.output
    # A later submit into "small" without --model adds to its model: the same file maps onto the same jobs.
    again = _farm(home, "submit", str(prompts), "--dataset", "small", "--no-dispatch")
    assert again.exit_code == 0, again.output
    assert "0 new jobs, 2 already present" in again.output
    engine = make_engine(f"sqlite:///{home / 'farm.db'}")
    with engine.connect() as conn:
        models = dict(
            conn.execute(
                select(Dataset.name, func.min(Job.model)).join(Job, Job.dataset_id == Dataset.id).group_by(Dataset.name)
            ).all()
        )
    assert models == {"rel": "pixart-lcm-1024", "small": "tiny"}

"""Every `--json` the farm prints keeps one shape whatever the number of items, so a script parses each answer alike.

`farm status --json`: one JSON array of dataset objects (`[]` for none). `farm jobs --json` and
`farm workers --json`: JSON Lines, one object per job or worker, each with the same keys (no output for none).
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
from click.testing import CliRunner

from farm.cli import main
from farm.store.engine import ensure_schema, make_engine
from farm.store.fleet import Heartbeat, WorkerInfo, beat
from farm.store.queries import JobRow
from farm.store.schema import JobStatus, utcnow

DATASET_KEYS = {
    "dataset",
    "counts",
    "total",
    "images_per_s",
    "eta_s",
    "done",
    "unroutable",
    "unroutable_reasons",
    "unroutable_reasons_estimated",
    "recipes",
    "warnings",
    "pending_per_pool",
    "acceptance",
}


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An embedded farm's home, run from a folder without a farm.toml; jobs are recorded, never sent."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    return tmp_path / "home"


def _out(home: Path, *args: str) -> str:
    result = CliRunner().invoke(main, ["--home", str(home), *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.stdout


def _submit(home: Path, dataset: str, prompts: int) -> None:
    path = home.parent / f"{dataset}.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(prompts)), encoding="utf-8")
    _out(home, "submit", str(path), "--dataset", dataset, "--no-dispatch")


def _lines(text: str) -> list[dict[str, object]]:
    """JSON Lines: every line one object."""
    rows = [json.loads(line) for line in text.splitlines()]
    assert all(isinstance(row, dict) for row in rows)
    return rows


def _check_dataset(entry: dict[str, object], name: str, pending: int) -> None:
    assert set(entry) == DATASET_KEYS
    assert entry["dataset"] == name
    assert entry["counts"] == {**{s.value: 0 for s in JobStatus}, "pending": pending}
    assert entry["total"] == pending and entry["done"] is False


def test_status_json_is_always_an_array_of_datasets(home: Path) -> None:
    assert json.loads(_out(home, "status", "--json")) == []

    _submit(home, "one", 2)
    for args in (("status", "--json"), ("status", "one", "--json")):
        [only] = json.loads(_out(home, *args))  # an array of one, no longer a bare object
        _check_dataset(only, "one", 2)

    _submit(home, "two", 3)
    first, second = json.loads(_out(home, "status", "--json"))  # oldest first
    _check_dataset(first, "one", 2)
    _check_dataset(second, "two", 3)
    [named] = json.loads(_out(home, "status", "two", "--json"))
    _check_dataset(named, "two", 3)


def test_status_json_is_the_only_output(home: Path) -> None:
    # With unfinished jobs and no reaper, plain `farm status` warns; with --json nothing but the array is printed.
    _submit(home, "one", 1)
    assert "never run" in CliRunner().invoke(main, ["--home", str(home), "status"]).output
    result = CliRunner().invoke(main, ["--home", str(home), "status", "--json"], catch_exceptions=False)
    assert result.stderr == "" and len(result.stdout.splitlines()) == 1
    assert json.loads(result.stdout)[0]["dataset"] == "one"


def test_jobs_json_is_one_object_per_line(home: Path) -> None:
    _submit(home, "d", 2)
    keys = {f.name for f in fields(JobRow)}
    assert {"id", "status", "attempts", "source_line", "prompt", "seed", "worker", "output_uri", "error"} <= keys

    assert _out(home, "jobs", "d", "--json", "--state", "succeeded") == ""  # none: no output, no `[]`
    [one] = _lines(_out(home, "jobs", "d", "--json", "--limit", "1"))
    assert set(one) == keys and one["status"] == "pending" and one["prompt"] == "prompt 0"
    two = _lines(_out(home, "jobs", "d", "--json"))
    assert [row["prompt"] for row in two] == ["prompt 0", "prompt 1"]
    assert all(set(row) == keys for row in two)


def test_workers_json_is_one_object_per_line(home: Path) -> None:
    keys = {f.name for f in fields(WorkerInfo)}
    assert _out(home, "workers", "--json") == ""  # none: no output, and not the "no workers" sentence

    engine = make_engine(f"sqlite:///{home / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    try:
        seen = []
        for name in ("w1", "w2"):  # one worker, then two
            with engine.begin() as conn:
                beat(conn, Heartbeat(name, "small", "host", 1, "cpu", None, {"models": ["tiny"]}, 0, 1.5, utcnow()))
            seen.append(name)
            rows = _lines(_out(home, "workers", "--json"))
            assert sorted(str(row["name"]) for row in rows) == seen
            assert all(set(row) == keys and row["state"] == "alive" and row["pool"] == "small" for row in rows)
    finally:
        engine.dispose()


def test_status_watch_json_writes_only_the_json_to_stdout(home: Path) -> None:
    _submit(home, "watched", 2)
    _out(home, "cancel", "--dataset", "watched")  # finished: the watch draws once and ends
    result = CliRunner().invoke(main, ["--home", str(home), "status", "watched", "--watch", "--json"])
    assert result.exit_code == 0, result.output
    [entry] = json.loads(result.stdout)  # the bars went to stderr
    assert entry["dataset"] == "watched" and entry["done"] is True

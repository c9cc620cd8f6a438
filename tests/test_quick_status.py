"""`farm status` over the bare DB-API driver (farm/store/quick.py): the library's answer, in a process that never
imports SQLAlchemy, on the embedded default and on PostgreSQL; and the ordinary path wherever the store is not
ready for it (no database yet, a schema behind this code's)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from farm.cli import main
from farm.store.engine import current_revision, head_revision, make_engine, upgrade
from farm.store.queries import dataset_status
from farm.store.schema import Job, JobStatus, utcnow

# Runs the real CLI, then says on stderr whether SQLAlchemy was imported.
_STATUS = """
import sys
from farm.cli import main
try:
    main(sys.argv[1:], prog_name="farm")
    code = 0
except SystemExit as exc:
    code = exc.code
sys.stderr.write("sqlalchemy imported: %s\\n" % ("sqlalchemy" in sys.modules))
sys.exit(code)
"""


def _status_process(env: dict[str, str], *args: str) -> tuple[str, str]:
    done = subprocess.run(
        [sys.executable, "-c", _STATUS, "status", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def _submit(env: dict[str, str], tmp_path: Path, dataset: str, prompts: int) -> None:
    path = tmp_path / f"{dataset}.txt"
    path.write_text("".join(f"prompt {i}\n" for i in range(prompts)), encoding="utf-8")
    result = CliRunner().invoke(main, ["submit", str(path), "--dataset", dataset, "--no-dispatch"], env=env)
    assert result.exit_code == 0, result.output


def _progress(url: str, dataset: str) -> None:
    """Three jobs succeed now, two become unroutable with a reason: figures the rate and reasons queries read."""
    engine = make_engine(url)
    with engine.begin() as conn:
        ids = list(conn.execute(select(Job.id).order_by(Job.source_line)).scalars())
        now = utcnow()
        for i, job_id in enumerate(ids[:3]):
            moment = now - timedelta(seconds=10 * (i + 1))
            conn.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(status=JobStatus.SUCCEEDED.value, finished_at=moment, output_uri="file:///x.png")
            )
        conn.execute(update(Job).where(Job.id.in_(ids[3:5])).values(routing_note="no pool serves model tiny"))
    engine.dispose()


def _comparable(entry: dict[str, Any]) -> dict[str, Any]:
    """Everything but the rate and ETA, which move with the clock between two reads."""
    return {k: v for k, v in entry.items() if k not in ("images_per_s", "eta_s")}


def _check_same_answer(url: str, env: dict[str, str], dataset: str) -> None:
    stdout, stderr = _status_process(env, "--json")
    assert "sqlalchemy imported: False" in stderr
    [quick] = json.loads(stdout)
    engine = make_engine(url)
    library = dataset_status(engine, dataset).as_dict()
    engine.dispose()
    assert _comparable(quick) == _comparable(library)
    assert quick["counts"]["succeeded"] == 3 and quick["unroutable_reasons"] == {"no pool serves model tiny": 2}
    assert quick["images_per_s"] > 0 and library["images_per_s"] > 0
    assert abs(quick["images_per_s"] - library["images_per_s"]) < 0.02  # 3 images over ≈ 30 s either way
    [named] = json.loads(_status_process(env, dataset, "--json")[0])
    assert _comparable(named) == _comparable(quick)
    text, stderr = _status_process(env, dataset)
    assert f"{dataset}: 3/8 finished" in text and "unroutable 2: no pool serves model tiny" in text
    assert "the reaper and dispatcher has never run" in stderr  # the warning is read over the driver too


def test_embedded_status_answers_without_sqlalchemy(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"FARM_HOME": str(home)}
    _submit(env, tmp_path, "quick", 8)
    url = f"sqlite:///{home / 'farm.db'}"
    _progress(url, "quick")
    _check_same_answer(url, env, "quick")


def test_postgres_status_answers_without_sqlalchemy(tmp_path: Path, own_pg_url: str) -> None:
    env = {"FARM_HOME": str(tmp_path / "home"), "FARM_DATABASE_URL": own_pg_url}
    _submit(env, tmp_path, "quick", 8)
    _progress(own_pg_url, "quick")
    _check_same_answer(own_pg_url, env, "quick")


def test_an_unknown_dataset_is_the_same_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = {"FARM_HOME": str(home)}
    _submit(env, tmp_path, "known", 1)
    done = subprocess.run(
        [sys.executable, "-c", _STATUS, "status", "missing"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and "no dataset named 'missing'" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_fresh_home_takes_the_ordinary_path(tmp_path: Path) -> None:
    """No database yet: the ordinary path creates it (and answers []); the next call reads over the driver."""
    env = {"FARM_HOME": str(tmp_path / "home")}
    stdout, stderr = _status_process(env, "--json")
    assert json.loads(stdout) == [] and "sqlalchemy imported: True" in stderr
    stdout, stderr = _status_process(env, "--json")
    assert json.loads(stdout) == [] and "sqlalchemy imported: False" in stderr


def test_a_store_behind_this_code_is_upgraded_by_the_ordinary_path(tmp_path: Path) -> None:
    """An embedded store at an older revision: the driver path steps aside, the ordinary one upgrades it."""
    home = tmp_path / "home"
    home.mkdir()
    url = f"sqlite:///{home / 'farm.db'}"
    engine = make_engine(url)
    upgrade(engine, "0010")
    assert current_revision(engine) == "0010"
    _, stderr = _status_process({"FARM_HOME": str(home)}, "--json")
    assert "sqlalchemy imported: True" in stderr
    assert current_revision(engine) == head_revision()
    engine.dispose()


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "mysql://nobody@nowhere/db"])
def test_urls_it_cannot_read_leave_it_to_the_ordinary_path(url: str) -> None:
    from farm.store.quick import open_reader

    with open_reader(url) as reader:
        assert reader is None

"""The `farm` command never answers with a traceback: one `error:` line and an exit status a script can branch on.

2: input the user can fix; 3: a service the farm needs is away; 1: anything else (unforeseen errors say how to see
their traceback, and FARM_DEBUG=1 shows it). Also: processes opening a fresh embedded broker together, and
`farm cancel` by --job, --dataset or a TARGET that must match exactly one thing.
"""

from __future__ import annotations

import json
import multiprocessing
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from click.testing import CliRunner, Result
from PIL import Image
from sqlalchemy import select, update
from sqlalchemy.engine import Engine

from farm.cli import main
from farm.store.engine import ensure_schema, make_engine
from farm.store.schema import Dataset, Job
from tests.support.processes import REPO, farm_env, run_farm
from tests.support.s3 import free_port

if TYPE_CHECKING:
    from multiprocessing.synchronize import Barrier

PROMPTS = "a red door\na blue door\na green door\n"
DEBUG_HINT = "(FARM_DEBUG=1 shows the traceback)"


@pytest.fixture()
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An embedded farm's home that does not exist yet, run from a folder without a farm.toml."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    (tmp_path / "p.txt").write_text(PROMPTS, encoding="utf-8")
    return tmp_path / "home"


def _farm(home: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    # catch_exceptions=False: an exception that got past the `farm` group would fail the test, not be swallowed.
    return CliRunner().invoke(main, ["--home", str(home), *args], env=env, catch_exceptions=False)


def _error_line(stderr: str) -> str:
    """The one line an error prints on stderr, checked to be the only one and to carry no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def _store(home: Path) -> Engine:
    engine = make_engine(f"sqlite:///{home / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    return engine


def _states(home: Path) -> dict[str, str]:
    engine = _store(home)
    try:
        with engine.connect() as conn:
            return {str(i): str(s) for i, s in conn.execute(select(Job.id, Job.status))}
    finally:
        engine.dispose()


def _submit(home: Path, dataset: str) -> None:
    result = _farm(home, "submit", str(home.parent / "p.txt"), "--dataset", dataset, "--no-dispatch")
    assert result.exit_code == 0, result.output


# ---- 2: input the user can fix -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("status", "nope"),
        ("status", "nope", "--json"),
        ("jobs", "nope"),
        ("dispatch", "--dataset", "nope"),
        ("retry", "nope", "--failed"),
        ("pause", "nope"),
        ("gc", "nope"),
    ],
)
def test_an_unknown_dataset_exits_2_in_one_line(home: Path, args: tuple[str, ...]) -> None:
    _submit(home, "doors")
    result = _farm(home, *args)
    assert result.exit_code == 2
    assert _error_line(result.stderr) == "error: no dataset named 'nope'"
    assert result.stdout == ""


@pytest.mark.parametrize("value", ["-1", "0", "nan", "inf"])
def test_a_watch_interval_that_is_not_a_positive_number_exits_2_naming_the_option(home: Path, value: str) -> None:
    # -1 and nan used to reach time.sleep and end in a ValueError traceback; 0 spun a core.
    result = _farm(home, "status", "--watch", "--interval-s", value)
    assert result.exit_code == 2
    line = _error_line(result.stderr)
    assert "'--interval-s'" in line and "above 0" in line
    assert "status -h" in line  # where to read the options


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("jobs", "doors", "--limit", "0"), "'--limit'"),  # a negative LIMIT was an SQL error on PostgreSQL
        (("status", "--bogus"), "No such option '--bogus'"),
        (("nosuch",), "No such command 'nosuch'"),
        (("submit", "missing.txt", "--dataset", "d"), "missing.txt: file not found"),
        (("submit", "../p.txt", "--dataset", "../x"), "dataset name"),
        (("submit", "../p.txt", "--dataset", "d", "--steps", "0"), "num_inference_steps"),
    ],
)
def test_usage_errors_and_invalid_submissions_exit_2_in_one_line(home: Path, args: tuple[str, ...], says: str) -> None:
    _submit(home, "doors")
    result = _farm(home, *args)
    assert result.exit_code == 2
    assert says in _error_line(result.stderr)


def test_a_group_without_its_command_shows_its_help_not_an_error(home: Path) -> None:
    for args in ([], ["db"]):
        result = CliRunner().invoke(main, args, catch_exceptions=False)
        assert result.exit_code == 2  # click's status for a missing command
        assert "Usage:" in result.stderr and "Commands:" in result.stderr and "error:" not in result.stderr
    result = _farm(home)  # an option, then no command: that is a usage error
    assert result.exit_code == 2 and "Missing command" in _error_line(result.stderr)


# ---- 3: a service is away ---------------------------------------------------------------------------------


def test_postgresql_unreachable_exits_3_in_one_line_without_the_password(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text(PROMPTS, encoding="utf-8")
    url = f"postgresql://farm:sup3r-secret@127.0.0.1:{free_port()}/farm"  # nothing listens there
    env = farm_env(FARM_HOME=str(tmp_path / "home"), FARM_DATABASE_URL=url)
    for args in (["status", "--json"], ["submit", str(tmp_path / "p.txt"), "--dataset", "d"], ["db", "upgrade"]):
        result = run_farm(args, env)
        assert result.returncode == 3, result.stderr
        line = _error_line(result.stderr)
        assert "cannot reach the job database" in line and "127.0.0.1" in line
        assert "sup3r-secret" not in result.stdout + result.stderr
        assert "--json" not in args or result.stdout == ""  # a script reading the JSON gets none, not half


def test_redis_unreachable_on_submit_exits_3_and_the_jobs_wait_as_pending(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text(PROMPTS, encoding="utf-8")
    broker = f"redis://:hunter2-secret@127.0.0.1:{free_port()}/0"  # nothing listens there
    env = farm_env(FARM_HOME=str(tmp_path / "home"), FARM_BROKER_URL=broker)
    recorded = run_farm(["submit", str(tmp_path / "p.txt"), "--dataset", "first"], env)
    assert recorded.returncode == 0, recorded.stderr  # a plain submit only records: it never needs the broker
    assert "3 new jobs" in recorded.stdout and "hunter2-secret" not in recorded.stdout + recorded.stderr
    result = run_farm(["submit", str(tmp_path / "p.txt"), "--dataset", "doors", "--dispatch"], env)
    assert result.returncode == 3, result.stderr
    assert "3 new jobs" in result.stdout  # recorded before the broker was tried
    line = _error_line(result.stderr)
    assert "unreachable" in line and "nothing is lost" in line and "farm dispatch" in line
    assert "hunter2-secret" not in result.stdout + result.stderr
    [status] = json.loads(run_farm(["status", "doors", "--json"], env).stdout)
    assert status["counts"]["pending"] == 3


def test_storage_unreachable_exits_3_and_records_nothing(home: Path, tmp_path: Path) -> None:
    image = tmp_path / "edges.png"
    Image.new("RGB", (32, 32)).save(image)
    env = {
        "FARM_STORAGE_URL": "s3://farm-bucket",
        "FARM_S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}",  # nothing listens there
        "AWS_ACCESS_KEY_ID": "farm-test",
        "AWS_SECRET_ACCESS_KEY": "farm-test-secret",
    }
    args = ("--control-image", str(image), "--controlnet", "tiny-controlnet", "--no-dispatch")
    result = _farm(home, "submit", str(tmp_path / "p.txt"), "--dataset", "doors", *args, env=env)
    assert result.exit_code == 3
    assert "cannot reach http://127.0.0.1:" in _error_line(result.stderr)
    assert json.loads(_farm(home, "status", "--json").stdout) == []


# ---- 1: everything else, and FARM_DEBUG -----------------------------------------------------------------


def test_an_unexpected_error_is_one_line_with_the_debug_hint_and_farm_debug_shows_the_traceback(
    tmp_path: Path,
) -> None:
    # Unforeseen today: FARM_HOME is a file, so creating the job database's folder raises FileExistsError,
    # which no layer turns into a FarmError. (If one ever does, pick another unforeseen error here.)
    home = tmp_path / "home"
    home.write_text("not a folder", encoding="utf-8")
    result = run_farm(["status"], farm_env(FARM_HOME=str(home)))
    assert result.returncode == 1
    line = _error_line(result.stderr)
    assert line.startswith("error: unexpected FileExistsError: ") and line.endswith(DEBUG_HINT)
    assert str(home) in line

    debug = run_farm(["status"], farm_env(FARM_HOME=str(home), FARM_DEBUG="1"))
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1].startswith("error: unexpected FileExistsError: ")
    assert DEBUG_HINT not in debug.stderr


def test_a_farm_error_exits_1_in_one_line_and_farm_debug_shows_its_traceback(home: Path, tmp_path: Path) -> None:
    blocked = tmp_path / "images-is-a-file"
    blocked.write_text("", encoding="utf-8")
    env = {"FARM_STORAGE_URL": blocked.as_uri()}
    _submit(home, "doors")
    result = _farm(home, "gc", env=env)
    assert result.exit_code == 1
    line = _error_line(result.stderr)
    assert str(blocked) in line and DEBUG_HINT not in line  # a foreseen error needs no traceback

    debug = _farm(home, "gc", env={**env, "FARM_DEBUG": "1"})
    assert debug.exit_code == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == line


def test_farm_debug_shows_the_traceback_of_a_usage_error_too(home: Path) -> None:
    _submit(home, "doors")
    result = _farm(home, "status", "nope", env={"FARM_DEBUG": "1"})
    assert result.exit_code == 2
    assert "Traceback (most recent call last)" in result.stderr and "UnknownDataset" in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: no dataset named 'nope'"


# ---- a fresh embedded broker opened by several processes at once -------------------------------------------


def _publish_at_once(home: str, barrier: Barrier, index: int) -> None:
    """One process: a real farm Celery app on the embedded broker, publishing as soon as every process is ready."""
    from farm.dispatch.broker import RENDER_TASK, make_celery
    from farm.settings import load_settings

    settings = load_settings(env={}, home=home)
    app = make_celery(settings)
    barrier.wait(timeout=60)
    app.send_task(RENDER_TASK, args=[[f"job-{index}"]], queue=settings.queue)


def test_processes_opening_a_fresh_embedded_broker_together_all_publish(tmp_path: Path) -> None:
    # kombu creates the broker's tables and each queue's row on first use (look, then create): processes
    # released together used to die with `table kombu_message already exists` or a UNIQUE constraint error.
    home = tmp_path / "home"
    home.mkdir()
    count = 4
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(count)
    processes = [context.Process(target=_publish_at_once, args=(str(home), barrier, i)) for i in range(count)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    assert [p.exitcode for p in processes] == [0] * count
    with sqlite3.connect(home / "broker.db") as conn:
        assert conn.execute("SELECT count(*) FROM kombu_queue").fetchone() == (1,)
        assert conn.execute("SELECT count(*) FROM kombu_message").fetchone() == (count,)


def test_farm_submits_started_together_on_a_fresh_home_all_succeed(tmp_path: Path) -> None:
    (tmp_path / "p.txt").write_text(PROMPTS, encoding="utf-8")
    env = farm_env(FARM_HOME=str(tmp_path / "home"))
    names = [f"d{i}" for i in range(4)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "farm", "submit", str(tmp_path / "p.txt"), "--dataset", name, "--dispatch"],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in names
    ]
    outcomes = [(p.wait(timeout=120), *p.communicate()) for p in processes]
    for status, stdout, stderr in outcomes:
        assert status == 0, stdout + stderr
        assert "Traceback" not in stderr and "dispatched 3 jobs" in stdout
    statuses = json.loads(run_farm(["status", "--json"], env).stdout)
    assert sorted((s["dataset"], s["counts"]["queued"]) for s in statuses) == [(name, 3) for name in names]


# ---- cancel ------------------------------------------------------------------------------------------------


def _job_ids(home: Path, dataset: str) -> list[str]:
    engine = _store(home)
    try:
        with engine.connect() as conn:
            query = select(Job.id).join(Dataset).where(Dataset.name == dataset).order_by(Job.id)
            return [str(i) for i in conn.execute(query).scalars()]
    finally:
        engine.dispose()


def test_cancel_by_job_and_by_dataset(home: Path) -> None:
    _submit(home, "doors")
    one, *rest = _job_ids(home, "doors")
    result = _farm(home, "cancel", "--job", one)
    assert result.exit_code == 0 and f"job {one}: 1 unfinished jobs canceled" in result.stdout
    assert _states(home) == {one: "canceled", **{i: "pending" for i in rest}}
    result = _farm(home, "cancel", "--dataset", "doors")
    assert result.exit_code == 0 and "dataset doors: 2 unfinished jobs canceled" in result.stdout
    assert set(_states(home).values()) == {"canceled"}


def test_cancel_of_something_already_finished_exits_0_and_says_so(home: Path) -> None:
    _submit(home, "doors")
    done, failed, pending = _job_ids(home, "doors")
    engine = _store(home)
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == done).values(status="succeeded"))
        conn.execute(update(Job).where(Job.id == failed).values(status="failed"))
    engine.dispose()
    result = _farm(home, "cancel", "--job", done)
    assert result.exit_code == 0
    assert result.stdout.strip() == f"job {done} is already succeeded: nothing to cancel"
    assert _farm(home, "cancel", pending).exit_code == 0  # the positional TARGET still finds a job
    result = _farm(home, "cancel", "--dataset", "doors")
    assert result.exit_code == 0
    assert "nothing to cancel" in result.stdout and "1 succeeded, 1 failed, 1 canceled" in result.stdout
    assert _states(home) == {done: "succeeded", failed: "failed", pending: "canceled"}


def test_cancel_of_a_job_or_dataset_that_does_not_exist_exits_2_naming_it(home: Path) -> None:
    _submit(home, "doors")
    before = _states(home)
    missing = "0123456789abcdef0123456789abcdef"  # well formed, matches nothing (this used to say "0 canceled")
    result = _farm(home, "cancel", "--job", missing)
    assert result.exit_code == 2 and _error_line(result.stderr) == f"error: no job with id '{missing}'"
    result = _farm(home, "cancel", "--dataset", "nope")
    assert result.exit_code == 2 and _error_line(result.stderr) == "error: no dataset named 'nope'"
    for target in (missing, "nope"):
        result = _farm(home, "cancel", target)
        assert result.exit_code == 2
        line = _error_line(result.stderr)
        assert f"no dataset named '{target}'" in line and f"no job with id '{target}'" in line
    assert _states(home) == before


def test_cancel_of_a_name_that_is_both_a_dataset_and_a_job_id_asks_which(home: Path) -> None:
    _submit(home, "doors")
    job = _job_ids(home, "doors")[0]
    _submit(home, job)  # a dataset named like that job: a valid name, which cancel could not reach before
    before = _states(home)
    result = _farm(home, "cancel", job)
    assert result.exit_code == 2
    line = _error_line(result.stderr)
    assert "both a dataset name and a job id" in line and f"--job {job}" in line and f"--dataset {job}" in line
    assert _states(home) == before  # nothing canceled on a guess

    assert _farm(home, "cancel", "--dataset", job).exit_code == 0
    assert {_states(home)[i] for i in _job_ids(home, job)} == {"canceled"}
    assert _states(home)[job] == "pending"  # the job of that id is untouched
    assert _farm(home, "cancel", "--job", job).exit_code == 0
    assert _states(home)[job] == "canceled"


@pytest.mark.parametrize("args", [(), ("doors", "--dataset", "doors"), ("--job", "x", "--dataset", "doors")])
def test_cancel_takes_exactly_one_target(home: Path, args: tuple[str, ...]) -> None:
    _submit(home, "doors")
    result = _farm(home, "cancel", *args)
    assert result.exit_code == 2 and "say what to cancel" in _error_line(result.stderr)

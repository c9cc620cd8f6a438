"""Steering submitted datasets: cancel, retry --failed, pause and resume, through the CLI and the transitions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from sqlalchemy import select, update

from farm.cli import main
from farm.store import transitions
from farm.store.engine import make_engine
from farm.store.schema import Dataset, Job

PROMPTS = "a red door\na blue door\na green door\n"


@pytest.fixture()
def farm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    """Run `farm …` in-process on the embedded store with kombu's in-memory broker."""
    monkeypatch.setenv("FARM_BROKER_URL", "memory://")
    home = tmp_path / "home"
    (tmp_path / "p.txt").write_text(PROMPTS)

    def run(*args: str) -> str:
        result = CliRunner().invoke(main, ["--home", str(home), *args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    run("submit", str(tmp_path / "p.txt"), "--dataset", "doors", "--no-dispatch")
    run.engine = make_engine(f"sqlite:///{home / 'farm.db'}")  # type: ignore[attr-defined]
    return run


def _states(engine) -> list[str]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return sorted(conn.execute(select(Job.status)).scalars())


def test_cancel_a_dataset_and_a_single_job(farm) -> None:  # type: ignore[no-untyped-def]
    with farm.engine.connect() as conn:
        one = conn.execute(select(Job.id).limit(1)).scalar_one()
    assert "1 unfinished jobs canceled" in farm("cancel", one)
    assert _states(farm.engine) == ["canceled", "pending", "pending"]
    assert "2 unfinished jobs canceled" in farm("cancel", "doors")
    assert json.loads(farm("status", "doors", "--json"))[0]["counts"]["canceled"] == 3
    assert "0 unfinished jobs canceled" in farm("cancel", "doors")  # finished jobs stay as they are


def test_retry_failed_gives_fresh_attempts_and_dispatches(farm) -> None:  # type: ignore[no-untyped-def]
    with farm.engine.begin() as conn:
        ids = conn.execute(select(Job.id).order_by(Job.id).limit(2)).scalars().all()
        conn.execute(update(Job).where(Job.id.in_(ids)).values(status="failed", attempts=3, error="attempt 3: x"))
    output = farm("retry", "doors", "--failed")
    assert "2 failed jobs back to pending" in output and "dispatched 3 jobs" in output
    with farm.engine.connect() as conn:
        rows = conn.execute(select(Job.status, Job.attempts, Job.error).where(Job.id.in_(ids))).all()
    assert [tuple(r) for r in rows] == [("queued", 0, "attempt 3: x")] * 2


def test_paused_datasets_are_not_claimed_and_resume_sends_them_again(farm) -> None:  # type: ignore[no-untyped-def]
    assert "dispatched 3 jobs" in farm("dispatch", "--dataset", "doors")
    farm("pause", "doors")
    with farm.engine.begin() as conn:
        ids = conn.execute(select(Job.id)).scalars().all()
        assert conn.execute(select(Dataset.paused)).scalar_one() is True
        # Out of the broker's window: pending again, and their messages claim nothing while paused.
        assert set(conn.execute(select(Job.status)).scalars()) == {"pending"}
        assert transitions.claim(conn, ids, worker="w", lease_s=60, max_attempts=3) == []
    assert "dispatched 0 jobs" in farm("dispatch", "--dataset", "doors")  # a paused dataset is not sent
    output = farm("resume", "doors")
    assert "resumed" in output and "dispatched 3 jobs" in output
    with farm.engine.begin() as conn:
        assert len(transitions.claim(conn, ids, worker="w", lease_s=60, max_attempts=3)) == 3


def test_unknown_dataset_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["--home", str(tmp_path), "pause", "nope"])
    assert result.exit_code == 2 and "no dataset named 'nope'" in result.output


def test_retry_canceled_runs_canceled_jobs_after_all(farm) -> None:  # type: ignore[no-untyped-def]
    farm("cancel", "doors")
    output = farm("retry", "doors", "--canceled")
    assert "3 canceled jobs back to pending" in output and "dispatched 3 jobs" in output
    assert _states(farm.engine) == ["queued"] * 3


def test_status_and_workers_say_when_no_reaper_has_run(farm) -> None:  # type: ignore[no-untyped-def]
    # Problem 1: with no reaper running, expired leases were never reaped and nothing said so.
    for command in (("status",), ("status", "doors"), ("workers",)):
        assert "the reaper and dispatcher has never run" in farm(*command)
    assert "reaper" not in farm("status", "doors", "--json")
    farm("cancel", "doors")  # nothing unfinished: nothing to warn about
    assert "reaper" not in farm("status")

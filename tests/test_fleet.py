"""The fleet: pool settings from farm.toml (read with the other settings), heartbeats, `farm workers`."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import update

from farm.errors import ConfigError
from farm.settings import load_settings
from farm.store.engine import ensure_schema, make_engine
from farm.store.fleet import Heartbeat, beat, list_workers, mark_stopped
from farm.store.schema import Worker, utcnow
from tests.support.processes import Worker as WorkerProcess
from tests.support.processes import farm_env, run_farm, wait_until

POOLS = """
[pools.small-cards]
device = "cpu"
low_memory = true
max_batch = 2

[pools.big-cards]
max_batch = 8
queue = "render"
"""


def test_pool_options_come_from_farm_toml(tmp_path: Path) -> None:
    config = tmp_path / "farm.toml"
    config.write_text(POOLS)
    settings = load_settings({}, config_file=config, home=str(tmp_path))
    assert settings.pool("small-cards") == {"device": "cpu", "low_memory": True, "max_batch": 2}
    with pytest.raises(ConfigError, match=r"no \[pools.tiny\] table \(pools configured: big-cards, small-cards\)"):
        settings.pool("tiny")
    config.write_text('[pools.x]\nmax_batch = "eight"\n')
    with pytest.raises(ConfigError, match="max_batch must be int, got 'eight'"):
        load_settings({}, config_file=config, home=str(tmp_path))
    config.write_text("[pools.x]\ngpus = 2\n")
    with pytest.raises(ConfigError, match="unknown key 'gpus'"):
        load_settings({}, config_file=config, home=str(tmp_path))


def _beat(name: str, pool: str | None = "p") -> Heartbeat:
    return Heartbeat(name, pool, "host", 1, "cpu", 2**30, {"models": ["tiny"]}, 3, 1.5, utcnow())


def test_heartbeats_make_workers_alive_stale_or_stopped(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'farm.db'}")
    ensure_schema(engine, auto_upgrade=True)
    with engine.begin() as conn:
        for name in ("a", "b", "c"):
            beat(conn, _beat(name))
        beat(conn, _beat("a"))  # a second beat refreshes, never duplicates
        conn.execute(update(Worker).where(Worker.name == "b").values(last_seen=utcnow() - timedelta(seconds=60)))
        mark_stopped(conn, "c")
    shown = {w.name: w.state for w in list_workers(engine, beat_s=10)}
    assert shown == {"a": "alive", "b": "stale"}  # 60 s without a beat is three missed 10 s beats
    everyone = list_workers(engine, beat_s=10, include_stopped=True)
    assert [(w.name, w.state) for w in everyone] == [("a", "alive"), ("b", "stale"), ("c", "stopped")]
    assert everyone[0].loaded == {"models": ["tiny"]} and everyone[0].current_jobs == 3


@pytest.mark.integration
def test_a_pool_worker_registers_reports_what_it_loaded_and_stops_cleanly(tmp_path: Path) -> None:
    (tmp_path / "farm.toml").write_text(POOLS)
    env = farm_env(FARM_HOME=str(tmp_path / "home"), FARM_LEASE_S="30")
    assert run_farm(["models", "make-tiny"], env, cwd=tmp_path).returncode == 0

    def workers(*extra: str) -> list[dict[str, object]]:
        out = run_farm(["workers", "--json", *extra], env, cwd=tmp_path).stdout
        return [json.loads(line) for line in out.splitlines()]

    process = WorkerProcess(env, tmp_path / "worker.log", cwd=tmp_path, extra_args=("--pool", "small-cards"))
    try:
        wait_until(lambda: len(workers()) == 1, timeout_s=120, what="the worker's first heartbeat", worker=process)
        [before] = workers()
        assert (before["pool"], before["state"], before["device"]) == ("small-cards", "alive", "cpu")
        (tmp_path / "p.txt").write_text("a pool test\n")
        submitted = run_farm(["submit", "p.txt", "--dataset", "pool", "--model", "tiny"], env, cwd=tmp_path)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr
        wait_until(
            lambda: json.loads(run_farm(["status", "pool", "--json"], env, cwd=tmp_path).stdout)[0]["done"],
            timeout_s=120,
            what="the pool's job",
            worker=process,
        )
        wait_until(
            # The pool's low_memory = true took effect: T5 was loaded on its own to encode the prompt, then freed.
            lambda: (
                workers()[0]["loaded"]["models"] == ["tiny"]  # type: ignore[index]
                and workers()[0]["loaded"]["caches"]["t5_loads"] == 1
            ),  # type: ignore[index]
            timeout_s=60,  # type: ignore[index]
            what="a heartbeat listing the loaded model",
            worker=process,
        )
    finally:
        assert process.stop() == 0
    assert workers() == []
    [stopped] = workers("--all")
    assert stopped["state"] == "stopped"
    assert stopped["loaded"]["caches"]["t5_loads"] == 1  # type: ignore[index]

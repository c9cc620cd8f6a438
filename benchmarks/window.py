"""The dispatch window, seen from outside: how soon a priority or a pause takes effect, and whether one fast worker
is kept busy. Real `farm` processes on the tiny model at 64 px (a worker renders tens of images a second on a
CPU, so dispatch, not rendering, is what is measured).

    python -m benchmarks.window priority HOME [--code DIR]   # 3,000 jobs, then 16 at priority 9, then a pause
    python -m benchmarks.window throughput HOME [--code DIR] # images/s from the 200th to the 1,200th image

HOME is a fresh FARM_HOME (deleted first); FARM_DATABASE_URL and FARM_BROKER_URL from the environment are used
when set (the embedded default otherwise). --code runs another checkout of the farm (to compare commits).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text

from farm.store.engine import normalize_url

SIZE = ["--model", "tiny", "--width", "64", "--height", "64"]


class Farm:
    """`farm` commands and one worker process against one home, from one checkout."""

    def __init__(self, home: Path, code: Path) -> None:
        self.home, self.code = home, code
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
        self.env["FARM_HOME"] = str(home)
        for key in ("FARM_DATABASE_URL", "FARM_BROKER_URL"):
            if os.environ.get(key):
                self.env[key] = os.environ[key]
        self.env["FARM_QUEUE"] = f"window-{os.getpid()}"
        url = self.env.get("FARM_DATABASE_URL", f"sqlite:///{home}/farm.db")
        shutil.rmtree(home, ignore_errors=True)
        (home / "models").mkdir(parents=True)
        self.run("models", "make-tiny")
        if "FARM_DATABASE_URL" in self.env:
            self.run("db", "upgrade")
        self.engine = create_engine(normalize_url(url))
        self.worker: subprocess.Popen[bytes] | None = None

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "farm", *args], cwd=self.code, env=self.env, capture_output=True, text=True
        )
        if done.returncode:
            raise SystemExit(f"farm {' '.join(args)}: {done.stdout}{done.stderr}")
        return done.stdout

    def prompts(self, name: str, n: int) -> str:
        path = self.home / f"{name}.txt"
        path.write_text("".join(f"{name} prompt {i}\n" for i in range(n)))
        return str(path)

    def start_worker(self) -> None:
        log = (self.home / "worker.log").open("w")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "farm", "worker", "--loglevel", os.environ.get("WINDOW_LOGLEVEL", "WARNING")],
            cwd=self.code,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )

    def stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.terminate()
            self.worker.wait(timeout=120)

    def query(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as conn:
            return conn.execute(text(sql), params).one()

    def succeeded(self, dataset: str) -> int:
        return int(
            self.query(
                "SELECT count(*) FROM jobs j JOIN datasets d ON d.id = j.dataset_id "
                "WHERE d.name = :n AND j.status = 'succeeded'",
                n=dataset,
            )[0]
        )

    def moment(self, value: datetime) -> Any:
        """A bind value comparable with the store's timestamps (SQLite keeps them as text)."""
        return value if self.engine.dialect.name == "postgresql" else value.strftime("%Y-%m-%d %H:%M:%S.%f")


def _aware(value: Any) -> datetime:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _wait(check: Any, timeout_s: float = 600) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError("the benchmark's worker did not get there in time")
        time.sleep(0.05)


def priority(farm: Farm) -> dict[str, Any]:
    """3,000 jobs at priority 0 keep one worker busy; then 16 at priority 9 (how soon are they claimed?); then the
    first dataset is paused (is any of its jobs claimed after `farm pause` returned?)."""
    farm.run("submit", farm.prompts("low", 3000), "--dataset", "low", *SIZE)
    farm.start_worker()
    try:
        _wait(lambda: farm.succeeded("low") >= 100)
        before, started = farm.succeeded("low"), time.monotonic()
        time.sleep(5)
        rate = (farm.succeeded("low") - before) / (time.monotonic() - started)
        queued = int(farm.query("SELECT count(*) FROM jobs WHERE status = 'queued'")[0])
        submitted, clock = datetime.now(UTC), time.monotonic()
        farm.run("submit", farm.prompts("urgent", 16), "--dataset", "urgent", "--priority", "9", *SIZE)
        command_s = time.monotonic() - clock
        _wait(lambda: farm.succeeded("urgent") == 16)
        first, last = farm.query(
            "SELECT min(started_at), max(finished_at) FROM jobs j JOIN datasets d ON d.id = j.dataset_id "
            "WHERE d.name = 'urgent'"
        )
        farm.run("pause", "low")
        paused = datetime.now(UTC)
        time.sleep(4)
        claimed = farm.query(
            "SELECT count(*) FROM jobs j JOIN datasets d ON d.id = j.dataset_id "
            "WHERE d.name = 'low' AND j.started_at > :t",
            t=farm.moment(paused),
        )[0]
    finally:
        farm.stop_worker()
    return {
        "images_per_s": round(rate, 1),
        "queued_when_submitted": queued,
        "urgent_submit_command_s": round(command_s, 2),
        "urgent_first_claim_s": round((_aware(first) - submitted).total_seconds(), 2),
        "urgent_all_done_s": round((_aware(last) - submitted).total_seconds(), 2),
        "claims_after_pause_returned": int(claimed),
    }


def throughput(farm: Farm) -> dict[str, Any]:
    """One worker on 1,500 jobs: images/s from the 200th to the 1,200th (after its start-up and warm-up)."""
    farm.run("submit", farm.prompts("t", 1500), "--dataset", "t", *SIZE)
    farm.start_worker()
    try:
        _wait(lambda: farm.succeeded("t") >= 200)
        started, before = time.monotonic(), farm.succeeded("t")
        _wait(lambda: farm.succeeded("t") >= 1200)
        rate = (farm.succeeded("t") - before) / (time.monotonic() - started)
    finally:
        farm.stop_worker()
    return {"images_per_s": round(rate, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["priority", "throughput"])
    parser.add_argument("home", type=Path)
    parser.add_argument("--code", type=Path, default=Path(__file__).resolve().parents[1])
    args = parser.parse_args()
    farm = Farm(args.home.resolve(), args.code.resolve())
    figures = priority(farm) if args.what == "priority" else throughput(farm)
    print(json.dumps({**figures, "load": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()

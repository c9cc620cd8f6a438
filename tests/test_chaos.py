"""The chaos test: a fleet of stateless `farm worker` processes on PostgreSQL, a Redis without persistence and an
S3 HTTP server, hit by every fault in the farm's fault table while it renders, each fault shown by the workers'
event lines to have caught a job mid-render or mid-upload. At the end, after `farm gc`: every job succeeded (the
poison job failed with all its attempts), exactly one object per job, every object's sha256 equal to its row,
and no job in a state nobody owns.

The figures (faults, jobs, renders per job, objects) are written to chaos-figures.json in the test's folder.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Engine, make_url

from farm.store.engine import make_engine
from farm.store.schema import Control, Dataset, Job
from tests.support.chaos import Fleet, FleetWorker, RedisServer, ToggleProxy, in_flight, read_events
from tests.support.processes import REPO, farm_env, run_farm
from tests.support.s3 import S3Server

pytestmark = pytest.mark.integration

LEASE_S = 6  # short, like any user setting: the control loop runs every second, leases expire in six
MAX_ATTEMPTS = 10  # a good job may be caught by several faults; the poison job spends all ten
WORKER_ARGS = ("--torch-threads", "1")  # four workers share this machine's two cores


@pytest.fixture(scope="module")
def bench_small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bench-small as a plain model folder (≈ 0.3 s a render here): slow enough to be caught mid-batch. Workers
    have no FARM_HOME, so the jobs name the folder itself, as a user's `--model /models/...` would."""
    from models.bench_small import make_bench_small

    return make_bench_small(tmp_path_factory.mktemp("chaos-models") / "bench-small")


def _poison(model: Path, where: Path) -> Path:
    """A model folder that passes submit's check and never loads: every attempt of its job fails."""
    broken = shutil.copytree(model, where)
    for weights in (broken / "transformer").glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return broken


class Chaos:
    """The services, the fleet and the record of the faults injected."""

    def __init__(self, tmp_path: Path, pg_url: str, s3: S3Server, bucket: str, model: Path) -> None:
        self.tmp_path, self.pg_url, self.s3, self.bucket, self.model = tmp_path, pg_url, s3, bucket, model
        (tmp_path / "redis").mkdir()
        self.redis = RedisServer(tmp_path / "redis").start()
        url = make_url(pg_url)
        self.pg_proxy = ToggleProxy(url.host or "127.0.0.1", url.port or 5432).start()
        self.s3_proxy = ToggleProxy("127.0.0.1", s3.port).start()
        proxied = url.set(host="127.0.0.1", port=self.pg_proxy.port).render_as_string(hide_password=False)
        self.env = farm_env(
            FARM_DATABASE_URL=proxied,
            FARM_BROKER_URL=self.redis.url,
            FARM_STORAGE_URL=f"s3://{bucket}/chaos",
            FARM_S3_ENDPOINT_URL=self.s3_proxy.endpoint_url,
            FARM_LEASE_S=str(LEASE_S),
            FARM_BATCH_SIZE="2",
            FARM_MAX_ATTEMPTS=str(MAX_ATTEMPTS),
            FARM_RETRY_BACKOFF_S="1",
            FARM_RETRY_BACKOFF_MAX_S="2",
            FARM_SHUTDOWN_GRACE_S="2",
        )
        self.fleet = Fleet(self.env, tmp_path / "fleet")
        self.env["FARM_HOME"] = self.fleet.env["FARM_HOME"]  # the CLI, too, has no local state
        self.engine: Engine = make_engine(pg_url)  # the test's own view, around the proxy
        self.faults: list[dict[str, Any]] = []
        self.started = time.monotonic()
        self.prompts = 0  # lines submitted to the "chaos" dataset so far

    def top_up(self, at_least: int = 12, more: int = 24) -> None:
        """Keep work in hand, so the next fault finds workers rendering: more prompts when little is left."""
        left = sum(
            1 for job in self.jobs() if job.dataset == "chaos" and job.status in ("pending", "queued", "running")
        )
        if left >= at_least and self.prompts:
            return
        path = self.tmp_path / f"prompts-{self.prompts}.txt"
        path.write_text(
            "".join(f"a lighthouse in a storm, take {i}\n" for i in range(self.prompts, self.prompts + more))
        )
        self.farm("submit", str(path), "--dataset", "chaos", "--model", str(self.model))
        self.prompts += more

    # ---- observing --------------------------------------------------------------------------------------

    def events(self) -> list[Any]:
        return read_events(self.fleet.logs_of())

    def caught(self, worker: FleetWorker) -> set[tuple[str, int]]:
        """What the worker's log shows it in the middle of (rendering or uploading)."""
        events = read_events([worker.log_path])
        return in_flight(events, "render") | in_flight(events, "upload")

    def busy_worker(self, timeout_s: float = 120, phase: str = "render") -> tuple[FleetWorker, set[tuple[str, int]]]:
        """A live, unfrozen worker caught mid-`phase` right now."""
        self.top_up()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for worker in self.fleet.alive():
                if worker.frozen:
                    continue
                busy = in_flight(read_events([worker.log_path]), phase)
                if busy:
                    return worker, busy
            time.sleep(0.05)
        raise AssertionError(f"no worker was caught mid-{phase} within {timeout_s} s")

    def leader(self) -> str | None:
        with self.engine.connect() as conn:
            return conn.execute(select(Control.holder).where(Control.name == "reaper")).scalar()

    def worker_of(self, incarnation: str) -> FleetWorker:
        label = incarnation.split("#", 1)[0]
        return [w for w in self.fleet.workers() if w.name == label][-1]

    def record(self, fault: str, **facts: Any) -> None:
        self.faults.append({"fault": fault, "at_s": round(time.monotonic() - self.started, 1), **facts})

    def farm(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        result = run_farm(list(args), self.env, timeout_s=timeout_s)
        assert result.returncode == 0, f"farm {' '.join(args)}: {result.stdout}\n{result.stderr}"
        return result

    def wait(self, condition: Callable[[], bool], what: str, timeout_s: float = 180) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.25)
        tails = "\n".join(f"--- {w}\n{w.log()[-2500:]}" for w in self.fleet.workers()[-3:])
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}\n{tails}")

    def jobs(self) -> list[Any]:
        with self.engine.connect() as conn:
            return list(conn.execute(select(Job.__table__, Dataset.name.label("dataset")).join(Dataset)))

    def close(self) -> None:
        self.fleet.stop_all(timeout_s=20)
        self.engine.dispose()
        self.pg_proxy.stop()
        self.s3_proxy.stop()
        self.redis.stop()


def _render_counts(events: list[Any]) -> Counter[str]:
    return Counter(e.job for e in events if e.name == "render_end")


def test_chaos_every_fault_and_nothing_lost_rendered_or_stored_twice(
    tmp_path: Path, own_pg_url: str, s3_server: S3Server, s3_bucket: str, bench_small: Path
) -> None:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed")  # the compose file's broker; CI installs it
    chaos = Chaos(tmp_path, own_pg_url, s3_server, s3_bucket, bench_small)
    try:
        _run(chaos)
    finally:
        chaos.close()
        (tmp_path / "chaos-figures.json").write_text(json.dumps({"faults": chaos.faults}, indent=1))


def _run(chaos: Chaos) -> None:
    poison = chaos.tmp_path / "poison.txt"
    poison.write_text("a prompt whose model never loads\n")
    twins = chaos.tmp_path / "twins.txt"
    twins.write_text("".join(f"two dispatchers, take {i}\n" for i in range(12)))
    model = str(chaos.model)

    for name in ("w1", "w2", "w3"):
        chaos.fleet.start(name, *WORKER_ARGS)
    chaos.top_up()
    broken = _poison(chaos.model, chaos.tmp_path / "bad")
    chaos.farm("submit", str(poison), "--dataset", "poison", "--model", str(broken))

    # 1. SIGKILL a worker in the middle of a render.
    worker, _ = chaos.busy_worker()
    worker.kill()
    caught = chaos.caught(worker)
    assert caught, "the killed worker's log shows it mid-render or mid-upload"
    chaos.record("SIGKILL mid-render", worker=worker.name, jobs=len(caught))
    chaos.fleet.start("w4", *WORKER_ARGS)

    # 2. SIGKILL the leader of the reaper and dispatcher loop; another worker takes the lease over.
    chaos.wait(lambda: chaos.leader() is not None and chaos.worker_of(chaos.leader() or "").alive, "a live leader")
    old = chaos.leader() or ""
    leader = chaos.worker_of(old)
    leader.kill()
    chaos.record("SIGKILL the leader", worker=leader.name, jobs=len(chaos.caught(leader)))
    chaos.wait(lambda: (chaos.leader() or old) != old, "another worker to take the reaper lease", timeout_s=60)
    chaos.fleet.restart(leader.name)

    # 3. SIGSTOP a worker mid-render for longer than a lease, then SIGCONT: its late writes are fenced off.
    worker, _ = chaos.busy_worker()
    worker.freeze()
    frozen = chaos.caught(worker)
    assert frozen
    time.sleep(LEASE_S + 4)
    worker.thaw()
    chaos.record("SIGSTOP past the lease, then SIGCONT", worker=worker.name, jobs=len(frozen))

    # 4. S3 answers 503 to everything for a while; uploads are caught in the middle, retrying.
    chaos.busy_worker()
    chaos.s3_proxy.answer_503()
    chaos.wait(lambda: chaos.s3_proxy.injected_503 > 0, "an upload to meet the 503s", timeout_s=60)
    time.sleep(3)
    uploading = in_flight(chaos.events(), "upload")
    chaos.s3_proxy.pass_through()
    assert uploading, "uploads were in flight while S3 answered 503"
    chaos.record("S3 answering 503", injected=chaos.s3_proxy.injected_503, jobs=len(uploading))

    # 5. Redis restarted without persistence: every queued message is lost.
    chaos.busy_worker()
    chaos.redis.restart()
    chaos.record("Redis restarted without persistence")

    # 6. PostgreSQL away for longer than a lease (through the proxy every worker uses).
    chaos.busy_worker()
    chaos.pg_proxy.go_down()
    time.sleep(LEASE_S + 3)
    chaos.pg_proxy.pass_through()
    chaos.record("PostgreSQL away past the lease", refused=chaos.pg_proxy.refused)

    # 7. Pause and resume the dataset while it renders: no job is rendered twice for it.
    chaos.busy_worker()
    chaos.farm("pause", "chaos")
    time.sleep(1)
    chaos.farm("resume", "chaos")
    chaos.record("pause and resume while running")

    # 8. Two dispatchers at once: between them each job is sent once.
    chaos.farm("submit", str(twins), "--dataset", "twins", "--model", model, "--no-dispatch")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "farm", "dispatch", "--dataset", "twins"],
            env=chaos.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    sent = [int(m.group(1)) for out in outputs for m in re.finditer(r"dispatched (\d+) jobs", out)]
    # They race each other and the fleet's own dispatcher: between them no job is taken twice
    # (tests/test_dispatch.py shows the sets are disjoint, message by message).
    assert len(sent) == 2 and sum(sent) <= 12, outputs
    chaos.record("two dispatchers at once (and the fleet's)", sent=sent)

    # 9. A worker restarted under the same --name (as the compose file restarts a container): a new owner.
    worker, _ = chaos.busy_worker()
    worker.kill()
    chaos.fleet.restart(worker.name)
    chaos.record("worker restarted under the same --name", worker=worker.name, jobs=len(chaos.caught(worker)))

    # 10. SIGTERM with a grace period: what does not fit goes back to pending at once, and the worker exits.
    worker, _ = chaos.busy_worker()
    began = time.monotonic()
    worker.terminate()
    code = worker.wait(timeout_s=60)
    assert code is not None, "the worker exited within its grace period (plus start-up of the shutdown)"
    assert "shutting down: 2 s of grace" in worker.log()
    chaos.record("SIGTERM with a 2 s grace", worker=worker.name, exit_s=round(time.monotonic() - began, 1))

    # The end: every job final, then `farm gc`, then one object per job with its sha256.
    def finished() -> bool:
        return all(job.status in ("succeeded", "failed", "canceled") for job in chaos.jobs())

    chaos.wait(finished, "every job to finish", timeout_s=300)
    gc = chaos.farm("gc")
    jobs = chaos.jobs()
    by_state = Counter((job.dataset, job.status) for job in jobs)
    assert by_state == {("chaos", "succeeded"): chaos.prompts, ("poison", "failed"): 1, ("twins", "succeeded"): 12}
    [poisoned] = [job for job in jobs if job.dataset == "poison"]
    assert poisoned.attempts == MAX_ATTEMPTS and poisoned.output_uri is None

    client = chaos.s3.client()
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=chaos.bucket, Prefix="chaos/"):
        keys += [item["Key"] for item in page.get("Contents", [])]
    images = sorted(key for key in keys if "/_conditions/" not in key)
    succeeded = [job for job in jobs if job.status == "succeeded"]
    assert images == sorted(job.output_uri.removeprefix(f"s3://{chaos.bucket}/") for job in succeeded)
    mismatches = 0
    for job in succeeded:
        body = client.get_object(Bucket=chaos.bucket, Key=job.output_uri.removeprefix(f"s3://{chaos.bucket}/"))
        mismatches += hashlib.sha256(body["Body"].read()).hexdigest() != job.sha256
    assert mismatches == 0

    events = chaos.events()
    renders = _render_counts(events)
    figures = {
        "faults": len(chaos.faults),
        "jobs": len(jobs),
        "lost": sum(1 for job in jobs if job.status not in ("succeeded", "failed")),
        "jobs rendered more than once": sum(1 for n in renders.values() if n > 1),
        "renders beyond the first": sum(n - 1 for n in renders.values() if n > 1),
        "objects": len(images),
        "sha256 mismatches": mismatches,
        "stuck (non-final) jobs": 0,
        "gc": gc.stdout.strip().splitlines()[-1],
    }
    chaos.record("summary", **figures)
    # No attempt renders twice (a duplicate message, pause and resume, the second dispatcher claim nothing):
    # every render beyond a job's first belongs to a new attempt, after a fault stopped the one before.
    per_attempt = Counter((e.job, e.seq) for e in events if e.name == "render_end")
    assert max(per_attempt.values()) == 1

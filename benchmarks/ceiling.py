"""`farm bench ceiling`: the control plane's own ceiling, measured with the null renderer (models/null.py).

(a) worker: one real `farm worker --renderer null` process on the configured store, broker and storage. N jobs
    are recorded as `farm submit` records them and sent at once (past the dispatch window: see _submit), and the
    clock runs until the last one is succeeded: images/s, and the worker's CPU per image (the process and each
    thread, from /proc) beside the null render's own time. `--profile` samples the worker with py-spy (when
    installed) and splits each thread's CPU by what it was doing.
(b) uploads: the worker's upload pool alone (workers/uploads.py: PNG encoding and storing, nothing recorded),
    fed ready images of one size as fast as it takes them, then at a given rate: can it keep up?
(c) fleet: a load generator whose processes replay the workers' own claim, record and heartbeat calls
    (farm.store.transitions.claim, workers.recording.record_batch, workers.heartbeat.LeaseKeeper.renew) against
    one PostgreSQL with jobs already queued; no render, no storage, no broker. Images/s, and the PostgreSQL
    server's CPU per image from /proc (PostgreSQL must run on this machine): the generator's own backends, the
    server's background processes, and whatever other clients did meanwhile, each apart. `statements`: the same
    transactions one kind at a time on one connection, with and without the job_counts triggers, and a set-based
    record for comparison (a what-if, not the workers' statement).

Machine-wide CPU is read from /proc, so this runs on Linux.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import linecache
import multiprocessing
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text

from farm.dispatch.broker import make_celery
from farm.secrets import redact
from farm.settings import Settings
from farm.store import transitions
from farm.store.engine import make_engine, open_store
from farm.store.schema import Job, JobStatus
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.record import record

Progress = Callable[[str], None]
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
# An H200 renders PixArt-δ 1024 px at about 11.6 images/s: the rate the farm must keep up with per worker.
GPU_IMAGES_PER_S = 11.6


# ---- CPU from /proc ------------------------------------------------------------------------------------------


def cpu_s(pid: int, stat_path: str | None = None) -> float | None:
    """utime + stime of a process (all its threads), in seconds; None when it is gone."""
    try:
        stat = Path(stat_path or f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of a process: native thread id → utime + stime."""
    found: dict[int, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        used = cpu_s(int(task.name), str(task / "stat"))
        if used is not None:
            found[int(task.name)] = used
    return found


def postgres_processes() -> dict[int, tuple[str, float]]:
    """Every postgres process on this machine: pid → (its title, CPU seconds so far)."""
    found: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        used = cpu_s(int(entry.name))
        if used is not None:
            found[int(entry.name)] = (title, used)
    return found


_BACKGROUND = ("checkpointer", "background writer", "walwriter", "autovacuum", "logical replication", "archiver")


def postgres_cpu_delta(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], own: set[int]
) -> dict[str, float]:
    """CPU seconds the server spent between two snapshots: in `own` backends, in its background processes
    (the postmaster, WAL writer, checkpointer, autovacuum…) and in other clients' backends (those that came and went
    between the snapshots are not seen)."""
    split = {"own_backends_s": 0.0, "background_s": 0.0, "other_clients_s": 0.0}
    for pid, (title, used) in after.items():
        spent = used - before.get(pid, (title, 0.0))[1]
        if pid in own:
            split["own_backends_s"] += spent
        elif " -D " in f" {title} " or any(name in title for name in _BACKGROUND):
            split["background_s"] += spent
        else:
            split["other_clients_s"] += spent
    return {key: round(value, 3) for key, value in split.items()}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- (a) one worker ------------------------------------------------------------------------------------------


def bench_worker(
    settings: Settings,
    *,
    size: int,
    jobs: int,
    batch: int = 8,
    io_threads: int = 2,
    loglevel: str = "INFO",
    profile: bool = False,
    workdir: Path,
    progress: Progress = print,
    farm_command: tuple[str, ...] = (sys.executable, "-m", "farm"),
) -> dict[str, Any]:
    """One `farm worker --renderer null` process: submit `jobs` jobs of size×size, time until all succeeded.

    `farm_command`: how to run `farm` (another checkout's, or a patched one, to compare before and after)."""
    from benchmarks.render import _worker_env

    tag = uuid.uuid4().hex[:8]
    settings = dataclasses.replace(settings, queue=f"ceiling-{tag}", batch_size=batch)
    engine = open_store(settings)
    app = make_celery(settings)
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"worker-{size}-{tag}.log"
    command = [*farm_command, "worker", "--renderer", "null", "--loglevel", loglevel]
    command += ["--max-batch", str(batch), "--io-threads", str(io_threads)]
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, env=_worker_env(settings), stdout=log, stderr=subprocess.STDOUT)
    spy: subprocess.Popen[bytes] | None = None
    try:
        progress(f"(a) worker {size}px: warming up ({2 * batch} jobs)")
        warm = _submit(engine, app, settings, f"ceiling-warmup-{tag}", size, 2 * batch)
        _wait(engine, warm, proc, timeout_s=300)
        profile_path = workdir / f"worker-{size}-{tag}.pyspy.txt"
        if profile:
            spy = _start_py_spy(proc.pid, profile_path)
        progress(f"(a) worker {size}px: {jobs} jobs, submit → every one succeeded")
        load_before = load_average()
        worker_before, pg_before, me_before = cpu_s(proc.pid) or 0.0, postgres_processes(), time.process_time()
        threads_before = thread_cpu(proc.pid)
        started = time.perf_counter()
        dataset_id = _submit(engine, app, settings, f"ceiling-{size}-{tag}", size, jobs)
        submitted = time.perf_counter() - started
        _wait(engine, dataset_id, proc, timeout_s=3600)
        seconds = time.perf_counter() - started
        worker_cpu = (cpu_s(proc.pid) or 0.0) - worker_before
        threads = {tid: used - threads_before.get(tid, 0.0) for tid, used in thread_cpu(proc.pid).items()}
        pg = postgres_cpu_delta(pg_before, postgres_processes(), set())
        me_cpu = time.process_time() - me_before
        load_after = load_average()
        breakdown = _stop_py_spy(spy, profile_path) if spy is not None else None
        spy = None
    finally:
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        proc.terminate()
        proc.wait(timeout=120)
    with engine.connect() as conn:
        row = conn.execute(
            select(func.count(), func.avg(Job.render_ms), func.avg(Job.bytes)).where(
                Job.dataset_id == dataset_id, Job.status == JobStatus.SUCCEEDED.value
            )
        ).one()
    _clean_up(engine, app, settings, [f"ceiling-warmup-{tag}", f"ceiling-{size}-{tag}"])
    render_ms = float(row[1] or 0.0)
    result = {
        "size": size,
        "jobs": jobs,
        "succeeded": int(row[0]),
        "batch": batch,
        "io_threads": io_threads,
        "loglevel": loglevel,
        "seconds": round(seconds, 3),
        "submit_s": round(submitted, 3),
        "images_per_s": round(jobs / seconds, 2),
        "wall_ms_per_image": round(seconds / jobs * 1000, 2),
        "null_render_ms_per_image": round(render_ms, 2),
        "worker_cpu_ms_per_image": round(worker_cpu / jobs * 1000, 2),
        # Every postgres process on the machine: the worker's SQL, its control loop, this process's polling, and
        # whoever else uses the server meanwhile (part (c) measures the workers' statements alone).
        "postgres_all_cpu_ms_per_image": round(sum(pg.values()) / jobs * 1000, 3),
        "bench_process_cpu_ms_per_image": round(me_cpu / jobs * 1000, 2),
        "png_bytes_mean": round(float(row[2] or 0)),
        "load_average_before": load_before,
        "load_average_after": load_after,
        "worker_log": str(log_path),
    }
    names = breakdown["thread_names"] if breakdown is not None else {}
    names.setdefault(proc.pid, "MainThread")
    result["thread_cpu_ms_per_image"] = {
        names.get(tid, f"thread {tid}"): round(used / jobs * 1000, 2)
        for tid, used in sorted(threads.items(), key=lambda item: -item[1])
        if used > 0
    }
    if breakdown is not None:
        # Each thread's measured CPU, split by what the profile saw it doing: per image, per step.
        by_step: dict[str, float] = {}
        for tid, used in threads.items():
            steps = breakdown["by_thread_step"].get(tid)
            if not steps:
                by_step[f"unsampled thread {tid}"] = used
                continue
            busy = {step: n for step, n in steps.items() if step != WAITING}
            seen = sum(busy.values()) or 1
            for step, n in busy.items():
                by_step[step] = by_step.get(step, 0.0) + used * n / seen
        result["farm_cpu_ms_per_image_by_step"] = {
            step: round(used / jobs * 1000, 3)
            for step, used in sorted(by_step.items(), key=lambda item: -item[1])
            if used > 0
        }
        main = {k: n for k, n in breakdown["by_thread_step"].get(proc.pid, {}).items() if k != WAITING}
        seen = sum(main.values()) or 1
        result["main_thread_cpu_ms_per_image_by_step"] = {
            step: round(threads.get(proc.pid, 0.0) * n / seen / jobs * 1000, 3)
            for step, n in sorted(main.items(), key=lambda item: -item[1])
        }
        result["profile"] = {key: value for key, value in breakdown.items() if key != "by_thread_step"}
    progress(
        f"(a) worker {size}px: {result['images_per_s']} images/s, worker CPU {result['worker_cpu_ms_per_image']} ms "
        f"per image (null render {result['null_render_ms_per_image']} ms), load {load_before} → {load_after}"
    )
    return result


def _clean_up(engine: Any, app: Any, settings: Settings, datasets: list[str]) -> None:
    """The benchmark's datasets, their images (in a local folder) and its broker queue go."""
    from urllib.parse import unquote, urlsplit

    from benchmarks.submit import _purge_queue

    for name in datasets:
        _drop(engine, name)
        if settings.storage_url.startswith("file:"):
            shutil.rmtree(Path(unquote(urlsplit(settings.storage_url).path)) / name, ignore_errors=True)
    _purge_queue(app, settings.queue)
    app.close()
    engine.dispose()


def _submit(engine: Any, app: Any, settings: Settings, name: str, size: int, jobs: int) -> int:
    """Record `jobs` distinct jobs of size×size as `farm submit` does, and send every one at once.

    All of them, in tasks of FARM_BATCH_SIZE, as dispatch sends them (queued, then id-only messages), but not
    through the dispatch window: that window is sized from the workers' heartbeat rates, which a worker first
    reports a heartbeat period (FARM_LEASE_S / 3) after it starts, and until then it holds two tasks per worker,
    topped up every second by the leader; that would measure the leader's tick, not the worker."""
    from farm.dispatch.broker import RENDER_TASK

    path = settings.home / "bench" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"ceiling {name} image {i}: a lighthouse at dusk, watercolor\n" for i in range(jobs)))
    plan = plan_submission(path, SubmitOptions(dataset=name, model="tiny", width=size, height=size))
    recorded = record(engine, plan)
    path.unlink()
    with engine.begin() as conn:
        ids = list(
            conn.execute(select(Job.id).where(Job.dataset_id == recorded.dataset_id).order_by(Job.source_line))
            .scalars()
            .all()
        )
        ids = transitions.mark_queued(conn, ids, queue=settings.queue)
    for start in range(0, len(ids), settings.batch_size):
        app.send_task(RENDER_TASK, args=[ids[start : start + settings.batch_size]], queue=settings.queue)
    return recorded.dataset_id


def _wait(engine: Any, dataset_id: int, proc: subprocess.Popen[bytes], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            left = conn.execute(
                select(Job.id).where(Job.dataset_id == dataset_id, Job.status != JobStatus.SUCCEEDED.value).limit(1)
            ).first()
        if left is None:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the null worker exited early ({proc.returncode}); see its log")
        time.sleep(0.05)
    raise TimeoutError(f"dataset {dataset_id} did not finish in {timeout_s} s")


# ---- profiling the worker with py-spy -----------------------------------------------------------------------------

WAITING = "waiting (locks, back-pressure, PostgreSQL replies, fsync)"
# Where a sample's time goes: the first step whose marker is in its stack, in this order (so logging inside
# recording counts as logging, and SQL inside recording as recording).
_STEPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # Not CPU: a thread blocked on a lock, the back-pressure semaphore, a PostgreSQL reply or fsync. py-spy may
    # still count such samples as active (a runnable thread on a busy machine), so they are set apart.
    (WAITING, ("Condition.wait (", "Event.wait (", "Semaphore.acquire (", "Thread.join (", "Connection.wait (psycopg")),
    ("logging (event lines, scrubbing)", ("(logging/__init__.py", "farm/secrets.py")),
    ("null render", ("models/null.py",)),
    ("PNG encode", ("encode_png (",)),
    ("store: write, fsync, read back, sha256", ("farm/storage/",)),
    ("record: mark succeeded (SQL)", ("record_batch (",)),
    ("claim (SQL)", ("claim (", "dataset_name (")),
    ("heartbeat (SQL)", ("workers/heartbeat.py",)),
    ("control loop: reaper, dispatcher (SQL, broker)", ("workers/control.py",)),
    ("render task, batching, upload hand-off", ("workers/tasks.py", "workers/uploads.py")),
    ("Celery and kombu: messages, acks", ("celery/", "kombu/")),
)


def _step(stack: str) -> str:
    leaf = stack.rsplit(";", 1)[-1]
    if any(mark in leaf for mark in _STEPS[0][1]) or "fsync(" in _source_line(leaf):
        return WAITING
    return next((step for step, marks in _STEPS[1:] if any(m in stack for m in marks)), "other")


@functools.cache
def _source_line(frame: str) -> str:
    """The source line a py-spy frame `function (path:line)` stands on, when the file is ours ("" otherwise)."""
    match = re.search(r"\(([^()]+\.py):(\d+)\)$", frame)
    if match is None:
        return ""
    path = Path(__file__).resolve().parents[1] / match.group(1)
    return linecache.getline(str(path), int(match.group(2))) if path.is_file() else ""


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes] | None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).is_file():
        return None
    command = [spy, "record", "--pid", str(pid), "--threads", "--nonblocking", "--rate", "250"]
    command += ["--format", "raw", "--output", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # attached before the clock starts
    return proc


def _stop_py_spy(spy: subprocess.Popen[bytes] | None, out: Path) -> dict[str, Any] | None:
    if spy is None:
        return None
    spy.send_signal(signal.SIGINT)
    spy.wait(timeout=120)
    return summarize_profile(out) if out.is_file() else None


def summarize_profile(path: Path) -> dict[str, Any]:
    """Active samples (py-spy leaves out idle threads) per step and per thread, from a raw (collapsed) profile."""
    by_step: Counter[str] = Counter()
    by_thread_step: dict[int, Counter[str]] = {}
    names: dict[int, str] = {}
    leaves: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        match = re.match(r"thread \((\d+)\)(?:: ([^;]*))?;", stack)
        if not count.isdigit() or match is None:
            continue
        n, tid = int(count), int(match.group(1))
        names[tid] = match.group(2) or f"thread {tid}"
        step = _step(stack)
        by_step[step] += n
        by_thread_step.setdefault(tid, Counter())[step] += n
        leaf = stack.rsplit(";", 1)[-1]
        leaves[leaf] += n
    return {
        "samples": sum(by_step.values()),
        "by_step": dict(by_step.most_common()),
        "by_thread_step": {tid: dict(steps) for tid, steps in by_thread_step.items()},
        "thread_names": names,
        "top_leaves": dict(leaves.most_common(15)),
    }


# ---- (b) the upload pool ---------------------------------------------------------------------------------------


def bench_uploads(
    *,
    size: int = 1024,
    images: int = 64,
    io_threads: int = 2,
    rate: float = GPU_IMAGES_PER_S,
    workdir: Path,
    progress: Progress = print,
) -> dict[str, Any]:
    """The upload pool alone, on a local folder: its top speed at `size`, then whether it keeps up with `rate`."""
    from farm.job import Claimed
    from farm.storage.local import LocalStorage
    from models.null import null_image, render_recipe
    from models.pipeline import RenderRequest
    from models.recipe import recipe_json
    from workers.png import encode_png
    from workers.uploads import Rendered, Uploader

    store = LocalStorage(workdir / f"uploads-{uuid.uuid4().hex[:8]}")
    # Distinct images made before any clock starts (the render is not what is measured here).
    pictures = [null_image(f"upload {i}", i, size, size) for i in range(8)]
    request = RenderRequest(prompt="upload", seed=0, width=size, height=size)
    recipe = recipe_json(render_recipe(None, request))

    def job(i: int) -> Claimed:
        return Claimed(
            prompt=f"upload {i}", seed=i, width=size, height=size, num_inference_steps=4, guidance_scale=0.0,
            model="tiny", source_line=i, id=hashlib.sha256(f"upload {i}".encode()).hexdigest()[:32],
            dataset_id=1, attempts=1, claim_seq=1,
        )  # fmt: skip

    # Each step alone, on this thread: CPU per image.
    steps: dict[str, float] = {}
    started = time.thread_time()
    encoded = [encode_png(pictures[i % 8], job(i), recipe) for i in range(8)]
    steps["encode_png_ms"] = (time.thread_time() - started) / 8 * 1000
    started = time.thread_time()
    for i, data in enumerate(encoded):
        store.put(f"steps/{i}.png", data)
    steps["store_put_ms"] = (time.thread_time() - started) / 8 * 1000
    started = time.thread_time()
    for data in encoded:
        hashlib.sha256(data).hexdigest()
    steps["sha256_ms"] = (time.thread_time() - started) / 8 * 1000
    # The same images with zlib's default strategy (the worker's setting before issue 13), for comparison.
    started = time.thread_time()
    sizes = []
    for picture in pictures:
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", optimize=False, compress_level=6)
        sizes.append(len(buffer.getvalue()))
    steps["png_default_strategy_ms"] = (time.thread_time() - started) / 8 * 1000

    def run(paced: float | None) -> dict[str, Any]:
        uploader = Uploader(store, threads=io_threads, max_in_flight=16)
        lags: list[float] = []
        handed: dict[str, float] = {}
        lock = threading.Lock()

        def done(ok: list[Any], failed: list[Any]) -> None:
            assert not failed, failed
            with lock:
                lags.extend(time.perf_counter() - handed[item[0].id] for item in ok)

        cpu_before, wall_before = time.process_time(), time.perf_counter()
        for i in range(images):
            if paced:
                time.sleep(max(0.0, wall_before + i / paced - time.perf_counter()))
            item = Rendered(job(i), "ceiling", pictures[i % 8], 0, recipe)
            handed[item.job.id] = time.perf_counter()
            uploader.submit([item], done)
        uploader.drain()
        seconds = time.perf_counter() - wall_before
        cpu = time.process_time() - cpu_before
        uploader.close()
        lags.sort()
        return {
            "images_per_s": round(images / seconds, 2),
            "cpu_ms_per_image": round(cpu / images * 1000, 1),
            "lag_p50_s": round(lags[len(lags) // 2], 3),
            "lag_max_s": round(lags[-1], 3),
            "peak_images_held": uploader.peak_images_held,
        }

    progress(f"(b) upload pool {size}px, {io_threads} threads: top speed over {images} images")
    load_before = load_average()
    top = run(None)
    progress(f"(b) upload pool: {top['images_per_s']} images/s at most; now paced at {rate} images/s")
    paced = run(rate)
    shutil.rmtree(store.root, ignore_errors=True)
    result = {
        "size": size,
        "images": images,
        "io_threads": io_threads,
        "png_bytes": len(encoded[0]),
        "png_of_raw": round(len(encoded[0]) / (size * size * 3), 3),
        "png_default_strategy_bytes": sizes[0],
        "one_thread": {key: round(value, 2) for key, value in steps.items()},
        "top_speed": top,
        "paced": {"rate": rate, **paced},
        # Measured here, on a machine others may share: the pool's threads run at nice +10.
        "keeps_up_here": top["images_per_s"] >= rate and paced["lag_max_s"] < 16 / rate,
        # What its CPU per image allows when each of its threads has a core of this machine's speed to itself.
        "images_per_s_with_a_core_per_thread": round(io_threads * 1000 / top["cpu_ms_per_image"], 1),
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    progress(f"(b) upload pool: paced lag p50 {paced['lag_p50_s']} s, max {paced['lag_max_s']} s")
    return result


# ---- (c) the fleet's statements against one PostgreSQL --------------------------------------------------------------


@dataclasses.dataclass
class _Runtime:
    """What workers.recording.record_batch reads of a WorkerRuntime, and nothing more."""

    settings: Settings
    engine: Any
    name: str
    holdings: Any
    stats: Any
    unrecorded: Any
    storage: Any = None
    app: Any = None

    def event(self, name: str, job_id: str, seq: int) -> None:
        """The worker logs a line here (at INFO); the generator, like a worker at WARNING, does not."""


class _Replay:
    """One worker incarnation's database work, through the workers' own functions: the claim transaction of
    workers.tasks.render_jobs, workers.recording.record_batch, and workers.heartbeat.LeaseKeeper.renew."""

    RECIPE = json.dumps({"note": "ceiling", "renderer": "null", "sampler": "null", "scheduler": "null"})

    def __init__(self, settings: Settings, name: str, engine: Any = None) -> None:
        from farm.store import fleet
        from farm.store.schema import utcnow
        from workers.heartbeat import LeaseKeeper
        from workers.recording import Unrecorded
        from workers.runtime import Holdings, WorkerStats

        try:  # what the upload pool hands record_batch: (job, object, render ms, recipe[, scores])
            from workers.uploads import StoredResult

            self.width = len(typing.get_args(StoredResult))
        except ImportError:
            self.width = 4
        self.settings, self.name = settings, name
        self.engine = engine if engine is not None else make_engine(settings.database_url)
        with self.engine.connect() as conn:
            self.backend = int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())
        self.holdings = Holdings()
        self.rt = _Runtime(settings, self.engine, name, self.holdings, WorkerStats(), Unrecorded())
        self.names: dict[int, str] = {}
        started_at = utcnow()

        def describe(current_jobs: int) -> fleet.Heartbeat:
            loaded = {"models": ["tiny"], "renderer": "null"}
            host, pid = socket.gethostname(), os.getpid()
            return fleet.Heartbeat(name, None, host, pid, "cpu", None, loaded, current_jobs, 0.0, started_at)

        self.keeper = LeaseKeeper(
            self.engine, worker=name, lease_s=settings.lease_s, holdings=self.holdings, describe=describe
        )

    def claim(self, ids: list[str]) -> list[Any]:
        """As workers.tasks.render_jobs claims: one transaction, the claim, the queue-wait metric, dataset names."""
        from farm.store.schema import Dataset
        from workers.metrics import METRICS

        settings = self.settings
        with self.engine.begin() as conn:
            claimed = transitions.claim(
                conn, ids, worker=self.name, lease_s=settings.lease_s, max_attempts=settings.max_attempts
            )
            METRICS.observe_queue_wait(conn, [job.id for job in claimed])
            for dataset_id in {job.dataset_id for job in claimed}:
                if dataset_id not in self.names:
                    query = select(Dataset.name).where(Dataset.id == dataset_id)
                    self.names[dataset_id] = conn.execute(query).scalar_one()
        self.holdings.add([job.held for job in claimed])
        return claimed

    def record(self, claimed: list[Any]) -> None:
        """The upload pool's call once a batch is stored: workers.recording.record_batch."""
        from farm.storage import StoredObject
        from workers.recording import record_batch

        extra = (None,) * (self.width - 4)
        objects = [StoredObject(f"file:///ceiling/{job.id}.png", job.id, job.id * 2, 150_000) for job in claimed]
        done = [(job, stored, 1, self.RECIPE, *extra) for job, stored in zip(claimed, objects, strict=True)]
        record_batch(self.rt, done, [])  # type: ignore[arg-type]

    def beat(self) -> None:
        self.keeper.renew()

    def close(self) -> None:
        from farm.store import fleet

        with self.engine.begin() as conn:
            fleet.mark_stopped(conn, self.name)  # `farm workers --all` lists it as stopped, not stale
        self.engine.dispose()


def _fleet_child(
    settings: Settings,
    name: str,
    tasks: list[list[str]],
    phases: list[str],
    beat_s: float,
    beats: int,
    barrier: Any,
    results: Any,
    record_jobs: int = 0,
) -> None:
    """One generator process: one worker incarnation replaying claim → record (→ heartbeat) per task; with
    `record_jobs`, the mixed phase records once that many claimed jobs are waiting (group commit,
    Settings.record_group_s), as one record_batch call."""
    replay = _Replay(settings, name)
    counts: dict[str, int] = {"beats": 0}
    claimed_all: list[list[Any]] = []
    try:
        barrier.wait()  # ready: connected
        for phase in phases:
            barrier.wait()  # start
            if phase == "mixed":
                next_beat = time.monotonic() + beat_s
                waiting: list[Any] = []
                for ids in tasks:
                    waiting.extend(replay.claim(ids))
                    if len(waiting) >= record_jobs:
                        replay.record(waiting)
                        waiting = []
                    if time.monotonic() >= next_beat:
                        replay.beat()
                        counts["beats"] += 1
                        next_beat += beat_s
                if waiting:
                    replay.record(waiting)
            elif phase == "claim":
                claimed_all = [replay.claim(ids) for ids in tasks]
            elif phase == "record":
                for claimed in claimed_all:
                    replay.record(claimed)
            elif phase == "beat":
                replay.holdings.add([(job_id, 1) for job_id in tasks[-1]])  # a worker holds a few batches
                for _ in range(beats):
                    replay.beat()
                counts["beats"] = beats
            barrier.wait()  # end
        results.put({"name": name, "backend": replay.backend, "succeeded": replay.rt.stats.succeeded, **counts})
        barrier.wait()  # measured: now the backends may go
    finally:
        replay.close()


def _queue_jobs(engine: Any, settings: Settings, name: str, jobs: int, queue: str) -> list[str]:
    """Record `jobs` jobs in dataset `name` as submit does and mark them queued as dispatch does; their ids."""
    path = settings.home / "bench" / f"{name}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{name} job {i}\n" for i in range(jobs)))
    plan = plan_submission(path, SubmitOptions(dataset=name, model="tiny", width=256, height=256))
    recorded = record(engine, plan)
    path.unlink()
    with engine.begin() as conn:
        query = select(Job.id).where(Job.dataset_id == recorded.dataset_id).order_by(Job.source_line)
        ids = list(conn.execute(query).scalars().all())
        transitions.mark_queued(conn, ids, queue=queue)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
    return ids


def bench_fleet(
    settings: Settings,
    *,
    jobs: int = 20_000,
    processes: int = 4,
    task_jobs: int = 8,
    record_jobs: int = 0,
    beat_s: float = 1.0,
    beats: int = 500,
    phases: bool = True,
    keep: bool = False,
    progress: Progress = print,
) -> dict[str, Any]:
    """`processes` generator processes claim and record `jobs` queued jobs in tasks of `task_jobs` (recorded per
    task, or with `record_jobs` in groups of that many, as a worker with FARM_RECORD_GROUP_S does)."""
    if not settings.database_url.startswith("postgres"):
        raise ValueError("the fleet generator measures a PostgreSQL server: set FARM_DATABASE_URL to one")
    tag = uuid.uuid4().hex[:8]
    engine = open_store(settings)
    name = f"ceiling-fleet-{tag}"

    progress(f"(c) fleet: recording and queueing {jobs} jobs")
    results: dict[str, Any] = {
        "jobs": jobs,
        "processes": processes,
        "task_jobs": task_jobs,
        "record_jobs": record_jobs or task_jobs,
        "store": redact(settings.database_url),
    }
    runs = [("mixed", ["mixed"])] + ([("phases", ["claim", "record", "beat"])] if phases else [])
    for label, steps in runs:
        ids = _queue_jobs(engine, settings, f"{name}-{label}", jobs, f"ceiling-{tag}")
        tasks = [ids[i : i + task_jobs] for i in range(0, len(ids), task_jobs)]
        results[label] = _run_fleet(
            settings, tag, label, tasks, steps, processes, beat_s, beats, progress, record_jobs=record_jobs
        )
        if not keep:
            _drop(engine, f"{name}-{label}")
    engine.dispose()
    results["machine"] = machine()
    return results


def _run_fleet(
    settings: Settings,
    tag: str,
    label: str,
    tasks: list[list[str]],
    steps: list[str],
    processes: int,
    beat_s: float,
    beats: int,
    progress: Progress,
    *,
    record_jobs: int = 0,
) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(processes + 1)
    queue = ctx.Queue()
    children = [
        ctx.Process(
            target=_fleet_child,
            args=(
                settings,
                f"ceiling-{tag}-{label}-{k}#gen",
                tasks[k::processes],
                steps,
                beat_s,
                beats,
                barrier,
                queue,
                record_jobs,
            ),
        )
        for k in range(processes)
    ]
    for child in children:
        child.start()
    figures: dict[str, Any] = {}
    try:
        barrier.wait(timeout=120)  # every child connected
        own: set[int] = set()
        for step in steps:
            load_before = load_average()
            pg_before, children_before = postgres_processes(), [cpu_s(c.pid or 0) or 0.0 for c in children]
            barrier.wait(timeout=60)
            started = time.perf_counter()
            barrier.wait(timeout=3600)
            seconds = time.perf_counter() - started
            pg_after, children_after = postgres_processes(), [cpu_s(c.pid or 0) or 0.0 for c in children]
            figures[step] = {
                "seconds": seconds,
                "pg": (pg_before, pg_after),
                "client_s": sum(children_after) - sum(children_before),
                "load_average": [load_before, load_average()],
            }
        reports = [queue.get(timeout=60) for _ in children]
        own = {report["backend"] for report in reports}
        barrier.wait(timeout=60)  # the children may disconnect now
    finally:
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.terminate()
    images = sum(report["succeeded"] for report in reports)
    out: dict[str, Any] = {"images": images, "beats": sum(report.get("beats", 0) for report in reports)}
    for step, measured in figures.items():
        before, after = measured["pg"]
        pg = postgres_cpu_delta(before, after, own)
        # Per image for claim and record; the heartbeat phase per beat.
        per = out["beats"] if step == "beat" else images
        unit = "beat" if step == "beat" else "image"
        out[step] = {
            "seconds": round(measured["seconds"], 3),
            f"{unit}s_per_s": round(per / measured["seconds"], 1),
            f"pg_own_backends_cpu_ms_per_{unit}": round(pg["own_backends_s"] / per * 1000, 4),
            f"pg_background_cpu_ms_per_{unit}": round(pg["background_s"] / per * 1000, 4),
            f"pg_cpu_ms_per_{unit}": round((pg["own_backends_s"] + pg["background_s"]) / per * 1000, 4),
            "pg_other_clients_cpu_s": pg["other_clients_s"],
            f"generator_cpu_ms_per_{unit}": round(measured["client_s"] / per * 1000, 3),
            "load_average_before_after": measured["load_average"],
        }
        progress(f"(c) fleet {label} {step}: {out[step]}")
    return out


# What-if, not the workers' statement: mark_succeeded_many as ONE guarded UPDATE per batch (the workers send one
# UPDATE per image), to measure what that would save. Same guards (running, this worker, this claim_seq) and values;
# `id = ANY(...)` keeps the plan on the primary key (without it PostgreSQL scans every running job).
_SET_BASED_RECORD = text(
    """
    UPDATE jobs SET status = 'succeeded', finished_at = now(), lease_expires_at = NULL, output_uri = v.uri,
        sha256 = v.sha256, bytes = v.bytes, render_ms = v.ms, recipe = v.recipe, error = NULL
    FROM unnest(CAST(:ids AS varchar[]), CAST(:seqs AS integer[]), CAST(:uris AS varchar[]),
                CAST(:shas AS varchar[]), CAST(:sizes AS bigint[]), CAST(:ms AS integer[]), CAST(:recipes AS text[]))
        AS v(id, seq, uri, sha256, bytes, ms, recipe)
    WHERE jobs.id = ANY(CAST(:ids AS varchar[])) AND jobs.id = v.id AND jobs.status = 'running'
        AND jobs.worker = :worker AND jobs.claim_seq = v.seq
    RETURNING jobs.id, jobs.dataset_id
    """
)


def bench_statements(
    settings: Settings, *, jobs: int = 12_000, task_jobs: int = 8, progress: Progress = print
) -> dict[str, Any]:
    """One connection, one kind of transaction at a time: PostgreSQL's CPU (its backend, from /proc) and this
    process's CPU per transaction, for the workers' claim and record; the same with the job_counts triggers off
    (superuser only: session_replication_role); and a set-based record (one UPDATE per batch) for comparison."""
    from sqlalchemy import event

    tag = uuid.uuid4().hex[:8]
    engine = open_store(settings)
    name = f"ceiling-statements-{tag}"
    progress(f"(c) statements: recording and queueing {jobs} jobs")
    ids = _queue_jobs(engine, settings, name, jobs, f"ceiling-{tag}")
    tasks = [ids[i : i + task_jobs] for i in range(0, len(ids), task_jobs)]
    third = len(tasks) // 3
    plain = _Replay(settings, f"ceiling-{tag}-plain#gen")
    quiet_engine = make_engine(settings.database_url)
    event.listen(
        quiet_engine, "begin", lambda conn: conn.exec_driver_sql("SET LOCAL session_replication_role = replica")
    )
    results: dict[str, Any] = {"jobs_per_transaction": task_jobs, "load_average_before": load_average()}

    def measure(label: str, backend: int, count: int, run: Callable[[], None]) -> None:
        pg, me, wall = cpu_s(backend) or 0.0, time.process_time(), time.perf_counter()
        run()
        pg, me, wall = (cpu_s(backend) or 0.0) - pg, time.process_time() - me, time.perf_counter() - wall
        results[label] = {
            "transactions": count,
            "pg_cpu_us_per_transaction": round(pg / count * 1e6),
            "client_cpu_us_per_transaction": round(me / count * 1e6),
            "wall_us_per_transaction": round(wall / count * 1e6),
        }
        progress(f"(c) statements: {label}: {results[label]}")

    def claims(replay: _Replay, chunk: list[list[str]], into: list[list[Any]]) -> Callable[[], None]:
        return lambda: into.extend(replay.claim(ids) for ids in chunk)

    def records(replay: _Replay, batches: list[list[Any]]) -> Callable[[], None]:
        def run() -> None:
            for batch in batches:
                replay.record(batch)

        return run

    try:
        held: list[list[Any]] = []
        measure("claim", plain.backend, third, claims(plain, tasks[:third], held))
        measure("record", plain.backend, third, records(plain, held))
        try:
            quiet = _Replay(settings, f"ceiling-{tag}-quiet#gen", engine=quiet_engine)
            quiet_held: list[list[Any]] = []
            measure("claim_without_triggers", quiet.backend, third, claims(quiet, tasks[third : 2 * third], quiet_held))
            measure("record_without_triggers", quiet.backend, third, records(quiet, quiet_held))
            quiet.close()
        except Exception as exc:  # not a superuser: session_replication_role is refused
            results["without_triggers"] = f"not measured: {type(exc).__name__}"
        last = [plain.claim(ids) for ids in tasks[2 * third : 3 * third]]
        with engine.begin() as conn:  # statistics that know jobs are running (the load was analyzed when none was)
            conn.execute(text("ANALYZE jobs"))

        def set_based() -> None:
            for batch in last:
                with plain.engine.begin() as conn:
                    params = {
                        "ids": [job.id for job in batch],
                        "seqs": [job.claim_seq for job in batch],
                        "uris": [f"file:///ceiling/{job.id}.png" for job in batch],
                        "shas": [job.id * 2 for job in batch],
                        "sizes": [150_000] * len(batch),
                        "ms": [1] * len(batch),
                        "recipes": [_Replay.RECIPE] * len(batch),
                        "worker": plain.name,
                    }
                    rows = conn.execute(_SET_BASED_RECORD, params).all()
                    transitions.note_recipe(conn, rows[0].dataset_id, _Replay.RECIPE)

        measure("record_set_based_what_if", plain.backend, len(last), set_based)
    finally:
        plain.close()
        _drop(engine, name)
        engine.dispose()
    results["load_average_after"] = load_average()
    return results


def _drop(engine: Any, name: str) -> None:
    from benchmarks.submit import _drop_dataset

    _drop_dataset(engine, name)


# ---- all of it ------------------------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "load_average": load_average()}


def run_ceiling(
    settings: Settings,
    *,
    parts: tuple[str, ...] = ("worker", "uploads", "fleet"),
    sizes: tuple[tuple[int, int], ...] = ((256, 400), (1024, 200)),
    profile: bool = False,
    loglevel: str = "INFO",
    io_threads: int = 2,
    fleet_jobs: int = 20_000,
    fleet_processes: int = 4,
    task_jobs: int = 8,
    record_jobs: int = 0,
    workdir: Path,
    progress: Progress = print,
) -> dict[str, Any]:
    """The parts asked for, in order; returns every figure."""
    result: dict[str, Any] = {
        "store": redact(settings.database_url),
        "broker": redact(settings.broker_url),
        "storage": redact(settings.storage_url),
        "machine": machine(),
    }
    if "worker" in parts:
        result["worker"] = [
            bench_worker(
                settings,
                size=size,
                jobs=jobs,
                io_threads=io_threads,
                loglevel=loglevel,
                profile=profile,
                workdir=workdir,
                progress=progress,
            )
            for size, jobs in sizes
        ]
    if "uploads" in parts:
        result["uploads"] = bench_uploads(size=1024, io_threads=io_threads, workdir=workdir, progress=progress)
    if "fleet" in parts:
        result["fleet"] = bench_fleet(
            settings,
            jobs=fleet_jobs,
            processes=fleet_processes,
            task_jobs=task_jobs,
            record_jobs=record_jobs,
            progress=progress,
        )
    if "statements" in parts:
        result["statements"] = bench_statements(
            settings, jobs=max(12_000, 375 * task_jobs), task_jobs=task_jobs, progress=progress
        )
    return result

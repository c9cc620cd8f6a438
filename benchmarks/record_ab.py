"""Recording a batch per image or per statement, on PostgreSQL: wall time and the server's CPU per image.

    PYTHONPATH=. python -m benchmarks.record_ab postgresql+psycopg://postgres@127.0.0.1:5432/DB

Each run claims 8 jobs and records them, one transaction each, as a worker does, 125 times; runs alternate
between one guarded UPDATE per image (mark_succeeded in a loop) and one per batch (mark_succeeded_many).
PostgreSQL's CPU is the sum over its server processes, read from /proc (the server runs on this machine).
"""

from __future__ import annotations

import os
import sys
import time

from farm.storage import StoredObject
from farm.store import transitions
from farm.store.engine import make_engine, upgrade
from farm.submit.inputs import Row
from farm.submit.plan import SubmitOptions, plan_rows
from farm.submit.record import record

STORED = StoredObject("file:///x.png", "x", "ab" * 32, 10)


def postgres_cpu() -> dict[str, float]:
    """CPU seconds of each PostgreSQL server process now."""
    found: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if not f.read().startswith("postgres"):
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[-1].split()
        except OSError:
            continue
        found[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return found


def cpu_since(before: dict[str, float]) -> float:
    """CPU seconds the server's processes used since ``before`` (a process that exited meanwhile is not counted)."""
    return sum(seconds - before.get(pid, 0.0) for pid, seconds in postgres_cpu().items())


def main(url: str, runs: int = 4, per_run: int = 1000) -> None:
    engine = make_engine(url)
    upgrade(engine)
    rows = [Row("<bench>", n, {"prompt": f"prompt {n}"}) for n in range(1, runs * per_run + 1)]
    options = SubmitOptions(dataset=f"record-ab-{os.getpid()}", model="tiny", width=64, height=64)
    plan = plan_rows(rows, options, base_dir=None)
    record(engine, plan)
    ids = list(plan.ids)
    for run in range(runs):
        per_batch = run % 2 == 1
        chunk, ids = ids[:per_run], ids[per_run:]
        started, cpu = time.perf_counter(), postgres_cpu()
        for start in range(0, per_run, 8):
            with engine.begin() as conn:
                claimed = transitions.claim(conn, chunk[start : start + 8], worker="w#1", lease_s=60, max_attempts=3)
            done = [(job.id, job.claim_seq, STORED, 5) for job in claimed]
            with engine.begin() as conn:
                if per_batch:
                    transitions.mark_succeeded_many(conn, done, worker="w#1", recipes={d[0]: "{}" for d in done})
                else:
                    noted: set[tuple[int, str]] = set()
                    for job_id, seq, stored, ms in done:
                        transitions.mark_succeeded(
                            conn, job_id, worker="w#1", seq=seq, stored=stored, render_ms=ms, recipe="{}", noted=noted
                        )
        wall = (time.perf_counter() - started) / per_run * 1000
        pg = cpu_since(cpu) / per_run * 1000
        kind = "one UPDATE per batch" if per_batch else "one UPDATE per image"
        print(f"{kind}: {wall:.2f} ms wall per image, PostgreSQL CPU {pg:.3f} ms per image (claim + record)")
    engine.dispose()


if __name__ == "__main__":
    main(sys.argv[1])

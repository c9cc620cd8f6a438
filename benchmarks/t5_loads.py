"""T5 loads per 1,000 images with distinct prompts on a `--low-memory` worker, through the worker's own code.

    python -m benchmarks.t5_loads [--jobs 256] [--task-jobs 64] [--max-batch 2]

Builds the tiny model, records `--jobs` jobs with distinct prompts (quantize int8), and runs them through a
low-memory WorkerRuntime in tasks of `--task-jobs` (what a low-memory pool's messages carry), rendering
`--max-batch` at a time. Prints the T5 loads, the loads per 1,000 images and the wall time.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=256)
    parser.add_argument("--task-jobs", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=2)
    args = parser.parse_args(argv)

    from farm.dispatch.broker import make_celery
    from farm.settings import load_settings
    from farm.store.engine import open_store
    from farm.submit.plan import SubmitOptions, plan_submission
    from farm.submit.record import record
    from models.tiny import make_tiny
    from workers.runtime import WorkerRuntime
    from workers.tasks import render_jobs

    with tempfile.TemporaryDirectory(prefix="t5-loads-") as tmp:
        root = Path(tmp)
        model = make_tiny(root / "tiny")
        settings = load_settings({}, home=str(root / "home"), broker_url="memory://")
        engine = open_store(settings)
        prompts = root / "prompts.txt"
        prompts.write_text("".join(f"a photo of item number {i}\n" for i in range(args.jobs)))
        options = SubmitOptions(dataset="t5", model=str(model), width=64, height=64, quantize="int8")
        plan = plan_submission(prompts, options)
        record(engine, plan)
        rt = WorkerRuntime.build(settings, make_celery(settings), name="t5", low_memory=True, max_batch=args.max_batch)
        try:
            started = time.perf_counter()
            for start in range(0, len(plan.ids), args.task_jobs):
                render_jobs(rt, plan.ids[start : start + args.task_jobs])
            rt.uploader.drain()
            elapsed = time.perf_counter() - started
        finally:
            rt.leases.stop()
        loads, images = rt.caches.t5_loads, rt.stats.rendered
        print(f"images {images}  T5 loads {loads}  per 1,000 images {1000 * loads / images:.1f}  wall {elapsed:.1f} s")
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

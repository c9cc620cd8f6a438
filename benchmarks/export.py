"""Time `farm export` at dataset scale: one request at a time (``--parallel 1``) against the default parallelism.

It builds a dataset of N succeeded jobs whose images are small real PNGs, in a local folder and in an S3 bucket
served over HTTP by moto (the tests' kind of S3 server, started in this process), then runs the real command,
``python -m farm export``, in a subprocess for each format, storage and parallelism, each to a fresh destination,
and reports images/s. It also times the incremental runs: one after 1% more jobs finished, one with nothing new.
CPU seconds of the export process and of this process (which hosts the S3 server) tell what bounded a run:
CPU near the core count means CPU-bound; little CPU and a long wall time means waiting on round trips.

    python benchmarks/export.py --images 10000                      # local and S3, imagefolder and webdataset
    python benchmarks/export.py --images 2000 --storage s3 --formats imagefolder --parallel 1 4 16 --out r.json
    python benchmarks/export.py --images 1000 --storage s3 --latency-ms 20       # round trips like a remote S3
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select

from farm.outputs.export import DEFAULT_PARALLEL
from farm.settings import load_settings
from farm.storage import Storage, object_key, open_storage
from farm.store.engine import open_store
from farm.store.schema import Dataset, Job, JobStatus, utcnow

DATASET = "bench-export"
_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"}


def _png(seed: int, size: int) -> bytes:
    """A real PNG of ``size`` px, different for every seed (a colour gradient with noise, so it compresses a bit)."""
    from PIL import Image

    rng = __import__("random").Random(seed)
    img = Image.new("RGB", (size, size), (seed % 256, (seed * 7) % 256, (seed * 13) % 256))
    pixels = img.load()
    assert pixels is not None
    for _ in range(size * size // 8):
        pixels[rng.randrange(size), rng.randrange(size)] = (rng.randrange(256), rng.randrange(256), 0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _Moto:
    """moto's S3 server on a free loopback port, in this process (as tests/support/s3.py runs it).

    With ``latency_ms`` every request is answered that much later (the server thread sleeps, holding no lock), a
    stand-in for the network and service time of a real S3 endpoint, which a loopback server does not have.
    """

    def __init__(self, latency_ms: float = 0) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
        app = DomainDispatcherApplication(create_backend_app)

        def delayed(environ: Any, start_response: Any) -> Any:
            time.sleep(latency_ms / 1000)
            return app(environ, start_response)

        self.server = make_server(
            "127.0.0.1", 0, delayed if latency_ms else app, threaded=True, request_handler=MotoRequestHandler
        )
        self.endpoint_url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1").create_bucket(Bucket=name)

    def stop(self) -> None:
        self.server.shutdown()
        self.thread.join()


def _add_jobs(engine: Any, storage: Storage, count: int, *, first: int, size: int, ago_s: float) -> float:
    """Insert ``count`` succeeded jobs with stored images (16 uploads at a time); the seconds it took."""
    start = time.perf_counter()
    base = utcnow() - timedelta(seconds=ago_s)
    with engine.begin() as conn:
        ds_id = conn.execute(select(Dataset.id).where(Dataset.name == DATASET)).scalar()
        if ds_id is None:
            ds_id = conn.execute(insert(Dataset).values(name=DATASET).returning(Dataset.id)).scalar_one()

    def one(seed: int) -> dict[str, Any]:
        job_id = uuid.uuid4().hex
        stored = storage.put(object_key(storage.prefix, DATASET, job_id, 1), _png(seed, size))
        return {
            "id": job_id,
            "dataset_id": ds_id,
            "prompt": f"a lighthouse at dusk, take {seed}",
            "seed": seed,
            "width": size,
            "height": size,
            "num_inference_steps": 4,
            "guidance_scale": 0.0,
            "model": "bench",
            "status": JobStatus.SUCCEEDED.value,
            "attempts": 1,
            "claim_seq": 1,
            "worker": "bench#0",
            "finished_at": base + timedelta(milliseconds=seed),
            "output_uri": stored.uri,
            "sha256": stored.sha256,
            "bytes": stored.bytes,
            "render_ms": 1000,
        }

    with ThreadPoolExecutor(16) as pool:
        rows = list(pool.map(one, range(first, first + count)))
    with engine.begin() as conn:
        for i in range(0, len(rows), 1000):
            conn.execute(insert(Job), rows[i : i + 1000])
    return time.perf_counter() - start


def _cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _cpu_children() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _export(home: Path, env: dict[str, str], fmt: str, to: str, parallel: int) -> dict[str, Any]:
    """One `farm export` in a subprocess: wall seconds, its CPU seconds, this process's (the S3 server's), output."""
    command = [sys.executable, "-m", "farm", "--home", str(home), "export", DATASET, "--format", fmt, "--to", to]
    command += ["--parallel", str(parallel)]
    cpu_child, cpu_self = _cpu_children(), _cpu_self()
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"farm export failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return {
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "wall_s": round(wall, 3),
        "export_cpu_s": round(_cpu_children() - cpu_child, 3),
        "server_cpu_s": round(_cpu_self() - cpu_self, 3),
        "output": done.stdout.strip(),
    }


def _run(args: argparse.Namespace, work: Path, backend: str, moto: _Moto | None) -> Iterator[dict[str, Any]]:
    home = work / backend / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    if backend == "s3":
        assert moto is not None
        bucket = f"bench-{uuid.uuid4().hex[:8]}"
        moto.create_bucket(bucket)
        env.update(_CREDENTIALS)
        env["FARM_STORAGE_URL"] = f"s3://{bucket}/images"
        env["FARM_S3_ENDPOINT_URL"] = moto.endpoint_url
        exports = f"s3://{bucket}/exports"
    else:
        env["FARM_STORAGE_URL"] = (work / backend / "images").as_uri()
        exports = str(work / backend / "exports")
    settings = load_settings({}, home=str(home), storage_url=env["FARM_STORAGE_URL"])
    engine = open_store(settings)
    storage = open_storage(settings.storage_url, s3_endpoint_url=env.get("FARM_S3_ENDPOINT_URL"))
    try:
        built = _add_jobs(engine, storage, args.images, first=0, size=args.size, ago_s=7200)
        print(f"[{backend}] {args.images} jobs with {args.size} px PNGs stored in {built:.1f} s", flush=True)
        for fmt in args.formats:
            for parallel in args.parallel:
                to = f"{exports}/{fmt}-p{parallel}"
                timing = _export(home, env, fmt, to, parallel)
                rate = args.images / timing["wall_s"]
                print(
                    f"[{backend}] {fmt:11} --parallel {parallel:<3} {timing['wall_s']:7.2f} s  {rate:7.0f} images/s  "
                    f"export CPU {timing['export_cpu_s']:.1f} s  server CPU {timing['server_cpu_s']:.1f} s  "
                    f"load {timing['load_avg_1m']}",
                    flush=True,
                )
                yield {"storage": backend, "format": fmt, "parallel": parallel, "images": args.images, **timing}
        # Incremental: 1% more jobs, exported to the default-parallelism destinations; then nothing new.
        more = max(1, args.images // 100)
        _add_jobs(engine, storage, more, first=args.images, size=args.size, ago_s=3600)
        for fmt in args.formats:
            to = f"{exports}/{fmt}-p{args.parallel[-1]}"
            for label, rows in (("+1% new", more), ("nothing new", 0)):
                timing = _export(home, env, fmt, to, args.parallel[-1])
                print(f"[{backend}] {fmt:11} rerun, {label:11} {timing['wall_s']:7.2f} s  ({timing['output']})")
                yield {"storage": backend, "format": fmt, "rerun": label, "new_rows": rows, **timing}
    finally:
        engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000, help="succeeded jobs in the dataset (default 10000)")
    parser.add_argument("--size", type=int, default=64, help="PNG width and height in px (default 64)")
    parser.add_argument("--storage", nargs="+", choices=("local", "s3"), default=["local", "s3"])
    parser.add_argument(
        "--formats",
        nargs="+",
        choices=("imagefolder", "webdataset", "parquet", "jsonl"),
        default=["imagefolder", "webdataset"],
    )
    parser.add_argument(
        "--parallel",
        nargs="+",
        type=int,
        default=[1, DEFAULT_PARALLEL],
        help="values of --parallel (the last one is also used for the incremental reruns; default: 1 and the default)",
    )
    parser.add_argument(
        "--latency-ms",
        type=float,
        default=0,
        help="answer every S3 request this much later, like a remote endpoint (default 0: loopback only)",
    )
    parser.add_argument("--work-dir", type=Path, default=None, help="where the data goes (default: a temp folder)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    os.environ.update(_CREDENTIALS)  # moto accepts any; boto3 in this process and in `farm export` needs some
    moto = _Moto(args.latency_ms) if "s3" in args.storage else None
    results: list[dict[str, Any]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="farm-bench-export-", dir=args.work_dir) as tmp:
            for backend in args.storage:
                results.extend(_run(args, Path(tmp), backend, moto))
    finally:
        if moto is not None:
            moto.stop()
    report = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "s3_latency_ms": args.latency_ms,
        "command": " ".join(["python", "benchmarks/export.py", *(argv if argv is not None else sys.argv[1:])]),
        "results": results,
    }
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

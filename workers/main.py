"""`farm worker`: start one Celery worker process (solo pool) for one device."""

from __future__ import annotations

import logging

from farm.settings import Settings
from workers.app import create_app
from workers.runtime import default_worker_name


def run_worker(
    settings: Settings,
    *,
    name: str | None = None,
    loglevel: str = "INFO",
    torch_threads: int | None = None,
    max_batch: int | None = None,
    io_threads: int = 2,
    low_memory: bool = False,
    metrics_port: int = 0,
    pool: str | None = None,
) -> None:
    """Run until stopped: SIGTERM renders what fits in settings.shutdown_grace_s, hands the rest back, exits."""
    logging.basicConfig(level=loglevel.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    name = name or default_worker_name()
    app = create_app(
        settings,
        worker_name=name,
        max_batch=max_batch,
        io_threads=io_threads,
        low_memory=low_memory,
        pool=pool,
        metrics_port=metrics_port,
    )
    app.worker_main(
        argv=[
            "worker",
            "--pool=solo",
            "--concurrency=1",
            f"--queues={settings.queue}",
            f"--hostname={name.replace(':', '-')}@%h",
            f"--loglevel={loglevel.upper()}",
            "--without-gossip",
            "--without-mingle",
            "--prefetch-multiplier=1",
        ]
    )

"""`farm worker`: start one Celery worker process (solo pool) for one device.

Nothing this process writes may carry a secret (docs/ARCHITECTURE.md, "One secret scrubber"). Our own log lines
are written with redacted URLs, but Celery and kombu write theirs themselves: the start-up banner (printed, not
logged) and the consumer's "Connected to …", "Cannot connect to …" and "Connection to broker lost" lines, which
mask a URL's userinfo password at most. So every log handler, ours and those Celery installs, gets
farm.secrets.ScrubbingFilter, and the banner comes from a Worker class whose startup_info is scrubbed.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from farm.secrets import ScrubbingFilter, scrub
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
    scrubbing = ScrubbingFilter(settings)
    scrub_logs(scrubbing)
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
    scrub_banner(app, scrubbing.hidden)
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


def scrub_logs(scrubbing: ScrubbingFilter) -> None:
    """Put the filter on every handler there is now, and on those Celery installs when its worker starts.

    Celery sets up its logging inside worker_main (Worker.setup_logging): with our root handler in place it adds
    none to the root, but it does give `celery.task` (which does not propagate) and the multiprocessing logger
    handlers of their own, and announces the first two with after_setup_logger / after_setup_task_logger.
    Each signal, and celeryd_after_setup (just before the banner, when the consumer has not connected yet),
    sweeps every logger's handlers again, so a handler added without a signal is covered as well.
    """
    from celery.signals import after_setup_logger, after_setup_task_logger, celeryd_after_setup

    def sweep(**_: Any) -> None:
        # A copy of the registry: another thread may create a logger meanwhile.
        loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.copy().values()]
        for logger in loggers:
            for handler in getattr(logger, "handlers", ()):
                if scrubbing not in handler.filters:
                    handler.addFilter(scrubbing)

    sweep()
    for signal in (after_setup_logger, after_setup_task_logger, celeryd_after_setup):
        signal.connect(sweep, weak=False)


def scrub_banner(app: Celery, hidden: list[str]) -> None:
    """Make the app's worker print its start-up banner scrubbed.

    Celery prints the banner to the terminal itself (Worker.emit_banner → print to sys.__stdout__), not
    through logging, so no filter sees it. Its broker line is `app.connection().as_uri()`, which masks only
    the userinfo password; the app must keep the real URL to connect, so the text is scrubbed instead: the
    app's Worker class (what `worker_main` instantiates) becomes a subclass whose startup_info is scrubbed.
    """
    base: type[Any] = app.Worker

    def startup_info(self: Any, artlines: bool = True) -> str:
        return scrub(base.startup_info(self, artlines=artlines), hidden=hidden)

    # app.Worker is a cached property; setting it replaces the cached class for this app only.
    app.Worker = type(base.__name__, (base,), {"startup_info": startup_info, "__module__": base.__module__})

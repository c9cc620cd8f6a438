"""The worker's heartbeat: it renews the leases of the jobs it holds and refreshes its row in `workers`.

Only a dead worker's leases expire and get reaped; `farm workers` shows each worker alive, stale or stopped.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from farm.store import fleet, transitions

log = logging.getLogger("farm.worker")


class LeaseKeeper:
    """A daemon thread beating every lease_s / 3 seconds.

    A render or an upload may take longer than one lease; as long as the process lives, its jobs stay its
    own. When it dies (OOM kill, preempted machine), renewals stop and the reaper hands the jobs out again.
    """

    def __init__(
        self, engine: Engine, *, worker: str, lease_s: int, describe: Callable[[int], fleet.Heartbeat] | None = None
    ) -> None:
        self.engine, self.worker, self.lease_s = engine, worker, lease_s
        self.describe = describe  # builds this worker's heartbeat, given how many jobs it holds
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farm-heartbeat", daemon=True)

    @property
    def beat_s(self) -> float:
        return self.lease_s / 3

    def start(self) -> LeaseKeeper:
        self.renew()  # register at once, so `farm workers` lists a worker before its first job
        self._thread.start()
        return self

    def renew(self) -> int:
        """Extend every lease this worker holds now and refresh its heartbeat; returns the leases renewed."""
        with self.engine.begin() as conn:
            renewed = transitions.extend_leases(conn, worker=self.worker, lease_s=self.lease_s)
            if self.describe is not None:
                fleet.beat(conn, self.describe(renewed))
        self.renewals += 1
        return renewed

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self.describe is not None:
            try:
                with self.engine.begin() as conn:
                    fleet.mark_stopped(conn, self.worker)
            except SQLAlchemyError as exc:
                log.warning("could not mark worker stopped (%s)", exc.__class__.__name__)

    def _run(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self.renew()
            except SQLAlchemyError as exc:  # the database is away: try again next period
                log.warning("could not renew leases (%s)", exc.__class__.__name__)

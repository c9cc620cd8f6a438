"""A worker renews the leases of the jobs it holds, so only a dead worker's jobs expire and get reaped."""

from __future__ import annotations

import logging
import threading

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from farm import states

log = logging.getLogger("farm.worker")


class LeaseKeeper:
    """A daemon thread that extends this worker's leases every lease_s / 3 seconds.

    A render or an upload may take longer than one lease; as long as the process lives, its jobs stay its
    own. When it dies (OOM kill, preempted machine), renewals stop and the reaper hands the jobs out again.
    """

    def __init__(self, engine: Engine, *, worker: str, lease_s: int) -> None:
        self.engine, self.worker, self.lease_s = engine, worker, lease_s
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farm-leases", daemon=True)

    def start(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def renew(self) -> int:
        """Extend every lease this worker holds now; returns how many."""
        with self.engine.begin() as conn:
            renewed = states.extend_leases(conn, worker=self.worker, lease_s=self.lease_s)
        self.renewals += 1
        return renewed

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.lease_s / 3):
            try:
                self.renew()
            except SQLAlchemyError as exc:  # the database is away: try again next period
                log.warning("could not renew leases (%s)", exc.__class__.__name__)

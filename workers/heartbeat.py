"""The worker's heartbeat: it renews the leases of the jobs this incarnation holds in memory and refreshes its
row in `workers`; it finds the held jobs that are no longer its own (canceled, reaped) so their attempt stops.

Only a dead or frozen worker's leases expire and get reaped; `farm workers` shows each worker alive, stale or
stopped. The thread survives any error (logged); a worker whose beats fail stops claiming new work.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from farm.store import fleet, transitions

if TYPE_CHECKING:
    from workers.runtime import Holdings

log = logging.getLogger("farm.worker")


class LeaseKeeper:
    """A daemon thread beating every lease_s / 3 seconds.

    A render or an upload may take longer than one lease; as long as the process lives and holds a job, the job
    stays its own. When it dies (OOM kill, preempted machine) or freezes, renewals stop and the reaper hands the
    jobs out again; the fence (each attempt's claim_seq) keeps a frozen one from writing once it wakes.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        worker: str,
        lease_s: int,
        holdings: Holdings,
        describe: Callable[[int], fleet.Heartbeat] | None = None,
    ) -> None:
        self.engine, self.worker, self.lease_s, self.holdings = engine, worker, lease_s, holdings
        self.describe = describe  # builds this worker's heartbeat, given how many jobs it holds
        self.on_lost: Callable[[set[str]], None] | None = None
        self.after_beat: Callable[[], None] | None = None  # more work for each beat (retrying unrecorded results)
        self.renewals = 0
        self.last_ok = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farm-heartbeat", daemon=True)

    @property
    def beat_s(self) -> float:
        return self.lease_s / 3

    def healthy(self) -> bool:
        """The last successful beat is recent enough that this worker's leases are surely still its own."""
        return time.monotonic() - self.last_ok < self.lease_s / 2

    def start(self) -> LeaseKeeper:
        self.renew()  # register at once, so `farm workers` lists a worker before its first job
        self._thread.start()
        return self

    def renew(self) -> int:
        """Renew the leases of the jobs held now and refresh the heartbeat; returns the leases renewed."""
        held = self.holdings.snapshot()
        with self.engine.begin() as conn:
            renewed = transitions.renew_leases(conn, worker=self.worker, held=held, lease_s=self.lease_s)
            if self.describe is not None:
                fleet.beat(conn, self.describe(len(renewed)))
        self.last_ok = time.monotonic()
        self.renewals += 1
        gone = self.holdings.mark_lost({job_id for job_id, _seq in held} - renewed)
        if gone and self.on_lost is not None:
            self.on_lost(gone)
        return len(renewed)

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
            except Exception:  # anything else is a bug, but the beat must go on
                log.exception("heartbeat failed; trying again in %.0f s", self.beat_s)
            if self.after_beat is not None:
                try:
                    self.after_beat()
                except Exception:
                    log.exception("retrying unrecorded results failed")

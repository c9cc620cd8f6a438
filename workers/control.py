"""The reaper and dispatcher loop that every `farm worker` runs in a thread of its own.

Only the incarnation holding the "reaper" lease in the job store acts; the others wait and take over when it
stops renewing (a killed or frozen leader). Each round: expired leases back to pending (or failed after the
last attempt), lost messages sent again, every queue's window topped up. It needs no flag, no file and no
Celery beat: a machine with nothing but the settings runs it, and it never waits behind the render backlog.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from sqlalchemy.engine import Engine

from farm.dispatch.publish import reap_and_dispatch
from farm.settings import Settings
from farm.store import control

log = logging.getLogger("farm.worker")


class ControlLoop:
    """A daemon thread running one round every control.interval_s(lease_s) seconds while it leads."""

    def __init__(self, engine: Engine, app: Celery, settings: Settings, *, holder: str) -> None:
        self.engine, self.app, self.settings, self.holder = engine, app, settings, holder
        self.interval_s = control.interval_s(settings.lease_s)
        self.ttl_s = 3 * self.interval_s
        self.leading = False
        self.rounds = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="farm-control", daemon=True)

    def start(self) -> ControlLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop, and let the lease go so another worker leads at once."""
        self._stop.set()
        self._thread.join(timeout=30)
        if self.leading:
            try:
                with self.engine.begin() as conn:
                    control.give_up(conn, control.REAPER, holder=self.holder)
            except Exception as exc:
                log.warning("could not hand the reaper lease on (%s); it expires in %.0f s", exc, self.ttl_s)

    def run_once(self) -> bool:
        """One round if this incarnation leads; returns whether it led."""
        with self.engine.begin() as conn:
            leading = control.acquire(conn, control.REAPER, holder=self.holder, ttl_s=self.ttl_s)
        if leading and not self.leading:
            log.info("this worker now runs the reaper and dispatcher (%s)", self.holder)
        self.leading = leading
        if not leading:
            return False
        reaped, resent, sent = reap_and_dispatch(self.engine, self.app, self.settings, grace_s=2 * self.interval_s)
        note = (
            f"reaped {len(reaped.requeued)} back to pending, {len(reaped.failed)} failed; "
            f"sent again {resent}; dispatched {sent.jobs}"
        )
        if reaped.requeued or reaped.failed:
            log.warning("reaper: %s", note)
        with self.engine.begin() as conn:
            control.ran(conn, control.REAPER, holder=self.holder, note=note)
        self.rounds += 1
        return True

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception as exc:  # the database or broker is away, or a bug: log it and go on
                log.warning("reaper and dispatcher round failed (%s: %s)", exc.__class__.__name__, exc)

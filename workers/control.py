"""The reaper and dispatcher loop that every `farm worker` runs in a thread of its own.

Only the incarnation holding the "reaper" lease in the job store acts; the others wait and take over when it
stops renewing (a killed or frozen leader). Each round: expired leases back to pending (or failed after the
last attempt), lost messages sent again, every queue's window topped up, and (every round, or less often when
counting is costly) the pending jobs per pool counted for `farm status --json` and the metrics. Between rounds the
leader ticks every second: jobs `farm submit` just recorded, and room a worker made in a window that still has
pending jobs behind it, are sent at once. `farm submit` itself only records. It needs no flag, no file and no
Celery beat: a machine with nothing but the settings runs it, and it never waits behind the render backlog.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery import Celery
from sqlalchemy.engine import Engine

from farm.dispatch.backlog import SPACING, refresh_backlog
from farm.dispatch.publish import (
    Dispatched,
    dispatch_pending,
    has_room,
    newest_pending,
    queued_per_queue,
    reap_and_dispatch,
)
from farm.dispatch.routing import Router
from farm.settings import Settings
from farm.store import control

log = logging.getLogger("farm.worker")
TICK_S = 1.0  # how often the leader looks for new jobs and window room between rounds
# Pending pages a tick reads at most (a page is about twice what the windows hold): unroutable jobs or a full
# window's jobs ahead in the page order are passed over by the next round, not every second.
TICK_PAGES = 2


class ControlLoop:
    """A daemon thread running one round every control.interval_s(lease_s) seconds (the first at once), and a
    top-up tick every TICK_S seconds in between while it leads."""

    def __init__(self, engine: Engine, app: Celery, settings: Settings, *, holder: str) -> None:
        self.engine, self.app, self.settings, self.holder = engine, app, settings, holder
        self.interval_s = control.interval_s(settings.lease_s)
        self.tick_s = min(TICK_S, self.interval_s)
        self.ttl_s = 3 * self.interval_s
        self.leading = False
        self.rounds = 0
        self.top_ups = 0  # ticks that sent jobs
        self._lease_until = 0.0  # monotonic time until which this incarnation surely holds the lease
        self._last_round = -float("inf")
        self._more = False  # the last top-up left pending jobs waiting for room in a window
        self._newest: Any = None  # the newest pending job's creation time at the last top-up
        self._backlog_due = 0.0  # monotonic time of the next pending-per-pool count
        # How fast each queue drains (jobs/s, smoothed): from what it held at the last look, what was sent to it
        # since and what it holds now. Sizes the windows (Router.drains) a second after a worker speeds up.
        self.drains: dict[str, float] = {}
        self._looked: tuple[float, dict[str, int]] | None = None
        self._sent: dict[str, int] = {}
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
        self._last_round = started = time.monotonic()
        with self.engine.begin() as conn:
            leading = control.acquire(conn, control.REAPER, holder=self.holder, ttl_s=self.ttl_s)
        if leading and not self.leading:
            log.info("this worker now runs the reaper and dispatcher (%s)", self.holder)
        self.leading = leading
        if not leading:
            return False
        self._lease_until = started + self.ttl_s - self.interval_s
        newest = newest_pending(self.engine)
        router, _queued = self._look()
        reaped, resent, sent = reap_and_dispatch(
            self.engine, self.app, self.settings, grace_s=2 * self.interval_s, router=router
        )
        self._sent_now(sent)
        self._newest, self._more = newest, sent.waiting
        note = (
            f"reaped {len(reaped.requeued)} back to pending, {len(reaped.failed)} failed; "
            f"sent again {resent}; dispatched {sent.jobs}"
        )
        if reaped.requeued or reaped.failed:
            log.warning("reaper: %s", note)
        with self.engine.begin() as conn:
            control.ran(conn, control.REAPER, holder=self.holder, note=note)
        self.rounds += 1
        if time.monotonic() >= self._backlog_due:
            self.count_backlog()
        return True

    def tick(self) -> int:
        """Between rounds, while leading: send pending jobs if new ones were recorded since the last top-up, or if
        jobs wait for room and a window has room for a task again. Returns how many jobs went."""
        if not self.leading or time.monotonic() >= self._lease_until:
            return 0
        newest = newest_pending(self.engine)
        fresh = newest is not None and newest != self._newest
        if not (fresh or self._more):
            return 0
        router, queued = self._look()
        if not fresh and not has_room(self.settings, router, queued):
            return 0
        sent = dispatch_pending(self.engine, self.app, self.settings, router=router, max_pages=TICK_PAGES)
        self._sent_now(sent)
        self._newest, self._more = newest, sent.waiting
        if sent.jobs:
            self.top_ups += 1
        return sent.jobs

    def _look(self) -> tuple[Router, dict[str, int]]:
        """The router for now, with each queue's drain rate measured since the last look."""
        now, queued = time.monotonic(), queued_per_queue(self.engine)
        if self._looked is not None:
            then, before = self._looked
            for queue in {*before, *queued, *self._sent}:
                taken = before.get(queue, 0) + self._sent.get(queue, 0) - queued.get(queue, 0)
                rate = max(0, taken) / max(now - then, self.tick_s)  # a tick apart at least (tests call faster)
                self.drains[queue] = rate if queue not in self.drains else (self.drains[queue] + rate) / 2
        self._looked, self._sent = (now, queued), {}
        router = Router.load(self.engine, self.settings)
        router.drains = self.drains
        return router, queued

    def _sent_now(self, sent: Dispatched) -> None:
        for queue, n in sent.per_queue.items():
            self._sent[queue] = self._sent.get(queue, 0) + n

    def count_backlog(self) -> None:
        """Count the pending jobs per pool and store them (farm/dispatch/backlog.py); the next count is due after
        a round, or after SPACING times what this one cost."""
        backlog = refresh_backlog(self.engine, self.settings, holder=self.holder, ttl_s=self.ttl_s)
        spacing = 0.0 if backlog is None else backlog.seconds * SPACING
        self._backlog_due = time.monotonic() + max(self.interval_s, spacing) - self.tick_s / 2

    def _run(self) -> None:
        while True:
            try:
                if time.monotonic() - self._last_round >= self.interval_s:
                    self.run_once()
                else:
                    self.tick()
            except Exception as exc:  # the database or broker is away, or a bug: log it and go on
                log.warning("reaper and dispatcher round failed (%s: %s)", exc.__class__.__name__, exc)
            if self._stop.wait(self.tick_s):
                return

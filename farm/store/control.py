"""Fleet-wide duties held by one worker incarnation at a time: a lease row per duty in the `control` table.

Every `farm worker` runs the reaper and dispatcher loop (workers/control.py); only the incarnation holding the
"reaper" lease acts, and another takes over once it stops renewing. `farm status` and `farm workers` read when
the duty last ran, and say so when nobody has run it for a while.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from farm.store import progress
from farm.store.progress import BACKLOG as BACKLOG
from farm.store.progress import REAPER as REAPER
from farm.store.progress import BacklogFigures as BacklogFigures
from farm.store.progress import connection_reader
from farm.store.progress import interval_s as interval_s
from farm.store.schema import Control, utcnow


def acquire(conn: Connection, duty: str, *, holder: str, ttl_s: float) -> bool:
    """Take or renew the lease on ``duty`` for ``holder``; True while it is ours. Free, expired or already ours
    are the only ways in, as one guarded UPDATE, so two contenders never both hold it."""
    now = utcnow()
    taken = conn.execute(
        update(Control)
        .where(
            Control.name == duty,
            or_(Control.holder == holder, Control.holder.is_(None), Control.expires_at < now),
        )
        .values(holder=holder, expires_at=now + timedelta(seconds=ttl_s))
    ).rowcount
    if taken:
        return True
    exists = conn.execute(select(Control.name).where(Control.name == duty)).first()
    if exists is not None:
        return False
    try:
        with conn.begin_nested():
            conn.execute(insert(Control).values(name=duty, holder=holder, expires_at=now + timedelta(seconds=ttl_s)))
    except IntegrityError:  # another contender created the row first; it holds the lease
        return False
    return True


def give_up(conn: Connection, duty: str, *, holder: str) -> None:
    """Let the lease go at once (a clean stop), so another worker takes over without waiting for it to expire."""
    conn.execute(
        update(Control).where(Control.name == duty, Control.holder == holder).values(expires_at=None, holder=None)
    )


def ran(conn: Connection, duty: str, *, holder: str, note: str) -> None:
    """Record that the holder ran the duty to the end now, and what it did."""
    conn.execute(
        update(Control).where(Control.name == duty, Control.holder == holder).values(last_run_at=utcnow(), note=note)
    )


@dataclass(frozen=True)
class DutyState:
    """Who holds a duty and when it last ran."""

    holder: str | None
    last_run_at: datetime | None
    note: str | None

    def silent_for(self, now: datetime | None = None) -> float | None:
        """Seconds since it last ran (None: never)."""
        if self.last_run_at is None:
            return None
        return ((now or utcnow()) - self.last_run_at).total_seconds()


def duty_state(engine: Engine, duty: str = REAPER) -> DutyState:
    """The duty's row, or an empty state when no worker ever took it."""
    with engine.connect() as conn:
        return DutyState(*progress.last_run(connection_reader(conn), duty))


def leader_alive(engine: Engine) -> bool:
    """Whether a worker holds the reaper and dispatcher lease now (its control loop sends pending jobs)."""
    with engine.connect() as conn:
        expires = conn.execute(
            select(Control.expires_at).where(Control.name == REAPER, Control.holder.is_not(None))
        ).scalar()
    return expires is not None and expires > utcnow()


def store_backlog(
    conn: Connection,
    *,
    holder: str,
    pools: dict[str, int],
    datasets: dict[int, dict[str, int]],
    seconds: float,
    every_s: float,
) -> None:
    """Record the pending jobs per pool (over unpaused datasets) and per dataset, if ``holder`` holds BACKLOG."""
    figures = {
        "pools": pools,
        "datasets": {str(ds): per_pool for ds, per_pool in datasets.items()},
        "seconds": round(seconds, 4),
        "every_s": round(every_s, 1),
    }
    ran(conn, BACKLOG, holder=holder, note=json.dumps(figures, separators=(",", ":"), sort_keys=True))


def read_backlog(conn: Connection, now: datetime | None = None) -> BacklogFigures | None:
    """The stored backlog count; None when there is none, or when it is stale (no leader has counted lately)."""
    return progress.read_backlog(connection_reader(conn), now)


def pending_per_pool(engine: Engine) -> dict[str, int] | None:
    """The fleet's pending jobs per pool (unpaused datasets) from the last backlog count; None when stale."""
    with engine.connect() as conn:
        figures = read_backlog(conn)
    return None if figures is None else figures.pools


def silence_warning(engine: Engine, lease_s: float, *, unfinished: bool) -> str | None:
    """A line for `farm status` / `farm workers` when the reaper has not run for a while and work is waiting."""
    with engine.connect() as conn:
        return progress.silence_warning(connection_reader(conn), lease_s, unfinished=unfinished)

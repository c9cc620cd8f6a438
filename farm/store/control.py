"""Fleet-wide duties held by one worker incarnation at a time: a lease row per duty in the `control` table.

Every `farm worker` runs the reaper and dispatcher loop (workers/control.py); only the incarnation holding the
"reaper" lease acts, and another takes over once it stops renewing. `farm status` and `farm workers` read when
the duty last ran, and say so when nobody has run it for a while.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert, or_, select, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from farm.store.schema import Control, utcnow

REAPER = "reaper"
# The pending jobs per pool that the leader counts (farm/dispatch/backlog.py): the row's note holds them as JSON.
BACKLOG = "backlog"
# A backlog count older than this many times its leader's spacing (and a minute) is not shown: nobody counts.
_STALE_AFTER = 3


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
        row = conn.execute(
            select(Control.holder, Control.last_run_at, Control.note).where(Control.name == duty)
        ).first()
    if row is None:
        return DutyState(None, None, None)
    return DutyState(row.holder, row.last_run_at, row.note)


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


@dataclass(frozen=True)
class BacklogFigures:
    """The last backlog count: pending jobs per pool (datasets not paused), per dataset id, and its age."""

    pools: dict[str, int]
    datasets: dict[int, dict[str, int]]
    age_s: float


def read_backlog(conn: Connection, now: datetime | None = None) -> BacklogFigures | None:
    """The stored backlog count; None when there is none, or when it is stale (no leader has counted lately)."""
    row = conn.execute(select(Control.last_run_at, Control.note).where(Control.name == BACKLOG)).first()
    if row is None or row.last_run_at is None or not row.note:
        return None
    try:
        figures: dict[str, Any] = json.loads(row.note)
        age = ((now or utcnow()) - row.last_run_at).total_seconds()
        if age > max(60.0, _STALE_AFTER * float(figures.get("every_s", 10.0))):
            return None
        datasets = {int(ds): {str(p): int(n) for p, n in per.items()} for ds, per in figures["datasets"].items()}
        return BacklogFigures({str(p): int(n) for p, n in figures["pools"].items()}, datasets, age)
    except (ValueError, KeyError, TypeError, AttributeError):  # written by another version: no figures
        return None


def pending_per_pool(engine: Engine) -> dict[str, int] | None:
    """The fleet's pending jobs per pool (unpaused datasets) from the last backlog count; None when stale."""
    with engine.connect() as conn:
        figures = read_backlog(conn)
    return None if figures is None else figures.pools


def interval_s(lease_s: float) -> float:
    """How often the control loop runs: a sixth of a lease, between 1 and 10 seconds."""
    return min(10.0, max(1.0, lease_s / 6))


def silence_warning(engine: Engine, lease_s: float, *, unfinished: bool) -> str | None:
    """A line for `farm status` / `farm workers` when the reaper has not run for a while and work is waiting."""
    if not unfinished:
        return None
    state = duty_state(engine)
    limit = max(3 * interval_s(lease_s), 30.0)
    silent = state.silent_for()
    if silent is not None and silent <= limit:
        return None
    since = "has never run" if silent is None else f"has not run for {silent:.0f} s"
    return (
        f"warning: the reaper and dispatcher {since}: no `farm worker` is running, or none can reach the "
        "database; expired leases are not reaped and the broker's window is not topped up until one does"
    )

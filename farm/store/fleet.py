"""The fleet: worker heartbeats in the job store, and what `farm workers` shows of them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from farm.store.schema import Worker, utcnow

# A worker beats every lease_s / 3; three missed beats make it stale.
STALE_AFTER_BEATS = 3


@dataclass(frozen=True)
class Heartbeat:
    """What a worker says about itself on each beat."""

    name: str
    pool: str | None
    host: str
    pid: int
    device: str
    device_memory_bytes: int | None
    loaded: dict[str, Any]  # models and adapters held, cache figures
    current_jobs: int
    images_per_s: float
    started_at: datetime


@dataclass(frozen=True)
class WorkerInfo:
    """A row of `farm workers`."""

    name: str
    pool: str | None
    device: str
    device_memory_bytes: int | None
    state: str  # alive, stale or stopped
    last_seen_s: float
    current_jobs: int
    images_per_s: float
    loaded: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def beat(conn: Connection, heartbeat: Heartbeat) -> None:
    """Insert or refresh this worker's row."""
    values = {
        **asdict(heartbeat),
        "loaded": json.dumps(heartbeat.loaded, default=str),
        "last_seen": utcnow(),
        "stopped": False,
    }
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(Worker).values(**values)
    refreshed = {k: stmt.excluded[k] for k in values if k not in ("name", "started_at")}
    conn.execute(stmt.on_conflict_do_update(index_elements=[Worker.name], set_=refreshed))


def mark_stopped(conn: Connection, name: str) -> None:
    """A clean shutdown: the worker is listed as stopped, not stale."""
    conn.execute(update(Worker).where(Worker.name == name).values(stopped=True, current_jobs=0, last_seen=utcnow()))


def list_workers(engine: Engine, *, beat_s: float, include_stopped: bool = False) -> list[WorkerInfo]:
    """Every known worker, alive ones first; stale = no beat for STALE_AFTER_BEATS beat periods."""
    now = utcnow()
    stale_after = timedelta(seconds=beat_s * STALE_AFTER_BEATS)
    with engine.connect() as conn:
        rows = conn.execute(select(Worker.__table__).order_by(Worker.pool, Worker.name)).all()
        infos = []
        for row in rows:
            if row.stopped and not include_stopped:
                continue
            state = "stopped" if row.stopped else ("stale" if now - row.last_seen > stale_after else "alive")
            infos.append(
                WorkerInfo(
                    row.name,
                    row.pool,
                    row.device,
                    row.device_memory_bytes,
                    state,
                    (now - row.last_seen).total_seconds(),
                    row.current_jobs,
                    row.images_per_s,
                    json.loads(row.loaded),
                )
            )
    return sorted(infos, key=lambda w: ({"alive": 0, "stale": 1, "stopped": 2}[w.state], w.pool or "", w.name))

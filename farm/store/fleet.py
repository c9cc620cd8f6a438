"""The fleet: worker heartbeats in the job store, and what `farm workers` shows of them."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from farm.secrets import scrub, secrets_of
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


def scrubbed(heartbeat: Heartbeat, hidden: Iterable[str] | None = None) -> Heartbeat:
    """The heartbeat with every secret masked in what it describes: host, device and everything in `loaded`.

    `loaded` holds model, adapter and cache descriptions that may name a URL. ``hidden``: the secrets to mask
    besides URL passwords (default: the secret variables'). The name and pool stay as they are: they are the
    worker's identity, matched against leases, jobs and routing, and come from --name / --pool, not from a URL
    or an error text.
    """
    secrets = secrets_of() if hidden is None else list(hidden)

    def clean(value: Any) -> Any:
        if isinstance(value, str):
            return scrub(value, hidden=secrets)
        if isinstance(value, dict):
            return {clean(k): clean(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [clean(v) for v in value]
        return value

    host, device, loaded = clean(heartbeat.host), clean(heartbeat.device), clean(heartbeat.loaded)
    return replace(heartbeat, host=host, device=device, loaded=loaded)


def beat(conn: Connection, heartbeat: Heartbeat) -> None:
    """Insert or refresh this worker's row; nothing secret reaches the table, whoever built the heartbeat."""
    heartbeat = scrubbed(heartbeat)
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

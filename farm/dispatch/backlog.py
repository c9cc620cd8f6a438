"""Pending jobs per pool: the backlog the broker's window no longer shows, for `farm status --json` and autoscalers.

With a dispatch window, a queue's length says how much work was sent, not how much waits. Which pool will take a
pending job is routing's decision (farm/dispatch/routing.py), so the control loop's leader counts them: one
aggregate over the pending jobs grouped by dataset and route key (a few rows per dataset), each key routed, and
the result stored in the job store (farm/store/control.py, BACKLOG). `farm status --json` and every worker's
Prometheus endpoint read that one row, so neither ever counts jobs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.engine import Engine

from farm.dispatch.routing import Needs, Router
from farm.settings import Settings
from farm.store import control
from farm.store.schema import Dataset, Job, JobStatus

# The columns routing decides by (routing.Needs): what the aggregate groups pending jobs by.
ROUTE_FIELDS = ("model", "width", "height", "controlnet", "quantize", "scorer")
# The aggregate reads every pending job, so the leader runs it at most once per this many seconds of its own cost
# (at least once per control round): a million pending jobs cost ≈ 0.3–1 s, so at most every 20 s (BENCHMARKS.md).
SPACING = 20


@dataclass(frozen=True)
class Backlog:
    """Pending jobs per pool: over the datasets that are not paused (pools), and per dataset (datasets)."""

    pools: dict[str, int]
    datasets: dict[int, dict[str, int]]
    seconds: float  # what the aggregate cost


def count_backlog(engine: Engine, router: Router) -> Backlog:
    """One grouped aggregate over the pending jobs, each group routed to the pool that would take it."""
    started = time.perf_counter()
    columns = [Job.__table__.c[name] for name in ROUTE_FIELDS]
    with engine.connect() as conn:
        # No join: the datasets' paused flags are a second, small read (the join cost a third more at 1M jobs).
        rows = conn.execute(
            select(Job.dataset_id, *columns, func.count())
            .where(Job.status == JobStatus.PENDING.value)
            .group_by(Job.dataset_id, *columns)
        ).all()
        paused_ids = set(conn.execute(select(Dataset.id).where(Dataset.paused.is_(True))).scalars())
    pools: dict[str, int] = {}
    datasets: dict[int, dict[str, int]] = {}
    for ds_id, model, width, height, controlnet, quantize, scorer, n in rows:
        paused = ds_id in paused_ids
        pool = router.pool_for(Needs(str(model), controlnet, int(width) * int(height), quantize, scorer))
        per_dataset = datasets.setdefault(int(ds_id), {})
        per_dataset[pool] = per_dataset.get(pool, 0) + int(n)
        if not paused:
            pools[pool] = pools.get(pool, 0) + int(n)
    for pool in router.pool_names():
        pools.setdefault(pool, 0)  # every configured pool has a figure, 0 when nothing waits for it
    return Backlog(pools, datasets, time.perf_counter() - started)


def refresh_backlog(
    engine: Engine, settings: Settings, *, holder: str, ttl_s: float, router: Router | None = None
) -> Backlog | None:
    """Count the backlog and store it for status and metrics, if this holder may (one at a time, like the reaper);
    None when another process holds the duty."""
    with engine.begin() as conn:
        if not control.acquire(conn, control.BACKLOG, holder=holder, ttl_s=ttl_s):
            return None
    backlog = count_backlog(engine, router or Router.load(engine, settings))
    spacing = max(control.interval_s(settings.lease_s), SPACING * backlog.seconds)
    with engine.begin() as conn:
        control.store_backlog(
            conn,
            holder=holder,
            pools=backlog.pools,
            datasets=backlog.datasets,
            seconds=backlog.seconds,
            every_s=spacing,
        )
    return backlog

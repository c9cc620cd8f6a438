"""Routing jobs to pools: each pool says what it can serve; a job goes to a live pool that serves it.

Without pools in farm.toml everything goes to one queue (FARM_QUEUE), as before. With pools, each pool has
its own queue (`render.<pool>` unless it names one), and a job that no live pool can serve stays pending,
with the reason on the job, until such a pool comes alive (`farm dispatch`, the beat reaper).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from farm.settings import Settings
from farm.store.fleet import list_workers

LOW_MEMORY_TASK_JOBS = 64
# The dispatch window (farm/dispatch/publish.py) holds, for each live worker of a queue, its next WINDOW_TASKS
# tasks, or more if it renders faster than that many in REFILL_S seconds (its heartbeat's images/s, or how fast
# the leader saw the queue drain): the leader refills the window every second (workers/control.py), so a worker
# never waits for work, and a job of a higher priority, or the room a pause or cancel frees, is at most that much
# work behind. A queue no live worker has beaten on yet gets one worker's share. FARM_DISPATCH_WINDOW caps it.
WINDOW_TASKS = 2
REFILL_S = 4.0
NO_POOL = "(no pool)"  # the pool label of workers started without --pool (they share FARM_QUEUE)
NO_POOL_SERVES = "(none)"  # the pool label of jobs no configured pool can serve


@dataclass(frozen=True)
class Needs:
    """What a group of jobs requires of a pool."""

    model: str
    controlnet: str | None
    pixels: int
    quantize: str | None
    scorer: str | None = None  # the scorer profile its images are scored with (yield-targeted lines)


@dataclass(frozen=True)
class PoolSpec:
    """A pool's queue and capabilities; None means "any"."""

    name: str
    queue: str
    models: tuple[str, ...] | None = None
    controlnets: tuple[str, ...] | None = None
    max_pixels: int | None = None
    quantize: tuple[str, ...] | None = None
    # Jobs per task message (None: FARM_BATCH_SIZE). A low-memory pool encodes a task's prompts with one T5 load,
    # so it gets large tasks by default (LOW_MEMORY_TASK_JOBS), rendered max_batch at a time.
    task_jobs: int | None = None
    # The scorer profiles its workers load for yield-targeted lines; None: it scores nothing.
    scorers: tuple[str, ...] | None = None

    @classmethod
    def from_options(cls, name: str, options: Mapping[str, Any]) -> PoolSpec:
        def listed(key: str) -> tuple[str, ...] | None:
            return tuple(options[key]) if key in options else None

        return cls(
            name,
            str(options.get("queue") or f"render.{name}"),
            listed("models"),
            listed("controlnets"),
            options.get("max_pixels"),
            listed("quantize"),
            options.get("task_jobs") or (LOW_MEMORY_TASK_JOBS if options.get("low_memory") else None),
            listed("scorers"),
        )

    def refuses(self, needs: Needs) -> str | None:
        """Why this pool cannot serve these jobs, or None if it can."""
        if self.models is not None and needs.model not in self.models:
            return f"model {needs.model}"
        if needs.controlnet and self.controlnets is not None and needs.controlnet not in self.controlnets:
            return f"controlnet {needs.controlnet}"
        if self.max_pixels is not None and needs.pixels > self.max_pixels:
            return f"{needs.pixels} pixels (max {self.max_pixels})"
        if needs.scorer is not None and needs.scorer not in (self.scorers or ()):
            return f"scorer {needs.scorer}"
        mode = needs.quantize or "none"
        if self.quantize is not None and mode not in self.quantize:
            return f"quantize {mode}"
        return None


@dataclass(frozen=True)
class Route:
    """Where a group goes: a queue, or nowhere with the reason."""

    queue: str | None
    reason: str | None = None


class Router:
    """Chooses a queue for each group of jobs from the configured pools and the live workers."""

    def __init__(
        self,
        default_queue: str,
        pools: list[PoolSpec],
        live: Mapping[str, int],
        adapters: Mapping[str, set[str]],
        rates: Mapping[str | None, Sequence[float]] | None = None,
    ) -> None:
        self.default_queue = default_queue
        self.pools = pools
        self.live = live  # pool name → alive workers
        self.adapters = adapters  # pool name → ControlNet adapters its live workers hold
        # Pool name (None: workers without a pool) → the images/s of each of its alive workers (their heartbeats).
        self.rates: Mapping[str | None, Sequence[float]] = rates or {}
        # Queue → jobs/s its workers took from it lately, as the control loop's leader measured (workers/control.py):
        # a heartbeat's rate lags by a beat (FARM_LEASE_S/3), this by a second.
        self.drains: Mapping[str, float] = {}

    @classmethod
    def load(cls, engine: Engine, settings: Settings) -> Router:
        """The router for the settings' pools and the workers alive now."""
        pools = [PoolSpec.from_options(name, options) for name, options in settings.pools.items()]
        live: dict[str, int] = {}
        adapters: dict[str, set[str]] = {}
        rates: dict[str | None, list[float]] = {}
        for worker in list_workers(engine, beat_s=settings.lease_s / 3):
            if worker.state != "alive":
                continue
            rates.setdefault(worker.pool, []).append(max(0.0, float(worker.images_per_s)))
            if worker.pool:
                live[worker.pool] = live.get(worker.pool, 0) + 1
                adapters.setdefault(worker.pool, set()).update(worker.loaded.get("adapters", []))
        return cls(settings.queue, pools, live, adapters, rates)

    def task_jobs(self, queue: str, default: int) -> int:
        """Jobs per task message on `queue`: its pool's task_jobs, else `default` (FARM_BATCH_SIZE)."""
        return next((p.task_jobs for p in self.pools if p.queue == queue and p.task_jobs), default)

    def window(self, queue: str, batch_size: int, cap: int) -> int:
        """How many queued jobs `queue` may hold: for each live worker that consumes it, WINDOW_TASKS tasks, or
        as many as it renders in REFILL_S seconds (its heartbeat's images/s) plus the one it is about to take;
        one worker's share while none is alive; at least what the queue drained (drains) in REFILL_S seconds plus
        a task; never more than `cap` (FARM_DISPATCH_WINDOW)."""
        task = self.task_jobs(queue, batch_size)
        if self.pools:
            rates = [r for p in self.pools if p.queue == queue for r in self.rates.get(p.name, ())]
        else:
            rates = list(self.rates.get(None, ())) if queue == self.default_queue else []
        shares = [task * max(WINDOW_TASKS, 1 + math.ceil(rate * REFILL_S / task)) for rate in rates]
        drained = task * (1 + math.ceil(self.drains.get(queue, 0.0) * REFILL_S / task))
        return max(1, min(cap, max(sum(shares) or task * WINDOW_TASKS, drained)))

    def queues(self) -> list[str]:
        """Every queue dispatch may send to: each pool's, or the one shared queue."""
        return list(dict.fromkeys(p.queue for p in self.pools)) if self.pools else [self.default_queue]

    def pool_names(self) -> list[str]:
        """The configured pools' names, or NO_POOL when there are none."""
        return [p.name for p in self.pools] if self.pools else [NO_POOL]

    def pool_for(self, needs: Needs) -> str:
        """The pool that would take these jobs, for the pending-per-pool figures: the live pool dispatch picks,
        else the first pool that serves them (where a worker would have to be started), else NO_POOL_SERVES;
        NO_POOL when no pools are configured."""
        if not self.pools:
            return NO_POOL
        route = self.route(needs)
        if route.queue is not None:
            return next(p.name for p in self.pools if p.queue == route.queue)
        serving = [p for p in self.pools if p.refuses(needs) is None]
        return serving[0].name if serving else NO_POOL_SERVES

    def largest_task(self, default: int) -> int:
        """The most jobs any queue takes in one task: how many pending jobs dispatch groups together."""
        return max([default, *(p.task_jobs for p in self.pools if p.task_jobs)])

    def route(self, needs: Needs) -> Route:
        """A live pool that serves these needs, preferring one that already holds their ControlNet."""
        if not self.pools:
            return Route(self.default_queue)
        serving = [p for p in self.pools if p.refuses(needs) is None]
        if not serving:
            reasons = "; ".join(f"{p.name}: {p.refuses(needs)}" for p in self.pools)
            return Route(None, f"no pool serves these jobs ({reasons})")
        alive = [p for p in serving if self.live.get(p.name)]
        if not alive:
            names = ", ".join(p.name for p in serving)
            return Route(None, f"no live worker in the pools that can serve these jobs ({names})")
        alive.sort(key=lambda p: (needs.controlnet not in self.adapters.get(p.name, set()), -self.live[p.name], p.name))
        return Route(alive[0].queue)

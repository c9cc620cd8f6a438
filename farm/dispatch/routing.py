"""Routing jobs to pools: each pool says what it can serve; a job goes to a live pool that serves it.

Without pools in farm.toml everything goes to one queue (FARM_QUEUE), as before. With pools, each pool has
its own queue (`render.<pool>` unless it names one), and a job that no live pool can serve stays pending,
with the reason on the job, until such a pool comes alive (`farm dispatch`, the beat reaper).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from farm.settings import Settings
from farm.store.fleet import list_workers

LOW_MEMORY_TASK_JOBS = 64


@dataclass(frozen=True)
class Needs:
    """What a group of jobs requires of a pool."""

    model: str
    controlnet: str | None
    pixels: int
    quantize: str | None


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
        )

    def refuses(self, needs: Needs) -> str | None:
        """Why this pool cannot serve these jobs, or None if it can."""
        if self.models is not None and needs.model not in self.models:
            return f"model {needs.model}"
        if needs.controlnet and self.controlnets is not None and needs.controlnet not in self.controlnets:
            return f"controlnet {needs.controlnet}"
        if self.max_pixels is not None and needs.pixels > self.max_pixels:
            return f"{needs.pixels} pixels (max {self.max_pixels})"
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
        self, default_queue: str, pools: list[PoolSpec], live: Mapping[str, int], adapters: Mapping[str, set[str]]
    ) -> None:
        self.default_queue = default_queue
        self.pools = pools
        self.live = live  # pool name → alive workers
        self.adapters = adapters  # pool name → ControlNet adapters its live workers hold

    @classmethod
    def load(cls, engine: Engine, settings: Settings) -> Router:
        """The router for the settings' pools and the workers alive now."""
        pools = [PoolSpec.from_options(name, options) for name, options in settings.pools.items()]
        live: dict[str, int] = {}
        adapters: dict[str, set[str]] = {}
        if pools:
            for worker in list_workers(engine, beat_s=settings.lease_s / 3):
                if worker.state == "alive" and worker.pool:
                    live[worker.pool] = live.get(worker.pool, 0) + 1
                    adapters.setdefault(worker.pool, set()).update(worker.loaded.get("adapters", []))
        return cls(settings.queue, pools, live, adapters)

    def task_jobs(self, queue: str, default: int) -> int:
        """Jobs per task message on `queue`: its pool's task_jobs, else `default` (FARM_BATCH_SIZE)."""
        return next((p.task_jobs for p in self.pools if p.queue == queue and p.task_jobs), default)

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

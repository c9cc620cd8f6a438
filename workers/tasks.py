"""The render task: claim → render in batches with LCM → hand images to the upload pool → return.

Uploads, confirmation and the succeeded mark happen on the upload pool (workers/uploads.py) while the next
batch renders; the job's lease covers that gap, and the reaper covers a worker that dies inside it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from farm.job import Claimed
from farm.storage import StoredObject
from farm.store import transitions
from workers.metrics import METRICS
from workers.recording import record_batch
from workers.runtime import WorkerRuntime
from workers.uploads import Rendered

log = logging.getLogger("farm.worker")


@dataclass
class Outcome:
    """What one task did with the ids it carried (uploads may still be in flight when it returns)."""

    claimed: int = 0
    rendered: int = 0
    render_failed: int = 0
    skipped: int = 0  # not claimable: already done, running elsewhere, canceled, or out of attempts

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def render_jobs(rt: WorkerRuntime, job_ids: list[str], *, wait: bool = False) -> Outcome:
    """Render one task's jobs. Render failures are recorded per job; database errors propagate (retried).

    wait=True returns only once every image is stored and recorded (tests, shutdown).
    """
    # 1. Claim with one guarded UPDATE: a duplicate delivery finds nothing left to claim.
    with rt.engine.begin() as conn:
        claimed = transitions.claim(
            conn, job_ids, worker=rt.name, lease_s=rt.settings.lease_s, max_attempts=rt.settings.max_attempts
        )
        METRICS.observe_queue_wait(conn, [job.id for job in claimed])
    outcome = Outcome(claimed=len(claimed), skipped=len(job_ids) - len(claimed))
    rt.stats.claimed += len(claimed)
    rt.stats.skipped += outcome.skipped
    # 2. Render compatible jobs in batches of at most max_batch, one generator per image.
    for batch in _batches(claimed, rt.max_batch):
        rendered, failures = _render(rt, batch)
        outcome.rendered += len(rendered)
        outcome.render_failed += len(failures)
        if failures:
            METRICS.count_errors("render", len(failures))
            record_batch(rt, [], failures)
        # 3. Encode, upload, confirm and mark succeeded in the background; blocks when the pool is full.
        if rendered:
            rt.uploader.submit(rendered, lambda done, failed: _uploaded(rt, done, failed))
    if wait:
        rt.uploader.drain()
    return outcome


def _uploaded(
    rt: WorkerRuntime,
    done: list[tuple[Claimed, StoredObject, int]],
    failed: list[tuple[Claimed, BaseException]],
) -> None:
    METRICS.count_errors("upload", len(failed))
    record_batch(rt, done, failed)


def _batches(jobs: list[Claimed], size: int) -> Iterator[list[Claimed]]:
    groups: dict[tuple[object, ...], list[Claimed]] = {}
    for job in jobs:
        groups.setdefault(job.render_group, []).append(job)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


def _render(rt: WorkerRuntime, batch: list[Claimed]) -> tuple[list[Rendered], list[tuple[Claimed, BaseException]]]:
    """One pipeline call for the batch; if it fails, each job alone, so one bad job fails only itself."""
    from models.pipeline import RenderRequest, render_batch

    requests = [
        RenderRequest(
            prompt=j.prompt,
            seed=j.seed,
            width=j.width,
            height=j.height,
            num_inference_steps=j.num_inference_steps,
            guidance_scale=j.guidance_scale,
        )
        for j in batch
    ]
    try:
        first = batch[0]
        caches = rt.caches
        pipe = caches.pipelines.get(first.model, first.quantize)
        extra: dict[str, Any] = {}
        if first.controlnet:
            scale = first.conditioning_scale if first.conditioning_scale is not None else 1.0
            extra = {
                "controlnet": caches.adapter(first.controlnet, pipe),
                "conditions": caches.condition_latents(batch, pipe),
                "conditioning_scale": scale,
            }
        if pipe.text_encoder is None:  # 8-bit T5 or low-memory mode: embeddings go into the cache first
            caches.encode_missing_prompts(first, [r.prompt for r in requests])
        started = time.perf_counter()
        # T5 runs once per distinct prompt in this process: repeats (other seeds) come from the cache.
        # The deadline is checked between denoising steps: Celery's time limits do nothing on a solo pool.
        # RenderDeadlineExceeded fails the batch like any render error (then each job alone, its own deadline).
        images = render_batch(
            pipe,
            requests,
            prompt_cache=caches.prompts,
            model_key=caches.prompt_key(first),
            deadline_s=rt.settings.render_deadline_s or None,
            **extra,
        )
        per_image_s = (time.perf_counter() - started) / len(batch)
        per_image_ms = round(per_image_s * 1000)
    except Exception as exc:
        if len(batch) == 1:
            return [], [(batch[0], exc)]
        log.warning("batch of %d failed (%s); rendering its jobs one by one", len(batch), exc.__class__.__name__)
        rendered: list[Rendered] = []
        failures: list[tuple[Claimed, BaseException]] = []
        for job in batch:
            ok, bad = _render(rt, [job])
            rendered += ok
            failures += bad
        return rendered, failures
    rt.stats.rendered += len(batch)
    METRICS.observe_render(len(batch), per_image_s)
    rt.stats.render_ms += per_image_ms * len(batch)
    return [
        Rendered(j, rt.dataset_name(j.dataset_id), image, per_image_ms) for j, image in zip(batch, images, strict=True)
    ], []

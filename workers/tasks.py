"""The render task: claim → render in batches with LCM → hand images to the upload pool → return.

Uploads, confirmation and the succeeded mark happen on the upload pool (workers/uploads.py) while the next
batch renders; the job's lease covers that gap, and the reaper covers a worker that dies inside it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from farm.job import Claimed, Scores
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


def render_jobs(rt: WorkerRuntime, job_ids: list[str]) -> Outcome:
    """Render one task's jobs. Render failures are recorded per job; database errors propagate (retried).

    A message for jobs this incarnation already holds (or anyone does, under a live lease) claims nothing: it
    is a no-op. A worker whose heartbeat is failing, or that is shutting down, claims nothing either (the
    jobs stay queued, and the control loop sends them again). It returns while the upload pool may still be
    storing and recording the last batches (rt.uploader.drain() waits for them, as the worker's shutdown does).
    """
    if rt.stopping_at is not None or not rt.leases.healthy():
        log.warning(
            "not claiming %d jobs: %s", len(job_ids), "shutting down" if rt.stopping_at else "heartbeat failing"
        )
        return Outcome(skipped=len(job_ids))
    # 1. Claim with one guarded UPDATE: each claim takes the job's next claim_seq, the attempt's fence.
    with rt.engine.begin() as conn:
        claimed = transitions.claim(
            conn, job_ids, worker=rt.name, lease_s=rt.settings.lease_s, max_attempts=rt.settings.max_attempts
        )
        METRICS.observe_queue_wait(conn, [job.id for job in claimed])
        for dataset_id in {job.dataset_id for job in claimed}:
            rt.dataset_name(dataset_id, conn)
    rt.holdings.add([job.held for job in claimed])
    for job in claimed:
        rt.event("claimed", job.id, job.claim_seq)
    outcome = Outcome(claimed=len(claimed), skipped=len(job_ids) - len(claimed))
    rt.stats.claimed += len(claimed)
    rt.stats.skipped += outcome.skipped
    # 2. Render compatible jobs in batches of at most max_batch, one generator per image.
    batches = list(_batches(claimed, rt.max_batch))
    try:
        # Every new prompt of the task encoded first, with one T5 load (low-memory mode: T5 alone on the device,
        # freed before the transformer and VAE are placed: the paper's 8 GB order).
        rt.caches.prepare(claimed)
        _render_batches(rt, batches, outcome)
    except BaseException:
        # Whatever was not handed to the upload pool or recorded must not stay held (renewed for ever): back to
        # pending if the database can say so, else its lease expires and the reaper takes it.
        held = dict(rt.holdings.snapshot())
        handed = rt.uploader.holding()
        _release(rt, [job for batch in batches for job in batch if job.id in held and job.id not in handed])
        raise
    return outcome


def _render_batches(rt: WorkerRuntime, batches: list[list[Claimed]], outcome: Outcome) -> None:
    last_batch_s = 0.0
    for index, batch in enumerate(batches):
        grace = rt.grace_left()
        if grace is not None and grace < last_batch_s:
            # SIGTERM: what does not fit in the grace period goes back to pending now, not at lease expiry.
            _release(rt, [job for rest in batches[index:] for job in rest])
            break
        started = time.monotonic()
        rendered, failures, interrupted = _render(rt, batch)
        last_batch_s = time.monotonic() - started
        outcome.rendered += len(rendered)
        outcome.render_failed += len(failures)
        if interrupted:
            _release(rt, interrupted)
        if failures:
            METRICS.count_errors("render", len(failures))
            record_batch(rt, [], failures)
        # 3. Encode, upload, confirm and mark succeeded in the background; blocks when the pool is full.
        if rendered:
            rt.uploader.submit(rendered)  # recorded by workers.recording.record_stored (alone or grouped)


def release_held(rt: WorkerRuntime) -> None:
    """At shutdown: every job still held (unrendered, or its upload unfinished) goes back to pending now."""
    held = dict(rt.holdings.snapshot())
    if not held:
        return
    try:
        with rt.engine.begin() as conn:
            released = set(transitions.release(conn, worker=rt.name, held=list(held.items())))
    except Exception:
        log.exception("could not hand %d jobs back; their leases expire and the reaper does", len(held))
        return
    for job_id, seq in held.items():
        rt.event("released" if job_id in released else "lost", job_id, seq)
    rt.holdings.drop(list(held))
    log.info("handed %d unfinished jobs back to pending", len(released))


def _release(rt: WorkerRuntime, jobs: list[Claimed]) -> None:
    """Hand held jobs back to pending (not counted as an attempt), or drop the ones that are no longer ours."""
    lost = [job for job in jobs if rt.holdings.is_lost(job.id)]
    mine = [job for job in jobs if not rt.holdings.is_lost(job.id)]
    try:
        with rt.engine.begin() as conn:
            released = set(transitions.release(conn, worker=rt.name, held=[job.held for job in mine]))
    except Exception:
        log.exception("could not hand %d jobs back; their leases expire and the reaper does", len(mine))
        released = set()
    for job in mine:
        rt.event("released" if job.id in released else "lost", job.id, job.claim_seq)
    for job in lost:
        rt.event("canceled", job.id, job.claim_seq)
    rt.holdings.drop([job.id for job in jobs])


def _batches(jobs: list[Claimed], size: int) -> Iterator[list[Claimed]]:
    groups: dict[tuple[object, ...], list[Claimed]] = {}
    for job in jobs:
        groups.setdefault(job.render_group, []).append(job)
    for group in groups.values():
        for start in range(0, len(group), size):
            yield group[start : start + size]


def _render(
    rt: WorkerRuntime, batch: list[Claimed]
) -> tuple[list[Rendered], list[tuple[Claimed, BaseException]], list[Claimed]]:
    """One pipeline call for the batch; if it fails, each job alone, so one bad job fails only itself.

    Returns the rendered images, the failures, and the jobs whose render was interrupted (all of the batch's
    jobs canceled, or the shutdown grace period over): those are neither failed nor rendered.
    """
    from models.pipeline import RenderInterrupted, RenderRequest
    from models.recipe import recipe_json

    render_batch, render_recipe = rt.caches.renderer()  # the model's, or `--renderer null`'s (models/null.py)

    def interrupt() -> str | None:
        if all(rt.holdings.is_lost(job.id) for job in batch):
            return "its jobs were canceled or taken over"
        grace = rt.grace_left()
        if grace is not None and grace <= 0:
            return "the worker's shutdown grace period is over"
        return None

    requests = [
        RenderRequest(
            prompt=j.prompt,
            seed=j.seed,
            width=j.width,
            height=j.height,
            num_inference_steps=j.num_inference_steps,
            guidance_scale=j.guidance_scale,
            negative_prompt=j.negative_prompt,
            timesteps=j.timesteps,
        )
        for j in batch
    ]
    try:
        first = batch[0]
        caches = rt.caches
        pipe = caches.pipelines.get(first.model, first.quantize)
        extra: dict[str, Any] = {}
        if first.controlnet and not caches.null:  # the null renderer ignores conditions (its recipe says so)
            scale = first.conditioning_scale if first.conditioning_scale is not None else 1.0
            extra = {
                "controlnet": caches.adapter(first.controlnet, pipe),
                "conditions": caches.condition_latents(batch, pipe),
                "conditioning_scale": scale,
            }
        if pipe.text_encoder is None:  # 8-bit T5 or low-memory mode: embeddings go into the cache first
            texts = [r.prompt for r in requests] + [r.negative_prompt or "" for r in requests if r.cfg]
            caches.encode_missing_prompts(first, texts)
        recipe = recipe_json(
            render_recipe(
                pipe,
                requests[0],
                quantize=first.quantize,
                controlnet=first.controlnet,
                control_preprocess=first.control_preprocess,
            )
        )
        started = time.perf_counter()
        for job in batch:
            rt.event("render_start", job.id, job.claim_seq)
        # T5 runs once per distinct prompt in this process: repeats (other seeds) come from the cache.
        # The deadline is checked between denoising steps: Celery's time limits do nothing on a solo pool.
        # RenderDeadlineExceeded fails the batch like any render error (then each job alone, its own deadline).
        images = render_batch(
            pipe,
            requests,
            prompt_cache=caches.prompts,
            model_key=caches.prompt_key(first),
            deadline_s=rt.settings.render_deadline_s or None,
            interrupt=interrupt,
            **extra,
        )
        per_image_s = (time.perf_counter() - started) / len(batch)
        per_image_ms = round(per_image_s * 1000)
        # Scored right after decode, as one batch on the same device (a yield-targeted line's tries).
        scores = _score(rt, batch, images)
    except RenderInterrupted as exc:
        log.info("%s", exc)
        return [], [], list(batch)
    except Exception as exc:
        if len(batch) == 1:
            return [], [(batch[0], exc)], []
        log.warning("batch of %d failed (%s); rendering its jobs one by one", len(batch), exc.__class__.__name__)
        rendered: list[Rendered] = []
        failures: list[tuple[Claimed, BaseException]] = []
        interrupted: list[Claimed] = []
        for job in batch:
            ok, bad, stopped = _render(rt, [job])
            rendered += ok
            failures += bad
            interrupted += stopped
        return rendered, failures, interrupted
    rt.stats.rendered += len(batch)
    METRICS.observe_render(len(batch), per_image_s, flops_per_image=_image_flops(pipe, requests[0]))
    rt.stats.render_ms += per_image_ms * len(batch)
    for job in batch:
        rt.event("render_end", job.id, job.claim_seq)
    return (
        [
            Rendered(j, rt.dataset_name(j.dataset_id), image, per_image_ms, recipe, score)
            for j, image, score in zip(batch, images, scores, strict=True)
        ],
        [],
        [],
    )


def _image_flops(pipe: Any, request: Any) -> float | None:
    """FLOPs of one image of this batch, counted from the model's config (models/flops.py), for render_mfu."""
    from models.flops import image_flops

    return image_flops(pipe, request.width, request.height, request.num_inference_steps, cfg=request.cfg)


def _score(rt: WorkerRuntime, batch: list[Claimed], images: list[Any]) -> list[Scores | None]:
    """Each image's scores: the batch's scorer (one CLIP pass for every score), or the pixels' hash alone for tries
    of lines without a scorer; None for jobs that are neither scored nor in a line."""
    first = batch[0]  # the scorer is a render-group field: the whole batch shares it
    if first.scorer is None:
        if all(job.line_id is None for job in batch):
            return [None] * len(batch)
        from models.scoring import pixel_sha256

        return [Scores(pixel_sha256(image)) if job.line_id else None for job, image in zip(batch, images, strict=True)]
    scorers = rt.caches.scorers(first.scorer)
    started = time.perf_counter()
    results = scorers.score(images, [job.prompt for job in batch])
    METRICS.observe_scores(rt.pool or "", results, (time.perf_counter() - started) / len(batch))
    models = json.dumps(scorers.model_ids, sort_keys=True)
    return [
        Scores(
            pixel_sha256=r.pixel_sha256,
            clip_score=r.clip_score,
            aesthetic_score=r.aesthetic,
            nsfw=r.nsfw,
            embedding=r.embedding,
            models=models,
        )
        for r in results
    ]

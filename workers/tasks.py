"""The render task: claim → render with LCM → encode → upload and confirm → mark succeeded."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from kombu.exceptions import OperationalError as KombuOperationalError

from farm import states
from farm.broker import RENDER_TASK
from farm.schema import JobStatus
from farm.storage import StoredObject, object_key
from workers.images import encode_png
from workers.runtime import WorkerRuntime

log = logging.getLogger("farm.worker")


@dataclass
class Outcome:
    """What one task did with the ids it carried."""

    succeeded: int = 0
    retrying: int = 0
    failed: int = 0
    skipped: int = 0  # not claimable: already done, running elsewhere, canceled, or out of attempts
    lost: int = 0  # rendered, but the job was taken from this worker meanwhile (canceled or reaped)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def render_jobs(rt: WorkerRuntime, job_ids: list[str]) -> Outcome:
    """Render the jobs of one task. Failures are recorded per job; database errors propagate (retried)."""
    settings = rt.settings
    # 1. Claim with a guarded UPDATE: a duplicate delivery finds nothing left to claim.
    with rt.engine.begin() as conn:
        claimed = states.claim(
            conn, job_ids, worker=rt.name, lease_s=settings.lease_s, max_attempts=settings.max_attempts
        )
    outcome = Outcome(skipped=len(job_ids) - len(claimed))
    for job in claimed:
        # 2-3. Render, encode and upload; any failure of this job is recorded on this job.
        try:
            stored, render_ms = _render_and_store(rt, job)
        except Exception as exc:
            _record_failure(rt, job, exc, outcome)
            continue
        # 4. Succeeded only now that the object is confirmed.
        with rt.engine.begin() as conn:
            marked = states.mark_succeeded(conn, job.id, worker=rt.name, stored=stored, render_ms=render_ms)
        if marked:
            outcome.succeeded += 1
            log.info("job %s succeeded in %d ms -> %s", job.id, render_ms, stored.uri)
        else:
            outcome.lost += 1
            log.warning(
                "job %s was canceled or reaped while rendering; its object %s is left for the "
                "next attempt to overwrite",
                job.id,
                stored.uri,
            )
    return outcome


def _render_and_store(rt: WorkerRuntime, job: states.Claimed) -> tuple[StoredObject, int]:
    from models.pipeline import RenderRequest, render

    pipe = rt.pipelines.get(job.model)
    started = time.perf_counter()
    image = render(
        pipe,
        RenderRequest(
            prompt=job.prompt,
            seed=job.seed,
            width=job.width,
            height=job.height,
            num_inference_steps=job.num_inference_steps,
            guidance_scale=job.guidance_scale,
        ),
    )
    render_ms = round((time.perf_counter() - started) * 1000)
    data = encode_png(image, job)
    key = object_key(rt.storage.prefix, rt.dataset_name(job.dataset_id), job.id)
    stored = rt.storage.put(key, data, metadata={"job_id": job.id, "seed": str(job.seed)})
    return stored, render_ms


def _record_failure(rt: WorkerRuntime, job: states.Claimed, exc: Exception, outcome: Outcome) -> None:
    settings = rt.settings
    error = f"{exc.__class__.__name__}: {exc}"
    with rt.engine.begin() as conn:
        state = states.mark_attempt_failed(
            conn, job.id, worker=rt.name, error=error, max_attempts=settings.max_attempts
        )
    if state is JobStatus.FAILED:
        outcome.failed += 1
        log.error("job %s failed after %d attempts: %s", job.id, job.attempts, error)
        return
    if state is None:
        outcome.lost += 1
        return
    outcome.retrying += 1
    delay = min(settings.retry_backoff_s * 2 ** (job.attempts - 1), settings.retry_backoff_max_s)
    log.warning("job %s attempt %d failed (%s); retrying in %d s", job.id, job.attempts, error, delay)
    try:
        rt.app.send_task(RENDER_TASK, args=[[job.id]], queue=settings.queue, countdown=delay)
    except (KombuOperationalError, OSError):
        # The broker is away: put the job back to pending so `farm dispatch` sends it again.
        with rt.engine.begin() as conn:
            states.mark_pending(conn, [job.id])
        log.error("job %s could not be re-queued (broker unreachable); left pending for `farm dispatch`", job.id)

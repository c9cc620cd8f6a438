"""A whole submission, as `farm submit` and `farm.Client` run it: plan → store conditions → record.

plan.py validates and expands, record.py writes; this module strings the steps together and says what happened.
Publishing is not a submit's step: the workers' control-loop leader sends pending jobs into the broker's window
within a second of their recording (workers/control.py), highest priority first. `dispatch=True` (`farm submit
--dispatch`) also publishes a window now, as `farm dispatch` does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine

from farm.errors import InvalidSubmission
from farm.storage import storage_for
from farm.store import transitions
from farm.submit.inputs import NEGATIVE_PROMPT_NOTE
from farm.submit.plan import Plan, SubmitOptions, plan_submission, store_conditions
from farm.submit.record import record

if TYPE_CHECKING:
    from farm.dispatch.publish import Dispatched
    from farm.settings import Settings

Echo = Callable[[str], None]
SAMPLE_JOBS = 5  # jobs a dry run shows


@dataclass(frozen=True)
class SubmitResult:
    """What a submission did; a dry run writes nothing, so its new_jobs and already_present are 0."""

    dataset: str
    planned: int  # jobs the rows (and grid) expand to, duplicates included
    jobs: int  # distinct jobs
    duplicates: int
    conditions: int  # distinct condition images: stored, or to be stored in a dry run
    negative_prompts: int  # rows whose negative_prompt was ignored
    dry_run: bool = False
    dataset_id: int | None = None  # None in a dry run
    new_jobs: int = 0
    already_present: int = 0
    dispatched: int | None = None  # jobs published to the broker; None when not dispatched
    tasks: int | None = None
    plan: Plan | None = field(default=None, repr=False, compare=False)


def choose_model(
    settings: Settings,
    dataset: str,
    model: str | None,
    *,
    controlnet: str | None = None,
    engine: Engine | None = None,
    read_store: bool = True,
) -> str | None:
    """`--model` as given; None when a controlnet profile names its own base model (the plan takes it); else the
    dataset's own model (a submit into a dataset adds to its model); else the configured default
    (FARM_DEFAULT_MODEL, the PixArt-δ release). Reads the job store, if there is one yet and `read_store` (a dry
    run reads no database, so it shows the default)."""
    from farm.profiles import CONTROLNET_PROFILES

    if model is not None:
        return model
    adapter = CONTROLNET_PROFILES.get(controlnet or "")
    if adapter is not None and adapter.base_model is not None:
        return None
    fresh = engine is None and settings.embedded
    if not read_store or (fresh and not Path(settings.database_url.removeprefix("sqlite:///")).is_file()):
        return settings.default_model  # a fresh machine: no job store, no dataset to follow
    from farm.store.engine import open_store
    from farm.store.queries import dataset_model

    store = engine if engine is not None else open_store(settings)  # unreachable: DatabaseUnavailable, exit 3
    try:
        return dataset_model(store, dataset) or settings.default_model
    finally:
        if engine is None:
            store.dispose()


def weights_notice(settings: Settings, model: str) -> str | None:
    """A line to show (without blocking) when a profile's weights are not on this machine."""
    from farm.profiles import PROFILES, weights_present

    profile = PROFILES.get(model)
    if profile is None or weights_present(profile, settings):
        return None
    size = f" (≈ {profile.download_gb:g} GB)" if profile.download_gb else ""
    return (
        f"note: {model}'s weights are not on this machine; workers fetch {profile.hub_id}{size} from the hub on "
        f"first use (or copy a diffusers folder to {settings.models_dir / model}); `farm doctor` checks it"
    )


def submit_file(
    settings: Settings,
    path: Path,
    options: SubmitOptions,
    *,
    dispatch: bool = False,
    dry_run: bool = False,
    echo: Echo | None = None,
    priority: int | None = None,
) -> SubmitResult:
    """`farm submit`: plan the file, then submit_plan. Nothing is written unless every row is valid."""
    plan = plan_submission(path, options)
    return submit_plan(settings, plan, dispatch=dispatch, dry_run=dry_run, echo=echo, priority=priority)


def submit_plan(
    settings: Settings,
    plan: Plan,
    *,
    dispatch: bool = False,
    dry_run: bool = False,
    echo: Echo | None = None,
    engine: Engine | None = None,
    priority: int | None = None,
) -> SubmitResult:
    """Report the job count, then (unless a dry run) store condition images and record the jobs as pending; the
    workers' leader sends them. With `dispatch`, also publish a window now (the broker down: BrokerUnavailable,
    the jobs stay pending).

    Progress lines go to `echo`; the first, the job count, comes before anything is written. A dry run
    touches no database, storage or broker; without `dispatch` the broker is never touched.
    """
    if priority is not None and not 0 <= priority <= 9:
        raise InvalidSubmission(f"priority must be between 0 and 9, got {priority}", field="priority", value=priority)
    say = echo or _silent
    for line in summary_lines(plan):
        say(line)
    for model in dict.fromkeys(spec.model for spec in plan.specs):
        notice = weights_notice(settings, model)
        if notice is not None:
            say(notice)
    result = SubmitResult(
        plan.dataset,
        plan.planned,
        len(plan.specs),
        plan.duplicates,
        len(plan.conditions),
        plan.negative_prompts,
        dry_run=dry_run,
        plan=plan,
    )
    if dry_run:
        for line in dry_run_lines(plan):
            say(line)
        return result
    if dispatch:
        from farm.dispatch.broker import make_celery

        make_celery(settings)  # a broker URL kombu cannot use is an error now, before anything is written
    # 1. Condition images first: a recorded job must never name one that is not stored.
    started = time.perf_counter()
    if plan.conditions:
        plan = store_conditions(plan, storage_for(settings))
        say(f"{len(plan.conditions)} condition images stored")
    # 2. One transaction for the dataset and its jobs.
    from farm.store.engine import open_store

    own_engine = engine is None
    store = open_store(settings) if engine is None else engine
    try:
        recorded = record(store, plan)
        note = f" ({plan.duplicates} duplicate rows folded)" if plan.duplicates else ""
        say(
            f"dataset {recorded.dataset}: {recorded.new_jobs} new jobs, {recorded.already_present} "
            f"already present{note}, recorded in {time.perf_counter() - started:.2f} s"
        )
        result = replace(
            result,
            plan=plan,
            dataset_id=recorded.dataset_id,
            new_jobs=recorded.new_jobs,
            already_present=recorded.already_present,
        )
        if priority is not None:
            with store.begin() as conn:
                transitions.set_priority(conn, recorded.dataset_id, priority)
        if not dispatch:
            say(_who_sends(store))
            return result
        # 3. Publish a window of pending jobs (ids only) now and mark them queued.
        sent = dispatch_dataset(settings, store, recorded.dataset_id, echo=say)
        return replace(result, dispatched=sent.jobs, tasks=sent.tasks)
    finally:
        if own_engine:
            store.dispose()


def _who_sends(engine: Engine) -> str:
    """What happens to the recorded jobs next: a running worker's leader sends them, or nobody yet."""
    from farm.store.control import leader_alive

    if leader_alive(engine):
        return "the workers' dispatcher sends them to the broker within a second, as their window has room"
    return (
        "no worker is running: the jobs wait as pending until `farm worker` starts "
        "(its dispatcher sends them; `farm dispatch` publishes a window now)"
    )


def dispatch_dataset(
    settings: Settings, engine: Engine, dataset_id: int | None, *, echo: Echo | None = None
) -> Dispatched:
    """Publish the pending jobs of one dataset (or all), reporting how many went out."""
    from farm.dispatch.broker import make_celery
    from farm.dispatch.publish import dispatch_pending

    started = time.perf_counter()
    sent = dispatch_pending(engine, make_celery(settings), settings, dataset_id=dataset_id)
    (echo or _silent)(sent.describe(time.perf_counter() - started))
    return sent


def summary_lines(plan: Plan) -> list[str]:
    """The job count (`12 prompts × 16 variations = 192 jobs`) and notes, shown before anything is written."""
    terms = [f"{plan.rows} prompts"]
    uniform = plan.rows * plan.images_per_prompt * plan.variations == plan.planned
    if plan.images_per_prompt != 1 and uniform:
        terms.append(f"{plan.images_per_prompt} images")
    if plan.variations != 1:
        terms.append(f"{plan.variations} variations")
    count = " × ".join(terms) + f" = {plan.planned} jobs"
    if not uniform:
        count += " (rows set their own images_per_prompt)"
    if plan.duplicates:
        count += f", {len(plan.specs)} distinct ({plan.duplicates} duplicates folded)"
    lines = [count]
    if plan.lines:
        rules = {line.rules.describe(): None for line in plan.lines}
        shown = next(iter(rules)) if len(rules) == 1 else f"{len(rules)} sets of rules (rows set their own)"
        lines.append(f"{len(plan.lines)} yield-targeted lines, each wants {shown}")
    lines += [f"note: {note}" for note in plan.notes]
    if plan.negative_prompts:
        lines.append(f"note: {NEGATIVE_PROMPT_NOTE} ({plan.negative_prompts} rows had one)")
    return lines


def dry_run_lines(plan: Plan, samples: int = SAMPLE_JOBS) -> list[str]:
    """What a dry run shows: the condition images it would store and a few of the jobs."""
    lines = ["dry run: nothing written (no database, storage or broker was touched)"]
    if plan.conditions:
        lines.append(f"{len(plan.conditions)} condition images would be stored:")
        lines += [f"  {image.path} ({image.format}, sha256 {image.sha256[:12]})" for image in plan.conditions]
    lines.append(f"first {min(samples, len(plan.specs))} of {len(plan.specs)} jobs:")
    for spec, job_id in zip(plan.specs[:samples], plan.ids, strict=False):
        control = f"  control {spec.control_sha256[:12]} × {spec.conditioning_scale}" if spec.control_sha256 else ""
        prompt = spec.prompt if len(spec.prompt) <= 60 else spec.prompt[:59] + "…"
        lines.append(
            f"  {job_id[:12]}  line {spec.source_line}  seed {spec.seed}  {spec.width}x{spec.height}  "
            f"steps {spec.num_inference_steps}  guidance {spec.guidance_scale}{control}  {prompt!r}"
        )
    return lines


def _silent(_line: str) -> None:
    """An echo that drops the line (farm.Client reports through its return value)."""

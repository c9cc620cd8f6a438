"""The `farm` command: parse, call the library, print. Heavy parts (torch, Celery workers) load only in
the commands that run them, so `farm submit` and `farm status` start instantly."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from farm.cli.common import dispatch_or_warn, errors, exit_broker_down, settings_of
from farm.errors import BrokerUnavailable
from farm.settings import load_settings, with_overrides
from farm.store.schema import JobStatus

F = TypeVar("F", bound=Callable[..., Any])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="State folder for the embedded default (FARM_HOME, default ./.farm).",
)
@click.pass_context
def main(ctx: click.Context, home: Path | None) -> None:
    """PixArt-δ render farm: submit prompt files, render them on GPU workers, collect the dataset."""
    with errors():
        ctx.obj = load_settings(home=str(home) if home else None)


# ---- submit / dispatch ------------------------------------------------------------------------------


@main.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--dataset", required=True, help="Dataset name (letters, digits, '.', '_', '-').")
@click.option("--model", default=None, help="Profile name (tiny, pixart-lcm-1024), local folder or hub id.")
@click.option("--width", type=int, default=None, help="Image width in pixels (default: the model's size).")
@click.option("--height", type=int, default=None, help="Image height in pixels (default: the model's size).")
@click.option(
    "--steps",
    "num_inference_steps",
    type=int,
    default=4,
    show_default=True,
    help="LCM denoising steps (num_inference_steps).",
)
@click.option(
    "--guidance-scale",
    type=float,
    default=0.0,
    show_default=True,
    help="Classifier-free guidance; 0 for the LCM model, which has guidance distilled in.",
)
@click.option("--images-per-prompt", type=int, default=1, show_default=True, help="Images (seeds) per prompt.")
@click.option(
    "--seed",
    type=int,
    default=0,
    show_default=True,
    help="Base seed; every image gets its own seed derived from it, stored on the job.",
)
@click.option(
    "--control-image",
    type=click.Path(path_type=Path),
    default=None,
    help="Condition image (edge map) for rows without their own control_image field; needs --controlnet.",
)
@click.option(
    "--controlnet",
    default=None,
    help="ControlNet adapter: profile (pixart-hed-controlnet, tiny-controlnet), diffusers folder, "
    ".pth/.safetensors checkpoint or hub id.",
)
@click.option(
    "--conditioning-scale",
    type=float,
    default=1.0,
    show_default=True,
    help="Strength of the control (0-2) for rows without their own conditioning_scale.",
)
@click.option(
    "--quantize",
    type=click.Choice(["none", "int8"]),
    default="none",
    show_default=True,
    help="int8: 8-bit T5 (and transformer on CUDA) through bitsandbytes, for low GPU memory.",
)
@click.option(
    "--vary",
    multiple=True,
    metavar="AXIS=VALUES",
    help="Grid axis, repeatable; every prompt is rendered for each combination. Axes: seed (0..7 or 1,5,9), "
    "size (1024x1024,768x1344), steps (2..4), guidance_scale and conditioning_scale (comma lists).",
)
@click.option("--dry-run", is_flag=True, help="Validate and show the plan; write nothing, send nothing.")
@click.option("--no-dispatch", is_flag=True, help="Record the jobs as pending without publishing them.")
@click.option(
    "--priority",
    type=click.IntRange(0, 9),
    default=None,
    help="Dataset priority, 0-9, higher first (default 0; given again, it changes for jobs not yet sent).",
)
@click.pass_context
def submit(
    ctx: click.Context,
    file: Path,
    dataset: str,
    model: str | None,
    width: int | None,
    height: int | None,
    num_inference_steps: int,
    guidance_scale: float,
    images_per_prompt: int,
    seed: int,
    control_image: Path | None,
    controlnet: str | None,
    conditioning_scale: float,
    quantize: str,
    vary: tuple[str, ...],
    dry_run: bool,
    no_dispatch: bool,
    priority: int | None,
) -> None:
    """Validate FILE (.txt, .jsonl, .csv, .parquet), show the job count, store conditions, record, dispatch."""
    from farm.submit.plan import SubmitOptions
    from farm.submit.run import submit_file

    settings = settings_of(ctx)
    with errors():
        options = SubmitOptions(
            dataset=dataset,
            model=model or settings.default_model,
            width=width,
            height=height,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            images_per_prompt=images_per_prompt,
            seed=seed,
            control_image=control_image,
            controlnet=controlnet,
            conditioning_scale=conditioning_scale,
            quantize=None if quantize == "none" else quantize,
            vary=vary,
        )
        try:
            submit_file(
                settings, file, options, dispatch=not no_dispatch, dry_run=dry_run, echo=click.echo, priority=priority
            )
        except BrokerUnavailable as exc:
            exit_broker_down(exc)
        if no_dispatch and not dry_run:
            click.echo("not dispatched (--no-dispatch): run `farm dispatch` to send them")


@main.command()
@click.option("--dataset", default=None, help="Only this dataset (default: every dataset).")
@click.pass_context
def dispatch(ctx: click.Context, dataset: str | None) -> None:
    """Publish pending jobs to the broker (after a broker outage, or a --no-dispatch submit)."""
    from farm.store.engine import open_store
    from farm.store.queries import dataset_id

    settings = settings_of(ctx)
    with errors():
        engine = open_store(settings)
        ds_id = dataset_id(engine, dataset) if dataset else None
        dispatch_or_warn(settings, engine, ds_id)


@main.command()
@click.pass_context
def reap(ctx: click.Context) -> None:
    """Return jobs whose worker died (lease expired) to the queue, or fail them after the last attempt."""
    from farm.store.engine import open_store
    from farm.store.transitions import reap_expired

    settings = settings_of(ctx)
    with errors():
        engine = open_store(settings)
        with engine.begin() as conn:
            reaped = reap_expired(conn, max_attempts=settings.max_attempts)
        click.echo(f"reaped {len(reaped.requeued)} jobs back to the queue, {len(reaped.failed)} failed")
        dispatch_or_warn(settings, engine, None)


# ---- worker -------------------------------------------------------------------------------------------


@main.command()
@click.option(
    "--pool", default=None, help="Take this worker's options from [pools.NAME] in farm.toml (options given here win)."
)
@click.option("--device", default=None, help="Device: auto, cpu, cuda or cuda:N (FARM_DEVICE).")
@click.option("--dtype", default=None, help="auto, float16, bfloat16 or float32 (FARM_DTYPE).")
@click.option("--queue", default=None, help="Broker queue to consume (FARM_QUEUE, default render).")
@click.option("--name", default=None, help="Worker name (default host:pid).")
@click.option("--torch-threads", type=int, default=None, help="CPU threads for torch (default: torch's).")
@click.option(
    "--max-batch",
    type=click.IntRange(min=1),
    default=None,
    help="Most images per pipeline call on this worker (default FARM_BATCH_SIZE); lower it to fit memory.",
)
@click.option(
    "--io-threads",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Threads that encode and upload PNGs while the next batch renders.",
)
@click.option(
    "--low-memory",
    is_flag=True,
    help="The 8 GB recipe: T5 in 8-bit, loaded only to encode new prompts and freed before rendering.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(min=0, max=65535),
    default=0,
    show_default=True,
    help="Serve Prometheus metrics on this port at /metrics (0: off).",
)
@click.option(
    "--beat", is_flag=True, help="Also run the reaper on a schedule (start exactly one worker of the fleet with this)."
)
@click.option("--loglevel", default="INFO", show_default=True, help="Logging level.")
@click.pass_context
def worker(
    ctx: click.Context,
    pool: str | None,
    device: str | None,
    dtype: str | None,
    queue: str | None,
    name: str | None,
    torch_threads: int | None,
    max_batch: int | None,
    io_threads: int,
    low_memory: bool,
    metrics_port: int,
    beat: bool,
    loglevel: str,
) -> None:
    """Run one render worker (one process per GPU); SIGTERM finishes the current task, then exits."""
    with errors():
        if pool:
            # A pool's values fill in every option not given on the command line.
            given = {
                k: v
                for k, v in ctx.params.items()
                if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT
            }
            merged = {**ctx.params, **settings_of(ctx).pool(pool), **given}
            device, dtype, queue = merged["device"], merged["dtype"], merged["queue"]
            max_batch, io_threads = merged["max_batch"], merged["io_threads"]
            low_memory, metrics_port = merged["low_memory"], merged["metrics_port"]
            if queue is None:  # a pool consumes its own queue, where dispatch routes the jobs it serves
                from farm.dispatch.routing import PoolSpec

                queue = PoolSpec.from_options(pool, merged).queue
        settings = with_overrides(settings_of(ctx), device=device, dtype=dtype, queue=queue)
        from farm.store.engine import open_store

        open_store(settings).dispose()  # fail now, in plain words, if the database is unusable
        # Imported here, not at the top: farm's own modules never import workers, torch or diffusers.
        from workers.main import run_worker

        run_worker(
            settings,
            name=name,
            loglevel=loglevel,
            torch_threads=torch_threads,
            max_batch=max_batch,
            io_threads=io_threads,
            low_memory=low_memory,
            beat=beat,
            metrics_port=metrics_port,
            pool=pool,
        )


# ---- status / jobs ------------------------------------------------------------------------------------


@main.command()
@click.argument("dataset", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON with a `counts` map, for scripts.")
@click.option("--watch", is_flag=True, help="Redraw progress bars (one per dataset) until they are finished.")
@click.option("--interval-s", type=float, default=1.0, show_default=True, help="Seconds between redraws.")
@click.pass_context
def status(ctx: click.Context, dataset: str | None, as_json: bool, watch: bool, interval_s: float) -> None:
    """Counts per state, images/s and ETA, for one dataset or all."""
    from farm.store.engine import open_store
    from farm.store.queries import all_statuses, dataset_status, pool_progress

    settings = settings_of(ctx)
    with errors():
        engine = open_store(settings)
        if watch:
            from farm.cli.watch import watch_datasets

            # One bar per dataset: the named one, or every dataset unfinished when the watch starts.
            names = [dataset] if dataset else [s.name for s in all_statuses(engine) if not s.done]

            def read() -> list[Any]:
                return [dataset_status(engine, name) for name in names]

            def read_pools() -> list[Any]:
                return pool_progress(engine, names, beat_s=settings.lease_s / 3)

            _print_statuses(watch_datasets(read, interval_s=interval_s, read_pools=read_pools), as_json)
            return
        statuses = [dataset_status(engine, dataset)] if dataset else all_statuses(engine)
        _print_statuses(statuses, as_json)


def _print_statuses(statuses: list[Any], as_json: bool) -> None:
    if as_json:
        payload = statuses[0].as_dict() if len(statuses) == 1 else [s.as_dict() for s in statuses]
        click.echo(json.dumps(payload))
        return
    if not statuses:
        click.echo("no datasets yet: `farm submit FILE --dataset NAME`")
    for s in statuses:
        counts = "  ".join(f"{state} {s.counts[state.value]}" for state in JobStatus)
        eta = "-" if s.eta_s is None else f"{s.eta_s:.0f} s"
        click.echo(f"{s.name}: {s.finished}/{s.total} finished  |  {counts}  |  {s.images_per_s:.2f} img/s  ETA {eta}")
        for reason, n in s.unroutable.items():
            click.echo(f"  unroutable {n}: {reason}")


@main.command()
@click.argument("dataset")
@click.option("--state", type=click.Choice([s.value for s in JobStatus]), default=None, help="Only jobs in this state.")
@click.option("--limit", type=int, default=50, show_default=True, help="At most this many jobs.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_context
def jobs(ctx: click.Context, dataset: str, state: str | None, limit: int, as_json: bool) -> None:
    """List a dataset's jobs with their state, attempts, output and error."""
    from farm.store.engine import open_store
    from farm.store.queries import list_jobs

    with errors():
        rows = list_jobs(open_store(settings_of(ctx)), dataset, state=state, limit=limit)
    for row in rows:
        if as_json:
            click.echo(json.dumps(row.__dict__))
            continue
        tail = row.error if row.error else (row.output_uri or "")
        click.echo(
            f"{row.id}  {row.status:<9} attempts={row.attempts}  line {row.source_line}  seed {row.seed}  {tail}"
        )


@main.command("config")
@click.pass_context
def show_config(ctx: click.Context) -> None:
    """Print the effective settings, secrets masked."""
    for key, value in settings_of(ctx).describe().items():
        click.echo(f"{key} = {value}")


@main.command("workers")
@click.option("--all", "show_all", is_flag=True, help="Include workers that stopped cleanly.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per worker.")
@click.pass_context
def workers_command(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """The fleet: each worker's pool, device, state (alive or stale), jobs, images/s and what it has loaded."""
    from farm.store.engine import open_store
    from farm.store.fleet import list_workers

    settings = settings_of(ctx)
    with errors():
        rows = list_workers(open_store(settings), beat_s=settings.lease_s / 3, include_stopped=show_all)
    for w in rows:
        if as_json:
            click.echo(json.dumps(w.as_dict()))
            continue
        memory = f" {w.device_memory_bytes / 2**30:.0f} GiB" if w.device_memory_bytes else ""
        click.echo(
            f"{w.name:<28} {w.state:<7} pool={w.pool or '-':<10} {w.device}{memory}  jobs={w.current_jobs}  "
            f"{w.images_per_s:.2f} img/s  seen {w.last_seen_s:.0f} s ago  models={w.loaded.get('models', [])}"
        )
    if not rows and not as_json:
        click.echo("no workers have reported yet: start one with `farm worker`")


def _register_tools() -> None:
    from farm.cli.control import cancel, pause, resume, retry
    from farm.cli.inspect import doctor, preview
    from farm.cli.outputs import export, url
    from farm.cli.tools import bench, condition, db, models

    for command in (db, models, condition, bench, cancel, retry, pause, resume, export, url, preview, doctor):
        main.add_command(command)


_register_tools()

"""`farm worker` and `farm workers`: run one render worker, and see the fleet."""

from __future__ import annotations

import json

import click

from farm.cli.common import settings_of
from farm.settings import Settings, with_overrides


@click.command()
@click.option(
    "--pool", default=None, help="Take this worker's options from [pools.NAME] in farm.toml (options given here win)."
)
@click.option("--device", default=None, help="Device: auto, cpu, cuda or cuda:N (FARM_DEVICE).")
@click.option("--dtype", default=None, help="auto, float16, bfloat16 or float32 (FARM_DTYPE).")
@click.option(
    "--fast-path",
    default=None,
    metavar="ITEMS",
    help="GPU fast path on top of the safe defaults, comma-separated: sdpa, fuse-qkv, channels-last, "
    "compile[=max-autotune], int8-dynamic, fp8-dynamic, no-ITEM; none = plain eager (FARM_FAST_PATH, "
    "default: sdpa, plus fuse-qkv and channels-last on CUDA).",
)
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
    "--renderer",
    type=click.Choice(["pixart", "null"]),
    default=None,
    help="pixart (the default: the model), or null: synthetic images at once, no model, to benchmark the farm "
    "itself (FARM_RENDERER). Never for real datasets.",
)
@click.option("--loglevel", default="INFO", show_default=True, help="Logging level.")
@click.pass_context
def worker(
    ctx: click.Context,
    pool: str | None,
    device: str | None,
    dtype: str | None,
    fast_path: str | None,
    queue: str | None,
    name: str | None,
    torch_threads: int | None,
    max_batch: int | None,
    io_threads: int,
    low_memory: bool,
    metrics_port: int,
    renderer: str | None,
    loglevel: str,
) -> None:
    """Run one render worker (one process per GPU); SIGTERM finishes the current task, then exits."""
    if pool:
        # A pool's values fill in every option not given on the command line.
        given = {
            k: v for k, v in ctx.params.items() if ctx.get_parameter_source(k) is not click.core.ParameterSource.DEFAULT
        }
        merged = {**ctx.params, **settings_of(ctx).pool(pool), **given}
        device, dtype, queue = merged["device"], merged["dtype"], merged["queue"]
        fast_path = merged["fast_path"]
        max_batch, io_threads = merged["max_batch"], merged["io_threads"]
        low_memory, metrics_port = merged["low_memory"], merged["metrics_port"]
        renderer = merged["renderer"]
        if queue is None:  # a pool consumes its own queue, where dispatch routes the jobs it serves
            from farm.dispatch.routing import PoolSpec

            queue = PoolSpec.from_options(pool, merged).queue
    settings = with_overrides(
        settings_of(ctx), device=device, dtype=dtype, queue=queue, renderer=renderer, fast_path=fast_path
    )
    _check_fast_path(settings, low_memory)
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
        metrics_port=metrics_port,
        pool=pool,
    )


def _check_fast_path(settings: Settings, low_memory: bool) -> None:
    """Refuse a fast path that does not parse or that this machine cannot run, now rather than at the first job."""
    if settings.renderer == "null":
        return  # no model: nothing to speed up
    from models.devices import resolve_device
    from models.fastpath import FastPathUnavailable, check_supported, parse_fast_path

    try:
        device = resolve_device(settings.device)
        check_supported(parse_fast_path(settings.fast_path, device=device, low_memory=low_memory), device)
    except (ValueError, FastPathUnavailable) as exc:
        raise click.BadParameter(str(exc), param_hint="'--fast-path' / FARM_FAST_PATH") from None


@click.command("workers")
@click.option("--all", "show_all", is_flag=True, help="Include workers that stopped cleanly.")
@click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per worker (nothing for no workers).")
@click.pass_context
def workers_command(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """The fleet: each worker's pool, device, state (alive or stale), jobs, images/s and what it has loaded."""
    from farm.store.engine import open_store
    from farm.store.fleet import list_workers

    settings = settings_of(ctx)
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
    if not as_json:
        from farm.store.control import duty_state, silence_warning
        from farm.store.queries import has_unfinished

        engine = open_store(settings)
        state = duty_state(engine)
        warning = silence_warning(engine, settings.lease_s, unfinished=has_unfinished(engine))
        if state.holder and not warning:
            click.echo(f"reaper and dispatcher: {state.holder} ({state.note or 'starting'})")
        if warning:
            click.echo(warning, err=True)

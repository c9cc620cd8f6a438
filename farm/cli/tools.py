"""`farm db`, `farm models`, `farm condition` and `farm bench`: tools around the render loop."""

from __future__ import annotations

import json
from pathlib import Path

import click

from farm.cli.common import settings_of
from farm.errors import UserError
from farm.secrets import redact


@click.group()
def db() -> None:
    """Job database schema."""


@db.command("upgrade")
@click.pass_context
def db_upgrade(ctx: click.Context) -> None:
    """Apply migrations to the configured database (production runs this once per release)."""
    from farm.store.engine import current_revision, make_engine, upgrade

    settings = settings_of(ctx)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    click.echo(f"{redact(settings.database_url)} is at revision {current_revision(engine)}")


@db.command("recount")
@click.option("--dataset", "name", metavar="NAME", help="Only this dataset (default: every dataset).")
@click.pass_context
def db_recount(ctx: click.Context, name: str | None) -> None:
    """Rebuild the job counts `farm status` reads from the jobs themselves, and say what changed.

    One transaction per dataset; safe while the farm runs (transitions are neither blocked nor lost). After
    `farm db upgrade` to revision 0010 on a large PostgreSQL store, this backfills the counts.
    """
    from farm.store.counts import recount
    from farm.store.engine import open_store

    engine = open_store(settings_of(ctx))
    try:
        for done in recount(engine, name):
            click.echo(done.describe())
    finally:
        engine.dispose()


@click.group()
def models() -> None:
    """Model profiles, the offline tiny models and random HED weights."""


@models.command("list")
@click.pass_context
def models_list(ctx: click.Context) -> None:
    """The built-in profiles and where each loads from."""
    from farm.profiles import CONTROLNET_PROFILES, PROFILES, resolve_model

    settings = settings_of(ctx)
    click.echo(f"models (--model; default {settings.default_model}):")
    for profile in PROFILES.values():
        sampler = resolve_model(profile.name, settings).sampler
        limits = f"{sampler.note}; 1-{sampler.max_steps} steps"
        if profile.sampler is None:
            limits += " (the folder's own scheduler)"
        click.echo(
            f"  {profile.name:<26} {profile.native_size}px  {profile.source(settings)}\n"
            f"  {'':<26} {profile.description}\n"
            f"  {'':<26} sampler: {limits}"
        )
    click.echo("controlnets (--controlnet):")
    for adapter in CONTROLNET_PROFILES.values():
        recipe = ""
        if adapter.base_model is not None:
            recipe = f"\n  {'':<26} runs on {adapter.base_model}"
            if adapter.steps is not None:
                recipe += f", {adapter.steps} steps, guidance {adapter.guidance:g}"
            if adapter.preprocess:
                recipe += f", condition {adapter.preprocess}"
        click.echo(f"  {adapter.name:<26} {adapter.source(settings)}\n  {'':<26} {adapter.description}{recipe}")
    click.echo("scorers (`farm submit --scorer`; pools list theirs under `scorers`):")
    from farm.profiles import SCORER_PROFILES

    for scorer in SCORER_PROFILES.values():
        sources = ", ".join(f"{part} {source}" for part, source in scorer.sources(settings).items())
        click.echo(f"  {scorer.name:<26} {sources}\n  {'':<26} {scorer.note}")


@models.command("make-tiny")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random weights.")
@click.option(
    "--sampler",
    type=click.Choice(["lcm", "dpm"]),
    default="lcm",
    show_default=True,
    help="The scheduler the folder ships: lcm as PixArt-LCM (δ), dpm as PixArt-XL-2 (α: DPM-Solver++).",
)
@click.pass_context
def models_make_tiny(ctx: click.Context, directory: Path | None, seed: int, sampler: str) -> None:
    """Write a tiny random-weight PixArt-α pipeline (default: FARM_HOME/models/tiny), fully offline."""
    from models.tiny import make_tiny

    target = directory or settings_of(ctx).models_dir / "tiny"
    path = make_tiny(target, seed=seed, sampler="dpm-solver++" if sampler == "dpm" else "lcm")
    click.echo(f"tiny PixArt pipeline ({sampler}) written to {path}")


@models.command("make-tiny-controlnet")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--model-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Tiny pipeline whose transformer the adapter copies (default: FARM_HOME/models/tiny, made if missing).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random projections.")
@click.pass_context
def models_make_tiny_controlnet(ctx: click.Context, directory: Path | None, model_dir: Path | None, seed: int) -> None:
    """Write a tiny random-weight ControlNet adapter (default: FARM_HOME/models/tiny-controlnet), offline."""
    from models.controlnet import make_tiny_controlnet
    from models.tiny import make_tiny

    settings = settings_of(ctx)
    source = model_dir or settings.models_dir / "tiny"
    if not any((source / name).is_file() for name in ("model_index.json", "config.json")):
        if model_dir is not None:
            raise click.BadParameter(
                f"{source} is neither a pipeline (model_index.json) nor a transformer folder (config.json)",
                param_hint="--model-dir",
            )
        make_tiny(source)
        click.echo(f"tiny PixArt pipeline written to {source}")
    target = directory or settings.models_dir / "tiny-controlnet"
    path = make_tiny_controlnet(target, transformer_source=source, seed=seed)
    click.echo(f"tiny ControlNet adapter written to {path}")


@models.command("make-tiny-scorer")
@click.argument("directory", required=False, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--seed",
    type=int,
    default=2,
    show_default=True,
    help="Seed for the random weights (2 gives a spread of CLIP scores on the tiny models; 0 gives only zeros).",
)
@click.pass_context
def models_make_tiny_scorer(ctx: click.Context, directory: Path | None, seed: int) -> None:
    """Write tiny random CLIP, aesthetic and safety models (default: FARM_HOME/models/tiny-scorer), offline."""
    from models.scoring import save_tiny_scorers

    target = directory or settings_of(ctx).models_dir / "tiny-scorer"
    paths = save_tiny_scorers(target, seed=seed)
    click.echo(f"tiny scorers ({', '.join(paths)}) written to {target}")


@models.command("make-random-hed")
@click.argument("out", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the random weights.")
@click.pass_context
def models_make_random_hed(ctx: click.Context, out: Path | None, seed: int) -> None:
    """Write random HED weights in ControlNetHED.pth's layout to OUT (default: the HED weights path).

    For demos and tests only, offline: random weights give meaningless edges. For real soft edges get
    ControlNetHED.pth from the hub repo lllyasviel/Annotators instead.
    """
    from models.hed import save_random_hed, weights_sha256

    target = out or settings_of(ctx).hed_weights_path
    try:
        path = save_random_hed(target, seed=seed)
    except OSError as exc:
        raise click.ClickException(f"cannot write {target}: {exc.strerror or exc}") from None
    click.echo(f"random HED weights written to {path} (sha256 {weights_sha256(path)})")


# ---- condition ----------------------------------------------------------------------------------------


@click.group()
def condition() -> None:
    """Make ControlNet condition images from ordinary images."""


@condition.command("canny")
@click.argument("in_path", metavar="IN", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--low", type=click.IntRange(0, 255), default=100, show_default=True, help="Canny lower threshold.")
@click.option("--high", type=click.IntRange(0, 255), default=200, show_default=True, help="Canny upper threshold.")
def condition_canny(in_path: Path, out_path: Path, low: int, high: int) -> None:
    """Write the Canny edges of IN to OUT as a 3-channel PNG condition image (white edges on black)."""
    from models.conditions import canny

    try:
        written = canny(in_path, out_path, low=low, high=high)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out_path}: {exc.strerror or exc}") from None
    click.echo(f"edges written to {written}")


@condition.command("hed")
@click.argument("in_path", metavar="IN", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("out_path", metavar="OUT", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--weights",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="ControlNetHED.pth (default: FARM_HED_WEIGHTS, or FARM_HOME/models/hed/ControlNetHED.pth).",
)
@click.pass_context
def condition_hed(ctx: click.Context, in_path: Path, out_path: Path, weights: Path | None) -> None:
    """Write the soft HED edges of IN to OUT as a 3-channel PNG condition image, at IN's size."""
    weights_path = weights or settings_of(ctx).hed_weights_path
    if not weights_path.is_file():
        raise UserError(
            f"HED weights {weights_path} not found: download ControlNetHED.pth (~29 MB) from the hub repo "
            "lllyasviel/Annotators to that path (or pass --weights, or set FARM_HED_WEIGHTS)"
        )
    from models.conditions import hed
    from models.hed import HEDLoadError, load_hed

    try:
        net = load_hed(weights_path)
    except HEDLoadError as exc:
        raise UserError(str(exc)) from None
    try:
        written = hed(in_path, out_path, net)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {out_path}: {exc.strerror or exc}") from None
    click.echo(f"soft edges written to {written}")


@click.group(invoke_without_command=True)
@click.option("--model", default="bench-small", show_default=True, help="Profile, folder or hub id to render.")
@click.option("--prompts", type=click.IntRange(min=1), default=32, show_default=True, help="Images per side.")
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="B: images per pipeline call in (b) and in the farm's workers.",
)
@click.option(
    "--workers", type=click.IntRange(min=1), default=1, show_default=True, help="`farm worker` processes for (c)."
)
@click.option("--width", type=int, default=None, help="Image width (default: the model's size).")
@click.option("--height", type=int, default=None, help="Image height (default: the model's size).")
@click.option("--steps", type=click.IntRange(min=1, max=50), default=4, show_default=True, help="LCM steps.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every figure to this JSON file.",
)
@click.pass_context
def bench(
    ctx: click.Context,
    model: str,
    prompts: int,
    batch_size: int,
    workers: int,
    width: int | None,
    height: int | None,
    steps: int,
    json_path: Path | None,
) -> None:
    """Images/s of (a) bare diffusers one by one, (b) bare diffusers in batches, (c) the whole farm."""
    if ctx.invoked_subcommand is not None:
        return
    settings = settings_of(ctx)
    from benchmarks.render import run_bench, summary

    result = run_bench(
        settings,
        model=model,
        prompts=prompts,
        batch_size=batch_size,
        workers=workers,
        width=width,
        height=height,
        num_inference_steps=steps,
        progress=lambda line: click.echo(line, err=True),
    )
    click.echo(summary(result))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))
        click.echo(f"figures written to {json_path}")


@bench.command("submit")
@click.option(
    "--prompts",
    type=click.IntRange(min=1),
    default=100_000,
    show_default=True,
    help="Distinct prompts to submit and dispatch.",
)
@click.option(
    "--status-jobs",
    type=click.IntRange(min=1),
    default=1_000_000,
    show_default=True,
    help="Jobs in the dataset that `farm status` is timed on.",
)
@click.option(
    "--status-runs",
    type=click.IntRange(min=1),
    default=7,
    show_default=True,
    help="Timed `farm status` queries (after one warm-up).",
)
@click.option(
    "--backlog-jobs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Also time counting this many pending jobs per pool (what the workers' leader does each round).",
)
@click.option("--keep", is_flag=True, help="Keep the benchmark datasets instead of deleting them.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every figure to this JSON file.",
)
@click.pass_context
def bench_submit_command(
    ctx: click.Context,
    prompts: int,
    status_jobs: int,
    status_runs: int,
    backlog_jobs: int,
    keep: bool,
    json_path: Path | None,
) -> None:
    """Submit time for many prompts (and the first window sent), and `farm status` latency on a big dataset."""
    import tempfile

    from benchmarks.submit import bench_submit

    settings = settings_of(ctx)
    with tempfile.TemporaryDirectory(prefix="farm-bench-") as workdir:
        result = bench_submit(
            settings,
            prompts=prompts,
            status_jobs=status_jobs,
            status_runs=status_runs,
            backlog_jobs=backlog_jobs,
            workdir=Path(workdir),
            keep=keep,
            progress=lambda line: click.echo(line, err=True),
        )
    click.echo(json.dumps(result, indent=2))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))


@bench.command("ceiling")
@click.option(
    "--part",
    "parts",
    type=click.Choice(["worker", "uploads", "fleet", "statements"]),
    multiple=True,
    help="(a) worker: one null worker's images/s; (b) uploads: the upload pool at 1024 px; (c) fleet: the workers' "
    "claim, record and heartbeat SQL from many processes, with PostgreSQL's CPU per image; statements: each of "
    "those transactions alone on one connection. Default: worker, uploads and fleet.",
)
@click.option(
    "--size",
    "sizes",
    type=(click.IntRange(min=64), click.IntRange(min=1)),
    multiple=True,
    help="SIZE JOBS for (a): images of SIZE×SIZE (default: 256 400, then 1024 200).",
)
@click.option("--profile", is_flag=True, help="Sample the worker with py-spy (when installed): where its time goes.")
@click.option("--loglevel", default="INFO", show_default=True, help="The null worker's log level.")
@click.option("--io-threads", type=click.IntRange(min=1), default=2, show_default=True, help="Upload threads.")
@click.option("--fleet-jobs", type=click.IntRange(min=8), default=20_000, show_default=True, help="Jobs for (c).")
@click.option("--fleet-processes", type=click.IntRange(min=1), default=4, show_default=True, help="Processes for (c).")
@click.option(
    "--task-jobs", type=click.IntRange(min=1), default=8, show_default=True, help="Jobs per claim and record in (c)."
)
@click.option(
    "--record-jobs",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="(c): record once this many claimed jobs wait, as a worker with FARM_RECORD_GROUP_S does (0: per task).",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write every figure to this JSON file.",
)
@click.pass_context
def bench_ceiling_command(
    ctx: click.Context,
    parts: tuple[str, ...],
    sizes: tuple[tuple[int, int], ...],
    profile: bool,
    loglevel: str,
    io_threads: int,
    fleet_jobs: int,
    fleet_processes: int,
    task_jobs: int,
    record_jobs: int,
    json_path: Path | None,
) -> None:
    """The control plane's own ceiling, with the null renderer (`farm worker --renderer null`): no model runs."""
    from benchmarks.ceiling import run_ceiling

    settings = settings_of(ctx)
    result = run_ceiling(
        settings,
        parts=parts or ("worker", "uploads", "fleet"),
        sizes=sizes or ((256, 400), (1024, 200)),
        profile=profile,
        loglevel=loglevel,
        io_threads=io_threads,
        fleet_jobs=fleet_jobs,
        fleet_processes=fleet_processes,
        task_jobs=task_jobs,
        record_jobs=record_jobs,
        workdir=settings.home / "bench",
        progress=lambda line: click.echo(line, err=True),
    )
    click.echo(json.dumps(result, indent=2))
    if json_path:
        json_path.write_text(json.dumps(result, indent=2))

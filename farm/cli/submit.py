"""`farm submit`, `farm dispatch`, `farm reap`: putting jobs into the farm and sending them to workers."""

from __future__ import annotations

from pathlib import Path

import click

from farm.cli.common import dispatch_now, settings_of


@click.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--dataset", required=True, help="Dataset name (letters, digits, '.', '_', '-').")
@click.option(
    "--model",
    default=None,
    help="Profile (pixart-lcm-1024, pixart-xl-1024, tiny; `farm models list`), local folder or hub id "
    "(default: the dataset's model, else FARM_DEFAULT_MODEL: pixart-lcm-1024).",
)
@click.option("--width", type=int, default=None, help="Image width in pixels (default: the model's size).")
@click.option("--height", type=int, default=None, help="Image height in pixels (default: the model's size).")
@click.option(
    "--steps",
    "num_inference_steps",
    type=int,
    default=None,
    help="Denoising steps (default: the model's sampler: LCM 4, DPM-Solver++ 14).",
)
@click.option(
    "--guidance-scale",
    type=float,
    default=None,
    help="Classifier-free guidance (default: the model's: 0 for LCM, which has it distilled in; 4.5 for PixArt-α).",
)
@click.option(
    "--negative-prompt",
    default=None,
    help="Negative prompt for rows without their own; used where guidance_scale > 1 (classifier-free guidance).",
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
    type=click.Choice(["none", "int8", "int8-transformer"]),
    default="none",
    show_default=True,
    help="int8: the T5 text encoder in 8-bit (the paper's 8 GB recipe); int8-transformer: the transformer too "
    "(CUDA workers only).",
)
@click.option(
    "--condition",
    type=click.Choice(["hed", "none"]),
    default=None,
    help="hed: workers turn each control image into HED soft edges (weights: FARM_HED_WEIGHTS); none: control "
    "images are edge maps already (default: the controlnet profile's, hed for pixart-hed-controlnet).",
)
@click.option(
    "--timesteps",
    type=click.Choice(["original"]),
    default=None,
    help="original: the PixArt repository's 4 LCM timesteps (999, 759, 519, 279) instead of diffusers' spacing.",
)
@click.option(
    "--vary",
    multiple=True,
    metavar="AXIS=VALUES",
    help="Grid axis, repeatable; every prompt is rendered for each combination. Axes: seed (0..7 or 1,5,9), "
    "size (1024x1024,768x1344), steps (2..4), guidance_scale and conditioning_scale (comma lists).",
)
@click.option(
    "--control-dir",
    "control_dirs",
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A folder the prompt file's control_image paths may name, besides the file's own folder (repeatable).",
)
@click.option("--dry-run", is_flag=True, help="Validate and show the plan; write nothing, send nothing.")
@click.option(
    "--dispatch/--no-dispatch",
    "publish",
    default=False,
    help="Also publish a window of the jobs now, as `farm dispatch` does (default: only record them; the "
    "workers' dispatcher sends them within a second).",
)
@click.option(
    "--priority",
    type=click.IntRange(0, 9),
    default=None,
    help="Dataset priority, 0-9, higher first (default 0; given again, it changes for jobs not yet sent).",
)
@click.option(
    "--accept",
    type=int,
    default=None,
    help="Yield target: accepted images each prompt line wants (its first N tries are the --images-per-prompt "
    "jobs); tries that miss the bar are replaced by new seeds until N are accepted or --max-tries are spent.",
)
@click.option("--max-tries", type=int, default=None, help="Tries per line at most (default: 4 x --accept).")
@click.option("--min-clip-score", type=float, default=None, help="Accept only CLIP score >= X (0-100).")
@click.option("--min-aesthetic", type=float, default=None, help="Accept only aesthetic score >= Y (1-10).")
@click.option(
    "--safety",
    type=click.Choice(["drop", "flag"]),
    default=None,
    help="drop: reject images the safety checker flags; flag: keep them, flagged in the row and the export.",
)
@click.option(
    "--dedup",
    type=float,
    default=None,
    help="Reject a try whose CLIP embedding has cosine >= this with an accepted try of its line (e.g. 0.95).",
)
@click.option(
    "--keep-rejected",
    type=click.Choice(["yes", "no"]),
    default="yes",
    show_default=True,
    help="no: delete rejected images from storage when their verdict is recorded.",
)
@click.option(
    "--scorer",
    default=None,
    help="Scorer profile for lines with a bar (clip-l14, tiny-scorer) or a folder with clip/, aesthetic/, "
    "safety/ (default: FARM_DEFAULT_SCORER, clip-l14).",
)
@click.pass_context
def submit(
    ctx: click.Context,
    file: Path,
    dataset: str,
    model: str | None,
    width: int | None,
    height: int | None,
    num_inference_steps: int | None,
    guidance_scale: float | None,
    negative_prompt: str | None,
    images_per_prompt: int,
    seed: int,
    control_image: Path | None,
    controlnet: str | None,
    conditioning_scale: float,
    quantize: str,
    condition: str | None,
    timesteps: str | None,
    vary: tuple[str, ...],
    control_dirs: tuple[Path, ...],
    dry_run: bool,
    publish: bool,
    priority: int | None,
    accept: int | None,
    max_tries: int | None,
    min_clip_score: float | None,
    min_aesthetic: float | None,
    safety: str | None,
    dedup: float | None,
    keep_rejected: str,
    scorer: str | None,
) -> None:
    """Validate FILE (.txt, .jsonl, .csv, .parquet), show the job count, store conditions, record the jobs."""
    from farm.submit.plan import SubmitOptions
    from farm.submit.run import choose_model, submit_file

    settings = settings_of(ctx)
    options = SubmitOptions(
        dataset=dataset,
        model=choose_model(settings, dataset, model, controlnet=controlnet, read_store=not dry_run),
        width=width,
        height=height,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        negative_prompt=negative_prompt,
        images_per_prompt=images_per_prompt,
        seed=seed,
        control_image=control_image,
        controlnet=controlnet,
        conditioning_scale=conditioning_scale,
        quantize=None if quantize == "none" else quantize,
        condition=condition,
        hed_weights=settings.hed_weights_path,
        timesteps=timesteps,
        vary=vary,
        control_dirs=control_dirs,
        control_image_max_bytes=settings.control_image_max_bytes,
        max_line_bytes=settings.max_line_bytes,
        accept=accept,
        max_tries=max_tries,
        min_clip_score=min_clip_score,
        min_aesthetic=min_aesthetic,
        safety=safety,
        dedup=dedup,
        keep_rejected=keep_rejected == "yes",
        scorer=scorer or settings.default_scorer,
    )
    # Only --dispatch touches the broker: one that is away raises BrokerUnavailable after the jobs are recorded
    # (exit 3, nothing lost).
    submit_file(settings, file, options, dispatch=publish, dry_run=dry_run, echo=click.echo, priority=priority)


@click.command()
@click.option("--dataset", default=None, help="Only this dataset (default: every dataset).")
@click.pass_context
def dispatch(ctx: click.Context, dataset: str | None) -> None:
    """Top up the broker's window with pending jobs now (the workers' dispatcher does it every second)."""
    from farm.store.engine import open_store
    from farm.store.queries import dataset_id

    settings = settings_of(ctx)
    engine = open_store(settings)
    ds_id = dataset_id(engine, dataset) if dataset else None
    dispatch_now(settings, engine, ds_id)


@click.command()
@click.pass_context
def reap(ctx: click.Context) -> None:
    """One round of the reaper and dispatcher, as every worker's control loop runs it: expired leases back to
    pending (or failed after the last attempt), lost messages sent again, each queue's window topped up."""
    from farm.dispatch.broker import make_celery
    from farm.dispatch.publish import resend_lost
    from farm.store.engine import open_store
    from farm.store.transitions import reap_expired

    settings = settings_of(ctx)
    engine = open_store(settings)
    with engine.begin() as conn:
        reaped = reap_expired(conn, max_attempts=settings.max_attempts)
    click.echo(f"reaped {len(reaped.requeued)} jobs back to pending, {len(reaped.failed)} failed")
    resent = resend_lost(engine, make_celery(settings), settings, grace_s=0)
    click.echo(f"sent again {resent} queued jobs whose message was lost or stuck")
    dispatch_now(settings, engine, None)

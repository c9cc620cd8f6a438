"""`farm preview`: a contact sheet (one PNG grid of thumbnails with their prompts) and an HTML gallery.

Images are read through the storage backend, like every other reader of the dataset, and each is checked
against the sha256 recorded when it was stored, so a preview never shows a corrupted or replaced object.
"""

from __future__ import annotations

import html
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from sqlalchemy import select
from sqlalchemy.engine import Engine

from farm.errors import FarmError, StorageError
from farm.storage import Storage
from farm.store.queries import dataset_id
from farm.store.schema import Job, JobStatus

PAD_PX = 8
LINE_PX = 12  # Pillow's default font at its default size is about 11 px high
CAPTION_LINES = 2
CAPTION_PX = CAPTION_LINES * LINE_PX + 4
BACKGROUND = (24, 24, 24)
CAPTION_COLOR = (230, 230, 230)

_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class PreviewImage:
    """One succeeded job as the preview shows it."""

    job_id: str
    prompt: str
    seed: int
    width: int
    height: int
    sha256: str
    output_uri: str
    # A yield-targeted try's scores and verdict (None otherwise): shown under the prompt, rejects framed in red.
    clip_score: float | None = None
    aesthetic_score: float | None = None
    verdict: str | None = None
    verdict_reason: str | None = None

    @property
    def scores_line(self) -> str | None:
        """`clip 23.1 · aesthetic 5.2 · rejected`, or None for an unscored image without a verdict."""
        parts = []
        if self.clip_score is not None:
            parts.append(f"clip {self.clip_score:.1f}")
        if self.aesthetic_score is not None:
            parts.append(f"aesthetic {self.aesthetic_score:.1f}")
        if self.verdict is not None:
            parts.append(self.verdict)
        return " · ".join(parts) or None


REJECT_COLOR = (220, 60, 60)  # the frame of a thumbnail whose try was not accepted


@dataclass
class Preview:
    """What `make_preview` wrote, and the images it had to leave out (with the reason)."""

    contact_sheet: Path
    gallery: Path
    images: list[PreviewImage] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def sheet_size(count: int, columns: int, thumb_px: int) -> tuple[int, int]:
    """Width and height of a contact sheet of `count` thumbnails (fewer columns when there are fewer images)."""
    cols = max(1, min(columns, count))
    rows = max(1, math.ceil(count / cols))
    return cols * (thumb_px + PAD_PX) + PAD_PX, rows * (thumb_px + CAPTION_PX + PAD_PX) + PAD_PX


def succeeded_images(engine: Engine, dataset: str, *, limit: int, verdict: str | None = None) -> list[PreviewImage]:
    """The first `limit` succeeded jobs of a dataset (with that verdict, if given) that still have their image, in
    file order (a line's tries in try order)."""
    ds_id = dataset_id(engine, dataset)
    query = (
        select(
            Job.id,
            Job.prompt,
            Job.seed,
            Job.width,
            Job.height,
            Job.sha256,
            Job.output_uri,
            Job.clip_score,
            Job.aesthetic_score,
            Job.verdict,
            Job.verdict_reason,
        )
        .where(Job.dataset_id == ds_id, Job.status == JobStatus.SUCCEEDED.value, Job.output_uri.is_not(None))
        .order_by(Job.source_line, Job.line_id, Job.try_index, Job.seed, Job.id)
        .limit(limit)
    )
    if verdict is not None:
        query = query.where(Job.verdict == verdict)
    with engine.connect() as conn:
        return [
            PreviewImage(
                row.id,
                row.prompt,
                row.seed,
                row.width,
                row.height,
                row.sha256 or "",
                row.output_uri or "",
                row.clip_score,
                row.aesthetic_score,
                row.verdict,
                row.verdict_reason,
            )
            for row in conn.execute(query)
        ]


def make_preview(
    engine: Engine,
    storage: Storage,
    dataset: str,
    out_dir: Path,
    *,
    limit: int = 64,
    columns: int = 8,
    thumb_px: int = 128,
    verdict: str | None = None,
) -> Preview:
    """Write OUT/contact_sheet.png, OUT/index.html, OUT/images/ (full size) and OUT/thumbs/."""
    # 1. Which images: succeeded jobs (with that verdict), in file order.
    wanted = succeeded_images(engine, dataset, limit=limit, verdict=verdict)
    if not wanted:
        raise FarmError(f"dataset {dataset!r} has no succeeded images yet: see `farm status {dataset}`")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "images").mkdir(exist_ok=True)
    (out_dir / "thumbs").mkdir(exist_ok=True)
    result = Preview(out_dir / "contact_sheet.png", out_dir / "index.html")
    thumbs: list[tuple[PreviewImage, Image.Image]] = []
    # 2. Fetch each one through the storage backend, verify it, keep a copy and a thumbnail.
    for item in wanted:
        try:
            data = _fetch(storage, dataset, item)
            image = Image.open(io.BytesIO(data))
            image.load()
        except (StorageError, OSError) as exc:
            result.skipped.append(f"{item.job_id}: {exc}")
            continue
        (out_dir / "images" / f"{item.job_id}.png").write_bytes(data)
        thumb = image.convert("RGB")
        thumb.thumbnail((thumb_px, thumb_px))
        thumb.save(out_dir / "thumbs" / f"{item.job_id}.png")
        thumbs.append((item, thumb))
        result.images.append(item)
    if not thumbs:
        raise FarmError(f"none of the {len(wanted)} images of {dataset!r} could be read: {result.skipped[0]}")
    # 3. The grid, then the page.
    contact_sheet(thumbs, columns=columns, thumb_px=thumb_px).save(result.contact_sheet)
    write_gallery(result.gallery, dataset, result.images, thumb_px=thumb_px)
    return result


def _fetch(storage: Storage, dataset: str, item: PreviewImage) -> bytes:
    if not item.output_uri:
        raise StorageError(f"job {item.job_id} has no recorded image URI")
    return storage.read_verified(item.output_uri, item.sha256, what=f"the image of job {item.job_id}")


def contact_sheet(items: list[tuple[PreviewImage, Image.Image]], *, columns: int, thumb_px: int) -> Image.Image:
    """A grid of thumbnails, each centred on its caption (up to two lines of its prompt) right under it."""
    width, height = sheet_size(len(items), columns, thumb_px)
    cols = max(1, min(columns, len(items)))
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for index, (item, thumb) in enumerate(items):
        row, col = divmod(index, cols)
        left = PAD_PX + col * (thumb_px + PAD_PX)
        top = PAD_PX + row * (thumb_px + CAPTION_PX + PAD_PX)
        at = (left + (thumb_px - thumb.width) // 2, top + thumb_px - thumb.height)
        sheet.paste(thumb, at)
        if item.verdict is not None and item.verdict != "accepted":
            frame = (at[0], at[1], at[0] + thumb.width - 1, at[1] + thumb.height - 1)
            draw.rectangle(frame, outline=REJECT_COLOR, width=3)
        captions = _caption_lines(draw, font, item.prompt, thumb_px)
        scores = item.scores_line
        if scores is not None:  # the prompt's first line, then the scores
            captions = [*captions[: CAPTION_LINES - 1], _fit(draw, font, scores, thumb_px, cut=False)]
        for line_no, text in enumerate(captions):
            draw.text((left, top + thumb_px + 2 + line_no * LINE_PX), text, fill=CAPTION_COLOR, font=font)
    return sheet


def _caption_lines(draw: ImageDraw.ImageDraw, font: _Font, text: str, width_px: int) -> list[str]:
    """Wrap `text` into at most CAPTION_LINES lines of `width_px`; what is cut ends with an ellipsis."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if current and draw.textlength(candidate, font=font) > width_px:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    cut = len(lines) > CAPTION_LINES
    kept = lines[:CAPTION_LINES]
    return [_fit(draw, font, line, width_px, cut=cut and i == len(kept) - 1) for i, line in enumerate(kept)]


def _fit(draw: ImageDraw.ImageDraw, font: _Font, text: str, width_px: int, *, cut: bool) -> str:
    if not cut and draw.textlength(text, font=font) <= width_px:
        return text
    while text and draw.textlength(text + "…", font=font) > width_px:
        text = text[:-1]
    return text.rstrip() + "…"


def _scores_html(item: PreviewImage) -> str:
    line = item.scores_line
    if line is None:
        return ""
    reason = f" ({item.verdict_reason})" if item.verdict_reason else ""
    return f"<br>{html.escape(line + reason)}"


def write_gallery(path: Path, dataset: str, items: list[PreviewImage], *, thumb_px: int) -> Path:
    """index.html: each thumbnail links to its full image, with its prompt, seed and size (all escaped)."""
    title = html.escape(f"{dataset} — {len(items)} images")
    figures = "\n".join(
        f'<figure><a href="images/{html.escape(item.job_id)}.png">'
        f'<img src="thumbs/{html.escape(item.job_id)}.png" width="{thumb_px}" loading="lazy" '
        f'alt="{html.escape(item.prompt)}"></a>'
        f"<figcaption>{html.escape(item.prompt)}<br><small>seed {item.seed} · {item.width}×{item.height} · "
        f"{html.escape(item.job_id)}{_scores_html(item)}</small></figcaption></figure>"
        for item in items
    )
    path.write_text(
        f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; background: #181818; color: #e6e6e6; margin: 1em; }}
main {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {thumb_px}px; }}
figcaption {{ font-size: 12px; overflow-wrap: anywhere; }}
small {{ color: #999; }}
</style></head>
<body><h1>{title}</h1>
<p><a href="contact_sheet.png">contact sheet</a></p>
<main>
{figures}
</main></body></html>
""",
        encoding="utf-8",
    )
    return path

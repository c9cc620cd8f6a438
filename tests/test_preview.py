"""`farm preview`: the contact sheet's grid, the gallery's links and escaping, and sha256-checked reads."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import select
from sqlalchemy.engine import Engine

from farm.cli import main
from farm.errors import FarmError
from farm.outputs.preview import CAPTION_PX, PAD_PX, make_preview, sheet_size
from farm.settings import Settings, load_settings
from farm.storage import Storage, object_key, open_storage
from farm.store import transitions
from farm.store.engine import open_store
from farm.store.schema import Job
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.record import record

PROMPTS = [
    "a red cube on a table",
    'a <script>alert("x")</script> & a very long prompt that goes on and on about a lighthouse at dusk',
    "a green sphere",
    "a blue cone",
    "a yellow torus",
]


def _render_fake(width: int, height: int, shade: int) -> bytes:
    image = Image.new("RGB", (width, height), (shade, 255 - shade, 128))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _finished_dataset(tmp_path: Path, settings: Settings, storage: Storage, name: str = "prev") -> Engine:
    """Record jobs through the real submit path, store an image for each and mark them succeeded."""
    prompts = tmp_path / f"{name}.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "seed": i}) for i, p in enumerate(PROMPTS)))
    engine = open_store(settings)
    recorded = record(engine, plan_submission(prompts, SubmitOptions(dataset=name, width=128, height=96)))
    with engine.begin() as conn:
        ids = _job_ids(engine, recorded.dataset_id)
        claimed = transitions.claim(conn, ids, worker="test:1", lease_s=600, max_attempts=3)
        done = []
        for shade, job in enumerate(claimed):
            data = _render_fake(job.width, job.height, shade * 40)
            stored = storage.put(object_key(storage.prefix, name, job.id, 1), data)
            done.append((job.id, job.claim_seq, stored, 5))
        transitions.mark_succeeded_many(conn, done, worker="test:1")
    return engine


def _job_ids(engine: Engine, dataset_id: int) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(Job.id).where(Job.dataset_id == dataset_id)).scalars())


@pytest.fixture()
def local(tmp_path: Path) -> tuple[Settings, Storage]:
    settings = load_settings({}, home=str(tmp_path / "home"))
    return settings, open_storage(settings.storage_url)


def test_sheet_size_is_the_grid_of_cells() -> None:
    cell_w, cell_h = 128 + PAD_PX, 128 + CAPTION_PX + PAD_PX
    assert sheet_size(64, 8, 128) == (8 * cell_w + PAD_PX, 8 * cell_h + PAD_PX)
    assert sheet_size(5, 2, 128) == (2 * cell_w + PAD_PX, 3 * cell_h + PAD_PX)
    # Fewer images than columns: the sheet is only as wide as the images.
    assert sheet_size(3, 8, 128) == (3 * cell_w + PAD_PX, cell_h + PAD_PX)


def test_contact_sheet_and_gallery_from_local_storage(tmp_path: Path, local: tuple[Settings, Storage]) -> None:
    settings, storage = local
    engine = _finished_dataset(tmp_path, settings, storage)
    out = tmp_path / "out"
    result = make_preview(engine, storage, "prev", out, columns=2, thumb_px=64)

    assert len(result.images) == 5 and result.skipped == []
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.size == sheet_size(5, 2, 64)
        assert sheet.size == (2 * (64 + PAD_PX) + PAD_PX, 3 * (64 + CAPTION_PX + PAD_PX) + PAD_PX)
        # The first thumbnail (128x96 scaled to 64x48, sitting on its caption) shows the first image's colour.
        assert sheet.convert("RGB").getpixel((PAD_PX + 32, PAD_PX + 64 - 24)) == (0, 255, 128)
    page = result.gallery.read_text(encoding="utf-8")
    assert "<script>" not in page and "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp;" in page
    for item in result.images:
        assert f'href="images/{item.job_id}.png"' in page and f'src="thumbs/{item.job_id}.png"' in page
        full = (out / "images" / f"{item.job_id}.png").read_bytes()
        assert full == storage.get(object_key(storage.prefix, "prev", item.job_id, 1))
        with Image.open(out / "thumbs" / f"{item.job_id}.png") as thumb:
            assert max(thumb.size) == 64
        assert f"seed {item.seed}" in page


def test_a_tampered_image_is_left_out_with_the_reason(tmp_path: Path, local: tuple[Settings, Storage]) -> None:
    settings, storage = local
    engine = _finished_dataset(tmp_path, settings, storage)
    victim = _job_ids(engine, 1)[0]
    storage.put(object_key(storage.prefix, "prev", victim, 1), _render_fake(128, 96, 255))
    result = make_preview(engine, storage, "prev", tmp_path / "out", limit=3)
    assert victim not in {item.job_id for item in result.images}
    assert any(victim in reason and "sha256" in reason for reason in result.skipped)
    assert len(result.images) == 2  # --limit counts the jobs looked at
    assert not (tmp_path / "out" / "images" / f"{victim}.png").exists()


def test_a_dataset_without_finished_images_is_an_error(tmp_path: Path, local: tuple[Settings, Storage]) -> None:
    settings, storage = local
    prompts = tmp_path / "p.txt"
    prompts.write_text("a prompt\n")
    engine = open_store(settings)
    record(engine, plan_submission(prompts, SubmitOptions(dataset="empty")))
    with pytest.raises(FarmError, match="no succeeded images"):
        make_preview(engine, storage, "empty", tmp_path / "out")


def test_preview_reads_through_s3_storage(tmp_path: Path, s3_server: object, s3_bucket: str) -> None:
    endpoint = s3_server.endpoint_url  # type: ignore[attr-defined]
    settings = load_settings(
        {}, home=str(tmp_path / "home"), storage_url=f"s3://{s3_bucket}/renders", s3_endpoint_url=endpoint
    )
    storage = open_storage(settings.storage_url, s3_endpoint_url=endpoint, s3_region="us-east-1")
    engine = _finished_dataset(tmp_path, settings, storage)
    result = make_preview(engine, storage, "prev", tmp_path / "out", columns=8)
    assert len(result.images) == 5
    with Image.open(result.contact_sheet) as sheet:
        assert sheet.size == sheet_size(5, 8, 128)


def test_cli_prints_the_paths(tmp_path: Path, local: tuple[Settings, Storage]) -> None:
    settings, storage = local
    _finished_dataset(tmp_path, settings, storage)
    out = tmp_path / "cli-out"
    runner = CliRunner()
    result = runner.invoke(main, ["--home", str(settings.home), "preview", "prev", "--out", str(out), "--thumb", "32"])
    assert result.exit_code == 0, result.output
    assert f"contact sheet: {out / 'contact_sheet.png'}" in result.output
    assert f"gallery: {out / 'index.html'}" in result.output
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.size == sheet_size(5, 8, 32)
    missing = runner.invoke(main, ["--home", str(settings.home), "preview", "nope", "--out", str(out)])
    assert missing.exit_code == 2 and "no dataset named 'nope'" in missing.output

"""farm.Client: submit, status, wait and finished images from Python, with the CLI's validation."""

from __future__ import annotations

import hashlib
import io
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import update

from farm import Client
from farm.errors import InvalidSubmission, StorageError, UnknownDataset
from farm.settings import load_settings
from farm.storage import object_key
from farm.store.schema import Job, JobStatus, utcnow
from tests.support.processes import REPO, Worker, farm_env, run_farm


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[Client]:
    """The embedded default under tmp_path, with kombu's in-memory broker so dispatch needs no service."""
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://")
    with Client(settings) as c:
        yield c


def _png(color: tuple[int, int, int], size: tuple[int, int] = (32, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def test_import_farm_stays_light() -> None:
    code = (
        "import sys, farm\n"
        "print(sorted(m for m in ('sqlalchemy', 'celery', 'torch', 'farm.client') if m in sys.modules))\n"
        "from farm import Client\n"
        "print('torch' in sys.modules, Client.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.splitlines() == ["[]", "False farm.client"]


def test_submit_a_list_records_and_counts(client: Client) -> None:
    result = client.submit(["a red fox", {"prompt": "a cat", "seed": 7}, "a whale"], "notebook", width=256, height=256)
    assert (result.planned, result.jobs, result.new_jobs, result.already_present) == (3, 3, 3, 0)
    assert result.dispatched is None  # recorded only: the workers' dispatcher sends them
    status = client.status("notebook")
    assert status.counts[JobStatus.PENDING.value] == 3
    assert status.total == 3 and not status.done

    again = client.submit(
        ["a red fox", {"prompt": "a cat", "seed": 7}, "a whale"], "notebook", width=256, height=256, dispatch=True
    )
    assert (again.new_jobs, again.already_present, again.dispatched, again.tasks) == (0, 3, 3, 1)  # one task
    assert client.status("notebook").counts[JobStatus.QUEUED.value] == 3


def test_submit_a_grid_without_dispatch(client: Client) -> None:
    result = client.submit(
        ["a", "b", "c"], "grid", vary={"seed": range(4), "size": [(256, 256), "128x192"]}, dispatch=False
    )
    assert (result.planned, result.new_jobs, result.dispatched) == (24, 24, None)
    assert client.status("grid").counts[JobStatus.PENDING.value] == 24
    # A window: with no live worker, one worker's share (two tasks of FARM_BATCH_SIZE, 8); the rest wait for room.
    sent = client.dispatch("grid")
    assert (sent.jobs, sent.waiting) == (16, True)
    assert client.status("grid").counts[JobStatus.QUEUED.value] == 16


def test_submit_a_file_path(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "steps": 2}\n{"prompt": "b", "negative_prompt": "blurry"}\n')
    result = client.submit(path, "file", steps=3, dispatch=False)
    assert (result.new_jobs, result.negative_prompts) == (2, 1)
    assert result.plan is not None
    assert sorted(s.num_inference_steps for s in result.plan.specs) == [2, 3]


@pytest.mark.parametrize(
    ("prompts", "options", "where", "field"),
    [
        (["ok", {"prompt": "wide", "width": 1001}], {}, "<prompts>:row 2", "width"),
        (["ok", ""], {}, "<prompts>:row 2", "prompt"),
        (["ok", {"prompt": "x", "colour": "red"}], {}, "<prompts>:row 2", "colour"),
        (["ok"], {"steps": 51}, None, "num_inference_steps"),
        (["ok"], {"vary": ["size=1001x1024"]}, None, "vary"),
    ],
)
def test_bad_input_raises_invalid_submission_and_writes_nothing(
    client: Client, tmp_path: Path, prompts: list[object], options: dict[str, object], where: str | None, field: str
) -> None:
    with pytest.raises(InvalidSubmission) as info:
        client.submit(prompts, "bad", **options)  # type: ignore[arg-type]
    assert info.value.field == field
    if where is not None:
        assert where in str(info.value)
    with pytest.raises(UnknownDataset):
        client.status("bad")


def test_bad_file_names_its_path_and_line(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "ok"}\n{"prompt": "x", "guidance_scale": 99}\n')
    with pytest.raises(InvalidSubmission, match=f"{path}:2: field 'guidance_scale'"):
        client.submit(path, "bad")


def test_a_lone_string_is_not_taken_for_a_file(client: Client) -> None:
    with pytest.raises(InvalidSubmission, match=r"for one prompt pass \[prompt\]"):
        client.submit("a red fox", "bad")


def test_unknown_option_is_a_type_error(client: Client) -> None:
    with pytest.raises(TypeError, match="colour"):
        client.submit(["a"], "d", colour="red")


def test_dry_run_touches_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    client = Client(home=home)
    result = client.submit(["a", "b"], "dry", vary=["steps=2,4"], dry_run=True)
    assert result.dry_run and result.planned == 4 and result.new_jobs == 0
    assert not home.exists()


def test_images_reads_what_the_storage_holds(client: Client) -> None:
    client.submit(["a red fox", "a cat", "a whale"], "imgs", width=256, height=256, dispatch=True)
    storage = client.storage
    jobs = sorted(client.images("imgs", state="queued"), key=lambda image: image.prompt)
    assert [j.prompt for j in jobs] == ["a cat", "a red fox", "a whale"]
    colors = {"a cat": (255, 0, 0), "a red fox": (0, 255, 0)}
    with client.engine.begin() as conn:
        for job in jobs:
            if job.prompt not in colors:
                continue
            stored = storage.put(object_key(storage.prefix, "imgs", job.job_id, 1), _png(colors[job.prompt]))
            conn.execute(
                update(Job)
                .where(Job.id == job.job_id)
                .values(
                    status="succeeded",
                    output_uri=stored.uri,
                    sha256=stored.sha256,
                    bytes=stored.bytes,
                    finished_at=utcnow(),
                )
            )

    finished = list(client.images("imgs"))
    assert sorted(image.prompt for image in finished) == ["a cat", "a red fox"]
    for image in finished:
        data = image.read_bytes()
        assert hashlib.sha256(data).hexdigest() == image.sha256
        assert len(data) == image.bytes
        opened = image.open()
        assert opened.size == (32, 24)
        assert opened.getpixel((0, 0)) == colors[image.prompt]
        assert image.width == 256 and image.seed >= 0 and image.uri is not None
    (still_queued,) = client.images("imgs", state="queued")
    with pytest.raises(StorageError, match="has no image"):
        still_queued.read_bytes()
    assert len(list(client.images("imgs", state=None))) == 3
    with pytest.raises(ValueError, match="state must be one of"):
        list(client.images("imgs", state="done"))

    # A changed object is caught, not handed over.
    (Path(storage.root) / object_key("", "imgs", finished[0].job_id, 1)).write_bytes(_png((1, 2, 3)))  # type: ignore[attr-defined]
    with pytest.raises(StorageError, match="does not match its recorded sha256"):
        finished[0].read_bytes()


def test_images_pages_through_many_jobs(client: Client) -> None:
    client.submit([f"prompt {i}" for i in range(1_203)], "many", dispatch=False)
    ids = [image.job_id for image in client.images("many", state=None)]
    assert len(ids) == len(set(ids)) == 1_203


def test_wait_returns_when_done_and_times_out_otherwise(client: Client) -> None:
    client.submit(["a", "b"], "w", dispatch=False)
    with pytest.raises(TimeoutError, match="0/2 finished"):
        client.wait("w", timeout_s=0.3, poll_s=0.1)
    with client.engine.begin() as conn:
        conn.execute(update(Job).values(status="canceled", finished_at=utcnow()))
    status = client.wait("w", timeout_s=5, poll_s=0.1)
    assert status.done and status.counts["canceled"] == 2


def test_settings_or_home_not_both(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not both"):
        Client(load_settings({}, home=str(tmp_path)), home=tmp_path)


@pytest.mark.integration
def test_client_end_to_end_with_a_worker(tmp_path: Path) -> None:
    """Nothing configured but FARM_HOME: the tiny model, a real `farm worker` process, the Client."""
    home = tmp_path / "home"
    env = farm_env(FARM_HOME=str(home))
    made = run_farm(["models", "make-tiny"], env)
    assert made.returncode == 0, made.stderr
    with Client(home=home) as client:
        result = client.submit(
            ["a red cube", {"prompt": "a blue cube", "seed": 3}], "client-e2e", model="tiny", vary=["steps=1,2"]
        )
        assert (result.new_jobs, result.dispatched) == (4, None)  # the worker's own dispatcher sends them
        worker = Worker(env, tmp_path / "worker.log")
        try:
            status = client.wait("client-e2e", timeout_s=240, poll_s=0.5)
        finally:
            assert worker.stop() == 0, worker.log()[-3000:]
        assert status.counts["succeeded"] == 4, (status.counts, worker.log()[-3000:])
        images = list(client.images("client-e2e"))
        assert len(images) == 4
        assert {(i.prompt, i.num_inference_steps) for i in images} == {
            (p, n) for p in ("a red cube", "a blue cube") for n in (1, 2)
        }
        for image in images:
            opened = image.open()
            assert opened.format == "PNG"
            assert opened.size == (image.width, image.height)
            assert hashlib.sha256(image.read_bytes()).hexdigest() == image.sha256
        assert {i.seed for i in images if i.prompt == "a blue cube"} == {3}

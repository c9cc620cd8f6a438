"""Per-job render deadline, checked between denoising steps (Celery's time limits do nothing on a solo pool)."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from diffusers import PixArtAlphaPipeline
from sqlalchemy import select

from farm.dispatch.broker import make_celery
from farm.errors import ConfigError
from farm.settings import load_settings
from farm.store.engine import open_store
from farm.store.schema import Job
from farm.submit.plan import SubmitOptions, plan_submission
from farm.submit.record import record
from models import pipeline as pipeline_module
from models.pipeline import RenderDeadlineExceeded, RenderRequest, load_pipeline, render_batch
from models.tiny import TINY_DEFAULT_SIZE, make_tiny
from workers.runtime import WorkerRuntime
from workers.tasks import render_jobs


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny") / "pixart-tiny", seed=0)


@pytest.fixture(scope="module")
def pipe(tiny_dir: Path) -> PixArtAlphaPipeline:
    return load_pipeline(str(tiny_dir), device="cpu")


def _requests(n: int = 2, steps: int = 4) -> list[RenderRequest]:
    return [
        RenderRequest(
            prompt=f"prompt {i}", seed=i, width=TINY_DEFAULT_SIZE, height=TINY_DEFAULT_SIZE, num_inference_steps=steps
        )
        for i in range(n)
    ]


def test_a_passed_deadline_stops_the_render_naming_deadline_and_step(pipe: PixArtAlphaPipeline) -> None:
    with pytest.raises(RenderDeadlineExceeded, match=r"deadline of 1e-09 s after step 1 of 4"):
        render_batch(pipe, _requests(), deadline_s=1e-9)


def test_the_deadline_is_checked_after_every_step(pipe: PixArtAlphaPipeline, monkeypatch: pytest.MonkeyPatch) -> None:
    # A clock that reads 0 at the start of the call and advances one second per denoising step.
    ticks: Iterator[float] = iter(float(n) for n in range(100))
    monkeypatch.setattr(pipeline_module, "time", types.SimpleNamespace(monotonic=lambda: next(ticks)))
    with pytest.raises(RenderDeadlineExceeded, match=r"deadline of 2.5 s after step 3 of 4"):
        render_batch(pipe, _requests(), deadline_s=2.5)


def test_a_generous_deadline_changes_no_pixels(pipe: PixArtAlphaPipeline) -> None:
    plain = render_batch(pipe, _requests())
    timed = render_batch(pipe, _requests(), deadline_s=600)
    assert len(plain) == len(timed) == 2
    for a, b in zip(plain, timed, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_deadline_setting_defaults_parses_and_validates(tmp_path: Path) -> None:
    assert load_settings({"FARM_HOME": str(tmp_path)}).render_deadline_s == 900
    assert load_settings({"FARM_HOME": str(tmp_path), "FARM_RENDER_DEADLINE_S": "2.5"}).render_deadline_s == 2.5
    assert load_settings({"FARM_HOME": str(tmp_path), "FARM_RENDER_DEADLINE_S": "0"}).render_deadline_s == 0
    with pytest.raises(ConfigError, match=r"render_deadline_s must be a number, got 'soon'"):
        load_settings({"FARM_HOME": str(tmp_path), "FARM_RENDER_DEADLINE_S": "soon"})
    for bad in ("-1", "nan", "inf"):
        with pytest.raises(ConfigError, match="render_deadline_s must be at least 0"):
            load_settings({"FARM_HOME": str(tmp_path), "FARM_RENDER_DEADLINE_S": bad})


def _submit(engine, tmp_path: Path, dataset: str, prompts: list[str], model: Path) -> list[str]:  # type: ignore[no-untyped-def]
    path = tmp_path / f"{dataset}.txt"
    path.write_text("\n".join(prompts))
    plan = plan_submission(path, SubmitOptions(dataset=dataset, model=str(model), width=64, height=64))
    record(engine, plan)
    return [spec.id_in(dataset) for spec in plan.specs]


def _rows(engine, ids: list[str]) -> dict[str, object]:  # type: ignore[no-untyped-def]
    with engine.connect() as conn:
        return {r.id: r for r in conn.execute(select(Job.__table__).where(Job.id.in_(ids)))}


def test_worker_fails_a_job_past_its_deadline_and_retries_then_fails_it(tmp_path: Path, tiny_dir: Path) -> None:
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://", max_attempts=2, retry_backoff_s=0)
    settings = dataclasses.replace(settings, render_deadline_s=1e-9)
    engine = open_store(settings)
    ids = _submit(engine, tmp_path, "late", ["a cat", "a dog"], tiny_dir)
    runtime = WorkerRuntime.build(settings, make_celery(settings), name="w-test")

    first = render_jobs(runtime, ids)  # the batch fails, then each job alone, each past its deadline
    assert runtime.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    assert (first.rendered, first.render_failed) == (0, 2)
    for row in _rows(engine, ids).values():
        assert row.status == "queued" and row.attempts == 1  # type: ignore[attr-defined]
        assert row.error.startswith("attempt 1: RenderDeadlineExceeded")  # type: ignore[attr-defined]
        assert "deadline of 1e-09 s after step 1 of" in row.error  # type: ignore[attr-defined]

    render_jobs(runtime, ids)  # the retry messages
    assert runtime.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    for row in _rows(engine, ids).values():
        assert row.status == "failed" and row.attempts == 2 and "deadline" in row.error  # type: ignore[attr-defined]
        assert row.output_uri is None  # type: ignore[attr-defined]
    assert (runtime.stats.succeeded, runtime.stats.failed) == (0, 2)
    images = tmp_path / "home" / "images" / "late"
    assert not images.exists() or not any(images.iterdir())


def test_worker_deadline_of_zero_means_none(tmp_path: Path, tiny_dir: Path) -> None:
    settings = load_settings({}, home=str(tmp_path / "home"), broker_url="memory://", render_deadline_s=0)
    assert settings.render_deadline_s == 0
    engine = open_store(settings)
    ids = _submit(engine, tmp_path, "nolimit", ["a cat", "a dog"], tiny_dir)
    runtime = WorkerRuntime.build(settings, make_celery(settings), name="w-test")

    outcome = render_jobs(runtime, ids)
    assert runtime.uploader.drain(timeout_s=120)  # its uploads stored and recorded
    assert (outcome.rendered, outcome.render_failed) == (2, 0)
    assert all(row.status == "succeeded" for row in _rows(engine, ids).values())  # type: ignore[attr-defined]


def test_an_interrupt_stops_the_render_after_the_step_it_is_asked_at(pipe: PixArtAlphaPipeline) -> None:
    from models.pipeline import RenderInterrupted

    asked: list[int] = []

    def interrupt() -> str | None:
        asked.append(1)
        return "its jobs were canceled" if len(asked) == 2 else None

    with pytest.raises(RenderInterrupted, match=r"after step 2 of 4: its jobs were canceled"):
        render_batch(pipe, _requests(), interrupt=interrupt)

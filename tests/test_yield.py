"""Yield-targeted datasets end to end: real `farm worker` processes score every try with tiny scorers built
offline, the store decides the verdicts in try order and adds tries until each line has its accepted images.

What the farm did is checked against a prediction made here, independently of the farm's code: each stored
image is scored again directly (the scores must match what the row says), and replaying the rules over those
scores in try order gives the verdict of every try and how many tries each line takes.
"""

from __future__ import annotations

import io
import json
import signal
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import select

from farm.job import derive_seed
from farm.store.engine import make_engine
from farm.store.schema import Dataset, Job, JobEmbedding
from tests.support.processes import Worker, farm_env, run_farm, wait_until

pytestmark = pytest.mark.integration

PROMPTS = ["a red cube on a table", "a green sphere in the grass", "a blue cone by the sea", "a yellow torus at night"]
ACCEPT, MAX_TRIES, MIN_CLIP = 2, 6, 15.0
RULES = ["--accept", str(ACCEPT), "--max-tries", str(MAX_TRIES), "--min-clip-score", str(MIN_CLIP)]


def _setup(tmp_path: Path, **env_values: str) -> tuple[dict[str, str], Path]:
    home = tmp_path / "home"
    env = farm_env(FARM_HOME=str(home), **env_values)
    for command in (["models", "make-tiny"], ["models", "make-tiny-scorer"]):
        made = run_farm(command, env, timeout_s=300)
        assert made.returncode == 0, made.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    return env, prompts


def _submit(env: dict[str, str], prompts: Path, dataset: str, *extra: str) -> Any:
    return run_farm(
        [
            "submit",
            str(prompts),
            "--dataset",
            dataset,
            "--model",
            "tiny",
            "--width",
            "64",
            "--height",
            "64",
            "--scorer",
            "tiny-scorer",
            *RULES,
            *extra,
        ],
        env,
    )


def _done(env: dict[str, str], dataset: str) -> bool:
    result = run_farm(["status", dataset, "--json"], env)
    return result.returncode == 0 and json.loads(result.stdout)[0]["done"]


def _jobs(url: str, dataset: str) -> list[Any]:
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(
                    select(Job.__table__, JobEmbedding.vector)
                    .join(Dataset, Dataset.id == Job.dataset_id)
                    .outerjoin(JobEmbedding, JobEmbedding.job_id == Job.id)
                    .where(Dataset.name == dataset)
                ).all()
            )
    finally:
        engine.dispose()


def _predicted(clip_by_try: dict[int, float], pixels_by_try: dict[int, str]) -> list[str]:
    """The rules replayed in try order: every try's verdict, and so how many tries the line takes."""
    verdicts: list[str] = []
    tries, accepted_pixels = ACCEPT, []
    k = 0
    while k < tries:
        if clip_by_try[k] < MIN_CLIP:
            verdicts.append("rejected")
        elif pixels_by_try[k] in accepted_pixels:
            verdicts.append("duplicate")
        else:
            verdicts.append("accepted")
            accepted_pixels.append(pixels_by_try[k])
        if verdicts[-1] != "accepted" and tries < MAX_TRIES:
            tries += 1
        k += 1
    return verdicts


def _check_the_yield(jobs: list[Any], read_image: Any, home: Path) -> dict[str, list[str]]:
    """Every line's tries against the prediction; each stored image's scores against a direct call."""
    from models.scoring import load_scorers, pixel_sha256

    scorers = load_scorers(*(str(home / "models" / "tiny-scorer" / part) for part in ("clip", "aesthetic", "safety")))
    lines: dict[str, list[Any]] = defaultdict(list)
    for job in jobs:
        lines[job.line_id].append(job)
    assert len(lines) == len(PROMPTS)
    outcome = {}
    for line_jobs in lines.values():
        line_jobs.sort(key=lambda j: j.try_index)
        prompt = line_jobs[0].prompt
        occurrence = 0  # each prompt appears once in the file
        # Tries are numbered 0 .. T-1, once each, and try k's seed is derived from the base seed, prompt and k.
        assert [j.try_index for j in line_jobs] == list(range(len(line_jobs)))
        assert [j.seed for j in line_jobs] == [derive_seed(0, prompt, occurrence, k) for k in range(len(line_jobs))]
        assert all(j.status == "succeeded" for j in line_jobs)
        for job in line_jobs:
            image = read_image(job)
            [direct] = scorers.score([image], [prompt])
            assert job.clip_score == pytest.approx(direct.clip_score, abs=1e-3)
            assert job.aesthetic_score == pytest.approx(direct.aesthetic, abs=1e-3)
            assert job.nsfw == direct.nsfw
            assert job.pixel_sha256 == pixel_sha256(image) == direct.pixel_sha256
            assert job.vector is not None and len(job.vector) == len(direct.embedding)
            png_scores = json.loads(image.info["scores"])
            assert png_scores["clip_score"] == pytest.approx(job.clip_score)
            assert png_scores["try_index"] == job.try_index
        predicted = _predicted(
            {j.try_index: j.clip_score for j in line_jobs}, {j.try_index: j.pixel_sha256 for j in line_jobs}
        )
        assert [j.verdict for j in line_jobs] == predicted, prompt
        outcome[prompt] = predicted
    verdicts = [v for line in outcome.values() for v in line]
    # The bar did something: some tries were rejected and replaced by new seeds.
    assert "rejected" in verdicts and any(len(line) > ACCEPT for line in outcome.values()), outcome
    return outcome


def test_a_yield_run_on_the_embedded_default(tmp_path: Path) -> None:
    env, prompts = _setup(tmp_path)
    home = Path(env["FARM_HOME"])
    submitted = _submit(env, prompts, "yield")
    assert submitted.returncode == 0, submitted.stderr
    assert "4 yield-targeted lines, each wants 2 accepted in at most 6 tries (clip ≥ 15)" in submitted.stdout
    assert "8 new jobs" in submitted.stdout  # tries 0 and 1 of each line

    worker = Worker(env, tmp_path / "worker.log")
    try:
        wait_until(lambda: _done(env, "yield"), timeout_s=300, what="the yield run", worker=worker)
    finally:
        assert worker.stop() == 0, worker.log()[-3000:]
    jobs = _jobs(f"sqlite:///{home / 'farm.db'}", "yield")

    def read_image(job: Any) -> Image.Image:
        image = Image.open(io.BytesIO((home / "images" / "yield" / f"{job.id}-1.png").read_bytes()))
        image.load()
        return image

    outcome = _check_the_yield(jobs, read_image, home)
    accepted = sum(line.count("accepted") for line in outcome.values())
    rejected = sum(line.count("rejected") for line in outcome.values())

    [status] = json.loads(run_farm(["status", "yield", "--json"], env).stdout)
    assert status["total"] == len(jobs) == sum(len(line) for line in outcome.values())
    assert status["acceptance"]["target"] == ACCEPT * len(PROMPTS)
    assert (status["acceptance"]["accepted"], status["acceptance"]["rejected"]) == (accepted, rejected)
    shown = run_farm(["status", "yield"], env).stdout
    assert f"accepted {accepted}/{ACCEPT * len(PROMPTS)}  rejected {rejected}" in shown

    listed = run_farm(["jobs", "yield", "--verdict", "rejected", "--limit", "100"], env).stdout.splitlines()
    assert len(listed) == rejected and all(f"< {MIN_CLIP:g})" in line for line in listed)

    # Exports: accepted images only by default (the dataset has rules); every image with --all.
    assert run_farm(["export", "yield", "--format", "jsonl", "--to", str(tmp_path / "acc")], env).returncode == 0
    assert (
        run_farm(["export", "yield", "--format", "jsonl", "--to", str(tmp_path / "all"), "--all"], env).returncode == 0
    )
    rows = [json.loads(line) for part in sorted((tmp_path / "acc").glob("*.jsonl")) for line in part.open()]
    every = [json.loads(line) for part in sorted((tmp_path / "all").glob("*.jsonl")) for line in part.open()]
    assert sorted(r["job_id"] for r in rows) == sorted(j.id for j in jobs if j.verdict == "accepted")
    assert len(every) == len(jobs) and {r["verdict"] for r in every} >= {"accepted", "rejected"}
    assert all(r["clip_score"] is not None for r in every)

    # The contact sheet can show just the rejects, with their scores and reasons.
    shown = run_farm(["preview", "yield", "--verdict", "rejected", "--out", str(tmp_path / "rejects")], env)
    assert shown.returncode == 0 and f"{rejected} images" in shown.stdout, shown.stderr
    gallery = (tmp_path / "rejects" / "index.html").read_text()
    assert gallery.count("· rejected (clip score ") == rejected

    # The same file again adds nothing; other rules are refused, naming the rule, and write nothing.
    again = _submit(env, prompts, "yield")
    assert again.returncode == 0 and "0 new jobs" in again.stdout, again.stdout
    other = _submit(env, prompts, "yield", "--min-clip-score", "16")
    assert other.returncode == 2
    assert "field 'min_clip_score'" in other.stderr and "was 15.0, now 16.0" in other.stderr
    assert len(_jobs(f"sqlite:///{home / 'farm.db'}", "yield")) == len(jobs)


def test_a_killed_worker_changes_no_verdict_on_postgres_and_redis(
    tmp_path: Path, own_pg_url: str, redis_url: str, queue_name: str
) -> None:
    """The production path: a worker SIGKILLed mid-run, its leases expire, another finishes; the tries, seeds and
    verdicts are still exactly the prediction, and every row names an object holding its image."""
    env, prompts = _setup(
        tmp_path,
        FARM_DATABASE_URL=own_pg_url,
        FARM_BROKER_URL=redis_url,
        FARM_QUEUE=queue_name,
        FARM_LEASE_S="6",
        FARM_BATCH_SIZE="2",
    )
    home = Path(env["FARM_HOME"])
    assert _submit(env, prompts, "chaos").returncode == 0

    def succeeded() -> int:
        return sum(1 for job in _jobs(own_pg_url, "chaos") if job.status == "succeeded")

    first = Worker(env, tmp_path / "first.log")
    try:
        wait_until(lambda: succeeded() >= 3, timeout_s=240, what="three tries recorded", worker=first)
    finally:
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(timeout=30)
        first.stop()
    second = Worker(env, tmp_path / "second.log")
    try:
        wait_until(lambda: _done(env, "chaos"), timeout_s=300, what="the run after the kill", worker=second)
    finally:
        assert second.stop() == 0, second.log()[-3000:]
    jobs = _jobs(own_pg_url, "chaos")

    def read_image(job: Any) -> Image.Image:
        path = Path(job.output_uri.removeprefix("file://"))
        image = Image.open(io.BytesIO(path.read_bytes()))
        image.load()
        return image

    _check_the_yield(jobs, read_image, home)
    # Exactly once: one row per try, and after `farm gc` the folder holds exactly the objects the rows name.
    assert len({(j.line_id, j.try_index) for j in jobs}) == len(jobs)
    assert run_farm(["gc", "chaos"], env).returncode == 0
    files = {p.as_uri() for p in (home / "images" / "chaos").glob("*.png")}
    assert files == {j.output_uri for j in jobs}

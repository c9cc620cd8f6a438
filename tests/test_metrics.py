"""Worker metrics: the Prometheus endpoint of a real `farm worker`, the metrics object, and Flower's events."""

from __future__ import annotations

import json
import shutil
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from farm.dispatch.broker import celery_config
from farm.settings import load_settings
from tests.support.processes import Worker, farm_env, run_farm, wait_until
from tests.support.s3 import free_port
from workers.metrics import WorkerMetrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value, from Prometheus exposition text."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_celery_task_events_are_on_for_flower(tmp_path: Path) -> None:
    conf = celery_config(load_settings({}, home=str(tmp_path)))
    assert conf["worker_send_task_events"] is True
    assert conf["task_send_sent_event"] is True


def test_metrics_object_counts_renders_errors_and_cache_stats() -> None:
    metrics = WorkerMetrics()
    before = _samples(metrics.render_text())
    assert before[("errors_total", (("kind", "render"),))] == 0  # present before the first error
    assert before[("errors_total", (("kind", "upload"),))] == 0
    assert not any(name.startswith("cache_") for name, _ in before)  # no caches yet: nothing invented

    metrics.observe_render(4, 0.3)
    metrics.observe_render(1, 2.0)
    metrics.count_errors("upload", 2)
    metrics.count_errors("render", 0)
    metrics.track_caches(lambda: {"prompts": {"hits": 7, "misses": 3, "entries": 3}, "t5_loads": 1})
    after = _samples(metrics.render_text())
    assert after[("images_rendered_total", ())] == 5
    assert after[("render_seconds_count", ())] == 5
    assert after[("render_seconds_sum", ())] == pytest.approx(3.2)
    assert after[("render_seconds_bucket", (("le", "0.5"),))] == 4
    assert after[("errors_total", (("kind", "upload"),))] == 2
    assert after[("errors_total", (("kind", "render"),))] == 0
    assert after[("cache_hits_total", (("cache", "prompts"),))] == 7
    assert after[("cache_misses_total", (("cache", "prompts"),))] == 3
    assert after[("cache_entries", (("cache", "prompts"),))] == 3
    assert not any(name == "farm_pending_jobs" for name, _ in after)  # no backlog source: no figures

    backlog: dict[str, int] | None = None
    metrics.track_pending(lambda: backlog)
    assert not any(name == "farm_pending_jobs" for name, _ in _samples(metrics.render_text()))  # not counted yet
    backlog = {"small-cards": 120, "big-cards": 0}
    counted = _samples(metrics.render_text())
    assert counted[("farm_pending_jobs", (("pool", "small-cards"),))] == 120
    assert counted[("farm_pending_jobs", (("pool", "big-cards"),))] == 0


def test_images_per_second_and_mfu_after_a_render(tiny_model: Path) -> None:
    """render_images_per_second and render_mfu: absent before the first render; after one (the tiny model, timed and
    counted as workers/tasks.py does), images/s of that call, and MFU only once a peak is known (a CPU has none
    unless FARM_PEAK_TFLOPS sets it)."""
    import time

    from models.flops import image_flops
    from models.pipeline import RenderRequest, load_pipeline, render_batch

    metrics = WorkerMetrics()
    assert not any(name.startswith(("render_images_per", "render_mfu")) for name, _ in _samples(metrics.render_text()))
    pipe = load_pipeline(str(tiny_model), device="cpu")
    requests = [RenderRequest(prompt=f"a red cube {i}", seed=i, width=128, height=128) for i in range(2)]
    started = time.perf_counter()
    render_batch(pipe, requests)
    per_image_s = (time.perf_counter() - started) / len(requests)
    flops = image_flops(pipe, 128, 128, 4)
    assert flops is not None and flops > 0

    metrics.track_peak(lambda: None)  # a CPU without FARM_PEAK_TFLOPS
    metrics.observe_render(len(requests), per_image_s, flops_per_image=flops)
    samples = _samples(metrics.render_text())
    assert samples[("render_images_per_second", ())] == pytest.approx(1 / per_image_s)
    assert ("render_mfu", ()) not in samples

    metrics.track_peak(lambda: 2e12)  # FARM_PEAK_TFLOPS=2
    metrics.observe_render(len(requests), per_image_s, flops_per_image=flops)
    samples = _samples(metrics.render_text())
    assert samples[("render_mfu", ())] == pytest.approx(flops / per_image_s / 2e12)
    assert 0 < samples[("render_mfu", ())] < 1


@pytest.mark.integration
def test_a_real_worker_serves_its_metrics(tmp_path: Path, tiny_model: Path) -> None:
    """Embedded default, tiny model: three images, then scrape /metrics over HTTP."""
    home = tmp_path / "home"
    shutil.copytree(tiny_model, home / "models" / "tiny")
    env = farm_env(FARM_HOME=str(home), FARM_PEAK_TFLOPS="5")  # a CPU has no MFU unless a peak is configured
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\na green sphere\na blue cone\n")
    submitted = run_farm(["submit", str(prompts), "--dataset", "metrics", "--model", "tiny"], env)
    assert submitted.returncode == 0, submitted.stderr

    port = free_port()
    worker = Worker(env, tmp_path / "worker.log", extra_args=("--metrics-port", str(port)))
    try:

        def done() -> bool:
            result = run_farm(["status", "metrics", "--json"], env)
            return result.returncode == 0 and json.loads(result.stdout)[0]["counts"]["succeeded"] == 3

        wait_until(done, timeout_s=240, what="three images", worker=worker)
        url = f"http://127.0.0.1:{port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200
            text = response.read().decode("utf-8")
    finally:
        worker.stop()

    samples = _samples(text)
    assert samples[("images_rendered_total", ())] == 3, text
    assert samples[("render_seconds_count", ())] == 3
    assert samples[("render_seconds_sum", ())] > 0
    assert samples[("queue_wait_seconds_count", ())] == 3
    assert samples[("errors_total", (("kind", "render"),))] == 0
    assert samples[("errors_total", (("kind", "upload"),))] == 0
    caches = {dict(labels)["cache"] for name, labels in samples if name == "cache_hits_total"}
    assert {"pipelines", "prompts"} <= caches, caches
    # The pipeline was loaded once (a miss); the three prompts were each encoded once (misses).
    assert samples[("cache_misses_total", (("cache", "pipelines"),))] == 1
    assert samples[("cache_misses_total", (("cache", "prompts"),))] == 3
    # The last pipeline call's images/s, and its MFU against FARM_PEAK_TFLOPS.
    assert samples[("render_images_per_second", ())] > 0
    assert 0 < samples[("render_mfu", ())] < 1
    # The fleet's backlog, as the worker's control loop counted it: nothing left waiting.
    assert samples[("farm_pending_jobs", (("pool", "(no pool)"),))] == 0


def test_score_histograms_per_pool() -> None:
    from dataclasses import dataclass

    @dataclass
    class Result:  # what models/scoring.py returns for one image
        clip_score: float
        aesthetic: float | None
        nsfw: bool | None

    metrics = WorkerMetrics()
    metrics.observe_scores("big-cards", [Result(21.0, 5.2, False), Result(31.0, None, True)], 0.004)
    samples = _samples(metrics.render_text())
    assert samples[("clip_score_count", (("pool", "big-cards"),))] == 2
    assert samples[("clip_score_bucket", (("le", "22.5"), ("pool", "big-cards")))] == 1
    assert samples[("aesthetic_score_count", (("pool", "big-cards"),))] == 1
    assert samples[("nsfw_flagged_total", (("pool", "big-cards"),))] == 1
    assert samples[("score_seconds_count", (("pool", "big-cards"),))] == 2

"""`farm bench` runs all three sides on one machine and reports every figure (no timing is asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.processes import farm_env, run_farm


def test_farm_bench_reports_bare_loop_batched_and_farm_figures(tmp_path: Path) -> None:
    """Any model folder, here a tiny one that ships DPM-Solver++ (sampled with CFG 4.5 on both sides)."""
    out = tmp_path / "bench.json"
    env = farm_env(FARM_HOME=str(tmp_path / "home"))
    folder = tmp_path / "tiny-dpm"
    assert run_farm(["models", "make-tiny", str(folder), "--sampler", "dpm"], env).returncode == 0
    result = run_farm(
        ["bench", "--model", str(folder), "--prompts", "6", "--batch-size", "3", "--json", str(out)], env, timeout_s=600
    )
    assert result.returncode == 0, result.stdout + result.stderr
    figures = json.loads(out.read_text())
    assert (figures["prompts"], figures["batch_size"], figures["workers"]) == (6, 3, 1)
    assert (figures["source"], figures["sampler"], figures["guidance_scale"]) == (str(folder), "the folder's own", 4.5)
    assert figures["size"] == [128, 128]
    for side in ("a_bare_loop", "b_bare_batched", "c_farm"):
        assert figures[side]["images_per_s"] > 0 and figures[side]["seconds"] > 0
    c = figures["c_farm"]
    assert 0 < c["latency_p50_s"] <= c["latency_p95_s"]
    assert c["seconds"] >= c["latency_p95_s"]  # the clock runs from the start of the submit, before any job exists
    assert abs(figures["c_over_b"] - c["images_per_s"] / figures["b_bare_batched"]["images_per_s"]) < 1e-9
    assert "c/b" in result.stdout and "img/s" in result.stdout
    # The farm side really ran through the farm: its dataset is in the job store, every job succeeded.
    status = json.loads(run_farm(["status", "--json"], env).stdout)
    bench = [s for s in status if s["dataset"].startswith("bench-") and "warmup" not in s["dataset"]]
    assert len(bench) == 1 and bench[0]["counts"]["succeeded"] == 6

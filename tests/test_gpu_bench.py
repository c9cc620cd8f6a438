"""benchmarks/gpu_bench.py's CPU smoke run (`--tiny`): every part of the GPU script runs end to end here, so the
script a GPU machine gets is known to work but for the GPU itself. Its timings mean nothing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.support.processes import REPO, farm_env


def test_gpu_bench_tiny_runs_every_part(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    # The budget is the script's own guard (330 s on a GPU, 55 s by default here); a generous one so that a busy
    # test machine still runs every part.
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_bench", "--tiny", "--budget-s", "400", "--out", str(out)],
        cwd=REPO,
        env=farm_env(),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads(out.read_text())
    rows = {(row["config"], row["batch"]): row for row in report["rows"]}
    for config in ("eager", "+sdpa", "+fuse_qkv", "+channels_last"):
        for batch in (1, 2):
            assert rows[(config, batch)]["status"] == "ok", rows[(config, batch)]
            assert rows[(config, batch)]["mfu_measured_peak"] > 0
    compiled = rows[("+compile", 2)]
    assert compiled["status"] == "ok" and compiled["warmup_s"], compiled
    assert rows[("+int8_dynamic (eager)", 2)]["status"] == "ok"
    assert {r["config"]: r["status"] for r in report["quant"]}["+fp8_dynamic (eager)"] == "unavailable"  # a CPU
    assert report["breakdown"]["transformer_4_steps"]["s_per_image"] > 0
    e2e = report["e2e"]
    assert e2e["status"] == "ok" and e2e["succeeded"] == e2e["images"] == 4, e2e
    assert e2e["worker_metrics"]["render_images_per_second"] > 0
    assert e2e["worker_metrics"]["render_mfu"] > 0  # the worker got the measured peak as FARM_PEAK_TFLOPS
    assert report["memory"]["status"] == "ok"
    assert report["tflops_per_image"] > 0 and report["peak"]["tflops"] > 0
    assert report["skipped"] == []
    assert "config" in result.stdout and "images/s" in result.stdout  # the readable table

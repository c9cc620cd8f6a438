"""Golden job ids: resubmitting a file must map onto the jobs it made before, whatever the code layout.

The constants below were computed by the planner before the floor-plan reorganisation (issue 9). A change that
moves a byte of any job id breaks resubmission (a second copy of every image), so never update them: fix the
code instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from farm.submit.plan import SubmitOptions, plan_submission


def _ppm(path: Path, shade: int) -> Path:
    """A condition image written byte by byte (binary PPM), so its sha256 does not depend on an encoder."""
    width = height = 16
    pixels = bytes((shade + x + y) % 256 for y in range(height) for x in range(width) for _ in range(3))
    path.write_bytes(b"P6\n%d %d\n255\n" % (width, height) + pixels)
    return path


def _digest(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()


def test_plain_text_file_ids(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox in the snow\na lighthouse at dusk\na red fox in the snow\n\nhéllo wörld\n")
    plan = plan_submission(prompts, SubmitOptions(dataset="golden", model="tiny", images_per_prompt=3, seed=7))
    assert len(plan.ids) == 12
    assert plan.ids[:2] == ["bbb067d47bfc5b5973b004d5ccb8c866", "6b9c22cb47aae05549908b7c3c64b349"]
    assert _digest(plan.ids) == "3311da2331ca413c10ea2b2729f8316cf33a4131b62e3542747a63fb503a139a"


def test_jsonl_rows_grid_and_controlnet_ids(tmp_path: Path) -> None:
    _ppm(tmp_path / "edges-a.ppm", 10)
    _ppm(tmp_path / "edges-b.ppm", 90)
    rows = [
        {"prompt": "a castle", "control_image": "edges-a.ppm"},
        {"prompt": "a castle", "control_image": "edges-b.ppm", "conditioning_scale": 0.5, "seed": 42},
        {"prompt": "a ship", "control_image": "edges-a.ppm", "width": 256, "height": 128},
    ]
    prompts = tmp_path / "rows.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = SubmitOptions(
        dataset="golden.control",
        model="tiny",
        controlnet="tiny-controlnet",
        quantize="int8",
        vary=("steps=2,4", "guidance_scale=0,1.5"),
    )
    plan = plan_submission(prompts, options)
    assert len(plan.ids) == 12
    assert plan.ids[0] == "74870a4eb7751ab69cd393545a80c345"
    assert _digest(plan.ids) == "edb98799cc20191b2d0f3485465844faa36b55f21e35666f5df85c12dcfb805e"

"""farm.grid: `--vary` axes, their validation, and the cartesian expansion of every prompt row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from farm.cli import main
from farm.errors import InvalidSubmission
from farm.submit.fields import MAX_SEED
from farm.submit.grid import MAX_AXIS_VALUES, parse_axis, parse_grid, variations
from farm.submit.plan import SubmitOptions, plan_submission

VARY = ["--vary", "seed=0..3", "--vary", "size=256x256,128x192"]


def _txt(tmp_path: Path, prompts: list[str]) -> Path:
    path = tmp_path / "p.txt"
    path.write_text("".join(p + "\n" for p in prompts), encoding="utf-8")
    return path


@pytest.mark.parametrize(
    ("text", "values"),
    [
        ("seed=0..3", [{"seed": s} for s in range(4)]),
        ("seed=7", [{"seed": 7}]),
        ("seed=1,5..6, 9", [{"seed": 1}, {"seed": 5}, {"seed": 6}, {"seed": 9}]),
        ("size=1024x1024,768X1344", [{"width": 1024, "height": 1024}, {"width": 768, "height": 1344}]),
        ("steps=2..4", [{"num_inference_steps": n} for n in (2, 3, 4)]),
        ("num_inference_steps=1,8", [{"num_inference_steps": 1}, {"num_inference_steps": 8}]),
        ("guidance_scale=0,1.5", [{"guidance_scale": 0.0}, {"guidance_scale": 1.5}]),
        ("guidance-scale=4.5", [{"guidance_scale": 4.5}]),
        ("conditioning_scale=0.5,1", [{"conditioning_scale": 0.5}, {"conditioning_scale": 1.0}]),
    ],
)
def test_parse_axis(text: str, values: list[dict[str, Any]]) -> None:
    assert list(parse_axis(text).values) == values


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("seed", "expected AXIS=VALUES"),
        ("colour=red", "unknown axis 'colour'"),
        ("seed=", "empty value"),
        ("seed=1,,2", "empty value"),
        ("seed=5..2", "empty range"),
        ("seed=-1..3", "seed must be between 0"),
        (f"seed=0,{MAX_SEED + 1}", "seed must be between 0"),
        ("seed=x", "seed must be an integer"),
        ("steps=0..4", "num_inference_steps must be between 1 and 200"),
        ("steps=201", "num_inference_steps must be between 1 and 200"),
        ("size=1001x1024", "width must be a multiple of 16"),
        ("size=1024x32", "height must be between 64 and 4096"),
        ("size=1024", "WIDTHxHEIGHT"),
        ("guidance_scale=0..3", "comma lists"),
        ("guidance_scale=31", "guidance_scale must be between 0.0 and 30.0"),
        ("conditioning_scale=2.5", "conditioning_scale must be between 0.0 and 2.0"),
        (f"seed=0..{MAX_AXIS_VALUES}", f"more than {MAX_AXIS_VALUES} values"),
    ],
)
def test_bad_axis_names_the_option_and_value(text: str, reason: str) -> None:
    with pytest.raises(InvalidSubmission) as info:
        parse_axis(text)
    message = str(info.value)
    assert message.startswith(f"--vary {text}: ")
    assert reason in message
    assert info.value.field == "vary"


def test_axis_given_twice_is_an_error() -> None:
    with pytest.raises(InvalidSubmission, match="given twice"):
        parse_grid(["seed=0..1", "seed=4"])


def test_variations_are_the_cartesian_product() -> None:
    axes = parse_grid(["seed=0..2", "size=256x256,128x192", "steps=2,4"])
    combos = variations(axes)
    assert len(combos) == 3 * 2 * 2
    assert len({tuple(sorted(c.items())) for c in combos}) == 12
    assert {"seed": 2, "width": 128, "height": 192, "num_inference_steps": 4} in combos
    assert variations(()) == [{}]


def test_grid_expands_every_prompt(tmp_path: Path) -> None:
    path = _txt(tmp_path, ["a red fox", "a blue whale", "a cat"])
    options = SubmitOptions(dataset="d", vary=("seed=0..3", "size=256x256,128x192"))
    plan = plan_submission(path, options)
    assert (plan.rows, plan.variations, plan.planned, plan.duplicates) == (3, 8, 24, 0)
    assert len(plan.specs) == 24
    assert len(set(plan.ids)) == 24
    for prompt in ("a red fox", "a blue whale", "a cat"):
        mine = [s for s in plan.specs if s.prompt == prompt]
        assert sorted((s.seed, s.width, s.height) for s in mine) == sorted(
            (seed, w, h) for seed in range(4) for w, h in ((256, 256), (128, 192))
        )
    assert {s.num_inference_steps for s in plan.specs} == {4}


def test_grid_without_seed_axis_keeps_one_seed_per_prompt_across_variations(tmp_path: Path) -> None:
    path = _txt(tmp_path, ["a red fox", "a cat"])
    plan = plan_submission(path, SubmitOptions(dataset="d", vary=("steps=2..4",), images_per_prompt=2))
    assert plan.planned == 2 * 2 * 3
    for prompt in ("a red fox", "a cat"):
        seeds_by_steps = {
            n: sorted(s.seed for s in plan.specs if s.prompt == prompt and s.num_inference_steps == n)
            for n in (2, 3, 4)
        }
        # The same two seeds at every step count, so the variations compare like with like.
        assert seeds_by_steps[2] == seeds_by_steps[3] == seeds_by_steps[4]
        assert len(set(seeds_by_steps[2])) == 2


def test_vary_seed_needs_one_image_per_prompt(tmp_path: Path) -> None:
    path = _txt(tmp_path, ["a"])
    with pytest.raises(InvalidSubmission) as info:
        plan_submission(path, SubmitOptions(dataset="d", images_per_prompt=3, vary=("seed=0..1",)))
    assert info.value.field == "images_per_prompt"
    assert "--images-per-prompt must be 1" in str(info.value)


def test_row_setting_a_varied_field_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "width": 512}) + "\n")
    with pytest.raises(InvalidSubmission) as info:
        plan_submission(path, SubmitOptions(dataset="d", vary=("size=256x256",)))
    assert (info.value.line, info.value.field) == (2, "width")
    assert "which --vary also sets" in str(info.value)


def test_vary_conditioning_scale_needs_a_controlnet(tmp_path: Path) -> None:
    with pytest.raises(InvalidSubmission, match="needs --controlnet"):
        plan_submission(_txt(tmp_path, ["a"]), SubmitOptions(dataset="d", vary=("conditioning_scale=0.5,1",)))


def test_cli_prints_the_count_and_writes_nothing_on_a_bad_axis(tmp_path: Path) -> None:
    path = _txt(tmp_path, ["a", "b", "c"])
    home = tmp_path / "home"
    bad = CliRunner().invoke(
        main, ["--home", str(home), "submit", str(path), "--dataset", "d", "--vary", "size=1001x1024"]
    )
    assert bad.exit_code == 2
    assert "--vary size=1001x1024" in bad.output
    assert "1001" in bad.output
    assert not home.exists()

    good = CliRunner().invoke(
        main,
        ["--home", str(home), "submit", str(path), "--dataset", "d", "--no-dispatch", *VARY],
    )
    assert good.exit_code == 0, good.output
    lines = good.output.splitlines()
    assert lines[0] == "3 prompts × 8 variations = 24 jobs"
    assert "dataset d: 24 new jobs, 0 already present" in good.output

"""A hostile-input corpus: prompt files written by someone else. Each case is refused by `farm submit` with exit 2
and a message naming the file, the line and the field; nothing is written to the job store or to storage; no
read hangs or runs out of memory; and a path inside a prompt file never reaches a file outside its folder."""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from PIL import Image

from farm.cli import main

SECRET = b"private scan: not for the farm"


def _png(path: Path, color: tuple[int, int, int] = (200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path, format="PNG")
    return path


@pytest.fixture()
def world(tmp_path: Path) -> dict[str, Path]:
    """A prompt folder with a good condition image, and private files beside it that rows must never reach."""
    folder = tmp_path / "batch"
    _png(folder / "good.png")
    private = tmp_path / "private"
    _png(private / "scan.png", (1, 2, 3))
    (private / "notes.png").write_bytes(SECRET)
    return {"home": tmp_path / "home", "folder": folder, "private": private}


def _submit(world: dict[str, Path], rows: list[object], *extra: str, name: str = "p.jsonl") -> tuple[Result, Path]:
    path = world["folder"] / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    good = str(world["folder"] / "good.png")
    return CliRunner().invoke(main, [*_args(world, path), "--control-image", good, *extra]), path


def _args(world: dict[str, Path], path: Path) -> list[str]:
    """`farm --home HOME submit PATH --dataset hostile --controlnet tiny-controlnet`."""
    return [
        "--home",
        str(world["home"]),
        "submit",
        str(path),
        "--dataset",
        "hostile",
        "--controlnet",
        "tiny-controlnet",
    ]


def _nothing_written(world: dict[str, Path]) -> None:
    database = world["home"] / "farm.db"
    if database.exists():
        with sqlite3.connect(database) as conn:
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "jobs" in tables:
                assert conn.execute("SELECT count(*) FROM jobs").fetchone() == (0,)
                assert conn.execute("SELECT count(*) FROM datasets").fetchone() == (0,)
    images = world["home"] / "images"
    assert not images.exists() or not [p for p in images.rglob("*") if p.is_file()]


def _refused(result: Result, path: Path, line: int, field: str) -> str:
    assert result.exit_code == 2, result.output
    assert f"{path}:{line}" in result.output and f"field '{field}'" in result.output, result.output
    assert "Traceback" not in result.output
    return result.output


ROW_ESCAPES: dict[str, Callable[[dict[str, Path]], str]] = {
    "traversal": lambda w: "../private/scan.png",
    "deep traversal": lambda w: "good.png/../../private/scan.png",
    "absolute outside": lambda w: str(w["private"] / "scan.png"),
    "a device": lambda w: "/dev/zero",
    "a symlink out": lambda w: _link(w["folder"] / "link.png", w["private"] / "scan.png"),
    "a symlinked folder out": lambda w: _link(w["folder"] / "sub", w["private"]) + "/scan.png",
    "a symlink to a device": lambda w: _link(w["folder"] / "zero.png", Path("/dev/zero")),
    "a FIFO": lambda w: _fifo(w["folder"] / "pipe.png"),
    "missing": lambda w: "nowhere.png",
    "not an image": lambda w: _copy(w["private"] / "notes.png", w["folder"] / "notes.png"),
    "a folder": lambda w: _mkdir(w["folder"] / "dir.png"),
}


def _link(link: Path, target: Path) -> str:
    link.symlink_to(target)
    return link.name


def _fifo(path: Path) -> str:
    os.mkfifo(path)
    return path.name


def _copy(source: Path, target: Path) -> str:
    target.write_bytes(source.read_bytes())
    return target.name


def _mkdir(path: Path) -> str:
    path.mkdir()
    return path.name


@pytest.mark.parametrize("case", sorted(ROW_ESCAPES))
def test_a_row_path_outside_the_folder_or_not_a_plain_image_is_refused_alike(world: dict[str, Path], case: str) -> None:
    value = ROW_ESCAPES[case](world)
    result, path = _submit(world, [{"prompt": "fine"}, {"prompt": "hostile", "control_image": value}])
    output = _refused(result, path, 2, "control_image")
    # One wording whatever is wrong, so a prompt file cannot learn which files exist or what they hold.
    assert f"control image must be a readable image file inside {world['folder'].resolve()}" in output
    assert SECRET.decode() not in output
    _nothing_written(world)


def test_every_row_fault_reads_the_same_but_for_the_value(world: dict[str, Path]) -> None:
    messages = set()
    for case in ("traversal", "missing", "not an image", "a symlink out"):
        value = ROW_ESCAPES[case](world)
        result, _ = _submit(world, [{"prompt": "x", "control_image": value}])
        messages.add(result.output.replace(repr(value), "VALUE").replace(json.dumps(value), "VALUE"))
    assert len(messages) == 1, messages


def test_a_folder_named_with_control_dir_may_be_used(world: dict[str, Path]) -> None:
    rows = [{"prompt": "x", "control_image": str(world["private"] / "scan.png")}]
    result, _ = _submit(world, rows, "--control-dir", str(world["private"]), "--dry-run")
    assert result.exit_code == 0, result.output
    refused, path = _submit(
        world, [{"prompt": "x", "control_image": "../private/scan.png"}], "--control-dir", str(world["private"])
    )
    _refused(refused, path, 1, "control_image")  # relative paths still resolve inside the file's own folder


def test_a_huge_control_image_is_refused_at_the_cap_without_reading_it(
    world: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = world["folder"] / "huge.png"
    with huge.open("wb") as f:  # 2 GB, sparse: reading it all would take memory and time the test does not have
        f.truncate(2 << 30)
    monkeypatch.setenv("FARM_CONTROL_IMAGE_MAX_BYTES", str(8 << 20))
    result, path = _submit(world, [{"prompt": "x", "control_image": "huge.png"}])
    assert "larger than 8388608 bytes (FARM_CONTROL_IMAGE_MAX_BYTES)" in _refused(result, path, 1, "control_image")
    _nothing_written(world)


@pytest.mark.parametrize("kind", ["a FIFO", "a device", "huge"])
def test_trusted_command_line_images_are_still_read_safely(world: dict[str, Path], kind: str) -> None:
    if kind == "a FIFO":
        target = world["folder"] / "pipe.png"
        os.mkfifo(target)
    elif kind == "a device":
        target = Path("/dev/zero")
    else:
        target = world["folder"] / "huge.png"
        with target.open("wb") as f:
            f.truncate(1 << 30)
    path = world["folder"] / "p.txt"
    path.write_text("a prompt\n")
    result = CliRunner().invoke(main, [*_args(world, path), "--control-image", str(target)])
    assert result.exit_code == 2 and "field 'control_image'" in result.output, result.output
    assert ("not a regular file" if kind != "huge" else "larger than") in result.output
    _nothing_written(world)


def test_a_one_gigabyte_line_is_refused_without_reading_it(world: dict[str, Path]) -> None:
    path = world["folder"] / "p.txt"
    with path.open("wb") as f:
        f.write(b"a fine first prompt\n")
        f.truncate(1 << 30)  # the second line: a gigabyte of NULs with no newline, sparse on disk
    result = CliRunner().invoke(main, ["--home", str(world["home"]), "submit", str(path), "--dataset", "hostile"])
    assert result.exit_code == 2, result.output
    assert f"{path}:2" in result.output and "longer than 1048576 bytes" in result.output
    _nothing_written(world)


def test_malformed_utf8_names_its_line(world: dict[str, Path]) -> None:
    path = world["folder"] / "p.txt"
    path.write_bytes(b"fine\nalso fine\nbroken \xff\xfe bytes\n")
    result = CliRunner().invoke(main, ["--home", str(world["home"]), "submit", str(path), "--dataset", "hostile"])
    assert result.exit_code == 2 and f"{path}:3" in result.output and "not UTF-8" in result.output, result.output
    _nothing_written(world)


@pytest.mark.parametrize("field", ["prompt", "control_image"])
def test_nul_characters_are_refused(world: dict[str, Path], field: str) -> None:
    row = {"prompt": "a\x00b"} if field == "prompt" else {"prompt": "x", "control_image": "good.png\x00.txt"}
    result, path = _submit(world, [{"prompt": "fine"}, row])
    assert "contains a NUL character" in _refused(result, path, 2, field)
    _nothing_written(world)


def test_a_prompt_file_that_is_a_fifo_is_refused_without_hanging(world: dict[str, Path]) -> None:
    path = world["folder"] / "p.txt"
    os.mkfifo(path)
    result = CliRunner().invoke(main, ["--home", str(world["home"]), "submit", str(path), "--dataset", "hostile"])
    assert result.exit_code == 2 and f"{path}: not a regular file" in result.output, result.output
    _nothing_written(world)


def test_jobs_remember_their_file_and_line(world: dict[str, Path]) -> None:
    home = world["home"]
    for name, prompt in (("first.txt", "a castle"), ("second.txt", "a ship")):
        (world["folder"] / name).write_text(f"{prompt}\n")
        args = ["--home", str(home), "submit", str(world["folder"] / name), "--dataset", "two", "--no-dispatch"]
        assert CliRunner().invoke(main, args).exit_code == 0
    listed = CliRunner().invoke(main, ["--home", str(home), "jobs", "two"]).output
    assert f"{world['folder'] / 'first.txt'}:1" in listed and f"{world['folder'] / 'second.txt'}:1" in listed

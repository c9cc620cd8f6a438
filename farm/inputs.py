"""Prompt files: .txt (one prompt a line), .jsonl (one object a line) and .csv (a header with `prompt`)."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import InvalidSubmission

FORMATS = (".txt", ".jsonl", ".csv")

# Per-row fields a file may carry; `steps` is accepted as the short spelling of num_inference_steps.
ROW_FIELDS = (
    "prompt",
    "seed",
    "width",
    "height",
    "num_inference_steps",
    "guidance_scale",
    "images_per_prompt",
    "control_image",  # a condition image; a relative path resolves against the prompt file's folder
    "conditioning_scale",
)
ALIASES = {"steps": "num_inference_steps"}


@dataclass(frozen=True)
class Row:
    """One input row: where it came from and its raw fields (validated later, in one place)."""

    path: str
    line: int
    fields: dict[str, Any]


def read_rows(path: Path) -> list[Row]:
    """Read every row of a prompt file; a malformed row raises InvalidSubmission naming file and line."""
    name = str(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidSubmission(
            f"unsupported file type {suffix or '(none)'}; use one of {', '.join(FORMATS)}", path=name
        )
    try:
        # utf-8-sig: spreadsheet exports start with a BOM, which would otherwise hide the `prompt` header.
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidSubmission("file not found", path=name) from None
    except UnicodeDecodeError as exc:
        raise InvalidSubmission(f"not UTF-8 text ({exc.reason} at byte {exc.start})", path=name) from None
    except OSError as exc:
        raise InvalidSubmission(f"cannot read: {exc.strerror}", path=name) from None
    reader = {".txt": _txt, ".jsonl": _jsonl, ".csv": _csv}[suffix]
    rows = [Row(name, line, _canonical(name, line, fields)) for line, fields in reader(name, text)]
    if not rows:
        raise InvalidSubmission("no prompts in file", path=name)
    return rows


def _lines(text: str) -> list[str]:
    # read_text already turned \r\n and \r into \n; str.splitlines would also split inside a prompt at
    # U+2028, U+0085 or a form feed (valid inside JSON strings), breaking rows and shifting line numbers.
    return text.split("\n")


def _txt(name: str, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in enumerate(_lines(text), start=1):
        if raw.strip():
            yield line, {"prompt": raw.strip()}


def _jsonl(name: str, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in enumerate(_lines(text), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise InvalidSubmission(f"malformed JSON: {exc.msg} at column {exc.colno}", path=name, line=line) from None
        if not isinstance(value, dict):
            raise InvalidSubmission(
                f"each line must be a JSON object, got {type(value).__name__}", path=name, line=line
            )
        yield line, value


def _csv(name: str, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    header = reader.fieldnames or []
    if "prompt" not in header:
        raise InvalidSubmission(f"the header must have a 'prompt' column, got {header}", path=name, line=1)
    try:
        for record in reader:
            if None in record:
                raise InvalidSubmission("more values than header columns", path=name, line=reader.line_num)
            fields = {k: v for k, v in record.items() if v not in ("", None)}
            if fields:
                yield reader.line_num, fields
    except csv.Error as exc:
        raise InvalidSubmission(f"malformed CSV: {exc}", path=name, line=reader.line_num) from None


def _canonical(name: str, line: int, fields: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in fields.items():
        canonical = ALIASES.get(key, key)
        if canonical not in ROW_FIELDS:
            raise InvalidSubmission(
                f"unknown field (allowed: {', '.join(ROW_FIELDS)}, steps)",
                path=name,
                line=line,
                field=key,
                value=value,
            )
        if canonical in out:
            raise InvalidSubmission(
                "given twice (steps is num_inference_steps)", path=name, line=line, field=key, value=value
            )
        out[canonical] = value
    return out

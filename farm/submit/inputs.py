"""Prompts: .txt (one a line), .jsonl (one object a line), .csv (a header with `prompt`), .parquet (a `prompt`
column), or a Python list of strings or dicts (farm.Client)."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import stat
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from farm.errors import InvalidSubmission

FORMATS = (".txt", ".jsonl", ".csv", ".parquet")
MAX_LINE_BYTES = 1 << 20  # a line longer than this is refused without reading the rest of it
IN_MEMORY = "<prompts>"  # the name errors give a list of prompts passed in Python

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
    "negative_prompt",  # an input of jobs sampled with CFG (guidance_scale > 1); else counted: NEGATIVE_PROMPT_NOTE
    # Acceptance rules of a yield-targeted line (farm/submit/rules.py).
    "accept",
    "max_tries",
    "min_clip_score",
    "min_aesthetic",
    "safety",
    "dedup",
)
ALIASES = {"steps": "num_inference_steps"}
NEGATIVE_PROMPT_NOTE = (
    "negative_prompt is ignored where guidance_scale is 1 or less: without classifier-free guidance there is no "
    "unconditional branch for it to replace (the LCM model has guidance distilled in and runs at 0)"
)


class RowNumber(int):
    """A 1-based row of a table (parquet, a Python list); prints as `row N`, so errors read `file.parquet:row 3`."""

    def __str__(self) -> str:
        return f"row {int(self)}"

    def __format__(self, spec: str) -> str:
        return str(self) if not spec else format(int(self), spec)


@dataclass(frozen=True)
class Row:
    """One input row: where it came from and its raw fields (validated later, in one place)."""

    path: str
    line: int
    fields: dict[str, Any]


def read_rows(path: Path, *, max_line_bytes: int = MAX_LINE_BYTES) -> list[Row]:
    """Read every row of a prompt file; a malformed row raises InvalidSubmission naming file and line (or row).

    The file is read line by line: a line over ``max_line_bytes`` is refused without reading the rest, and a FIFO,
    a device or a folder is refused before anything is read.
    """
    name = str(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise InvalidSubmission(
            f"unsupported file type {suffix or '(none)'}; use one of {', '.join(FORMATS)}", path=name
        )
    if suffix == ".parquet":
        return _nonempty(name, [Row(name, line, _canonical(name, line, fields)) for line, fields in _parquet(path)])
    reader = {".txt": _txt, ".jsonl": _jsonl, ".csv": _csv}[suffix]
    with _open_regular(path) as handle:
        lines = _text_lines(name, handle, max_line_bytes)
        return _nonempty(
            name, [Row(name, line, _canonical(name, line, fields)) for line, fields in reader(name, lines)]
        )


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[Any]:
    """The prompt file opened for reading, refused unless it is a regular file (no FIFO that hangs, no device)."""
    name = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise InvalidSubmission("file not found", path=name) from None
    except OSError as exc:
        raise InvalidSubmission(f"cannot read: {exc.strerror}", path=name) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise InvalidSubmission("not a regular file", path=name)
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def _text_lines(name: str, handle: Any, max_line_bytes: int) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line, decoded as UTF-8 (a BOM at the start dropped), line endings removed."""
    number = 0
    while True:
        try:
            raw: bytes = handle.readline(max_line_bytes + 1)
        except OSError as exc:
            raise InvalidSubmission(f"cannot read: {exc.strerror}", path=name, line=number + 1) from None
        if not raw:
            return
        number += 1
        if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
            raise InvalidSubmission(
                f"line is longer than {max_line_bytes} bytes (the limit on one prompt line)", path=name, line=number
            )
        try:
            text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidSubmission(
                f"not UTF-8 text ({exc.reason} at byte {exc.start + 1})", path=name, line=number
            ) from None
        yield number, text.rstrip("\r\n")


def rows_from_records(records: Iterable[str | Mapping[str, Any]], name: str = IN_MEMORY) -> list[Row]:
    """Rows from prompts given in Python: strings, or dicts with the fields a .jsonl line may have.

    Errors name `<prompts>:row N`, N counting from 1 (records[N - 1]).
    """
    if isinstance(records, str | bytes | Mapping):
        raise InvalidSubmission(
            f"prompts must be a list of strings or dicts, or a path, got {type(records).__name__}", path=name
        )
    rows = []
    for index, record in enumerate(records):
        line = RowNumber(index + 1)
        if isinstance(record, str):
            fields: dict[str, Any] = {"prompt": record}
        elif isinstance(record, Mapping):
            fields = {str(k): v for k, v in record.items() if v is not None}
        else:
            raise InvalidSubmission(
                f"each prompt must be a string or a dict, got {type(record).__name__}", path=name, line=line
            )
        rows.append(Row(name, line, _canonical(name, line, fields)))
    return _nonempty(name, rows)


def _nonempty(name: str, rows: list[Row]) -> list[Row]:
    if not rows:
        raise InvalidSubmission("no prompts in file" if name != IN_MEMORY else "no prompts given", path=name)
    return rows


def _parquet(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Rows of a parquet file, batch by batch; a null cell is an absent field, as an empty CSV cell is."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = str(path)
    if not path.is_file():
        raise InvalidSubmission("file not found" if not path.exists() else "not a file", path=name)
    try:
        table = pq.ParquetFile(path)
        columns = table.schema_arrow.names
        if "prompt" not in columns:
            raise InvalidSubmission(f"the file must have a 'prompt' column, got {columns}", path=name)
        index = 0
        for batch in table.iter_batches(batch_size=10_000):
            for record in batch.to_pylist():
                index += 1
                fields = {k: v for k, v in record.items() if v is not None}
                if fields:
                    yield RowNumber(index), fields
    except (pa.ArrowException, OSError) as exc:
        raise InvalidSubmission(f"not a readable parquet file ({type(exc).__name__}: {exc})", path=name) from None


def _txt(name: str, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in lines:
        if raw.strip():
            yield line, {"prompt": raw.strip()}


def _jsonl(name: str, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, dict[str, Any]]]:
    for line, raw in lines:
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


def _csv(name: str, lines: Iterator[tuple[int, str]]) -> Iterator[tuple[int, dict[str, Any]]]:
    # The csv module counts physical lines itself (a quoted field may span several); give it them back with "\n".
    reader = csv.DictReader((text + "\n" for _line, text in lines))
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
        if isinstance(value, str) and "\x00" in value:
            # No prompt or path holds a NUL (PostgreSQL text cannot store one): a binary file, not a prompt.
            raise InvalidSubmission("contains a NUL character", path=name, line=line, field=canonical, value=value)
        out[canonical] = value
    return out

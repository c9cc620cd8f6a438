"""farm.submit.inputs: .txt, .jsonl, .csv and .parquet prompt files and Python lists; errors name the place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from farm.errors import InvalidSubmission
from farm.submit.inputs import IN_MEMORY, read_rows, rows_from_records


def _write(tmp_path: Path, name: str, text: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


def test_txt_skips_blank_lines_and_keeps_line_numbers(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.txt", "a red fox\n\n   \n  a blue whale  \n\na cat\n")
    rows = read_rows(path)
    assert [(r.line, r.fields) for r in rows] == [
        (1, {"prompt": "a red fox"}),
        (4, {"prompt": "a blue whale"}),
        (6, {"prompt": "a cat"}),
    ]
    assert all(r.path == str(path) for r in rows)


def test_txt_with_crlf_line_endings(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.txt", "one\r\n\r\ntwo\r\n")
    assert [(r.line, r.fields["prompt"]) for r in read_rows(path)] == [(1, "one"), (3, "two")]


def test_jsonl_rows_and_line_numbers(tmp_path: Path) -> None:
    lines = [
        json.dumps({"prompt": "a", "seed": 5}),
        "",
        json.dumps({"prompt": "b", "width": 256, "height": 512, "guidance_scale": 1.5}),
    ]
    rows = read_rows(_write(tmp_path, "p.jsonl", "\n".join(lines) + "\n"))
    assert [r.line for r in rows] == [1, 3]
    assert rows[0].fields == {"prompt": "a", "seed": 5}
    assert rows[1].fields == {"prompt": "b", "width": 256, "height": 512, "guidance_scale": 1.5}


def test_jsonl_prompt_with_unicode_line_separator_stays_one_row(tmp_path: Path) -> None:
    # json.dumps(ensure_ascii=False) writes U+2028 raw; it is valid JSON and must not split the line.
    text = json.dumps({"prompt": "first\u2028second"}, ensure_ascii=False) + "\n" + json.dumps({"prompt": "x"}) + "\n"
    rows = read_rows(_write(tmp_path, "p.jsonl", text))
    assert [(r.line, r.fields["prompt"]) for r in rows] == [(1, "first\u2028second"), (2, "x")]


def test_steps_alias_becomes_num_inference_steps(tmp_path: Path) -> None:
    rows = read_rows(_write(tmp_path, "p.jsonl", json.dumps({"prompt": "a", "steps": 2}) + "\n"))
    assert rows[0].fields == {"prompt": "a", "num_inference_steps": 2}
    csv_rows = read_rows(_write(tmp_path, "p.csv", "prompt,steps\na,3\n"))
    assert csv_rows[0].fields == {"prompt": "a", "num_inference_steps": "3"}


def test_steps_and_num_inference_steps_together_is_an_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.jsonl", json.dumps({"prompt": "a", "steps": 2, "num_inference_steps": 3}) + "\n")
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    assert info.value.line == 1


def test_csv_quoted_commas_and_multiline_fields(tmp_path: Path) -> None:
    text = (
        "prompt,seed\n"  # line 1
        '"a fox, red",1\n'  # line 2
        '"a poem\n'  # line 3: a quoted field spanning lines 3-4
        'in two lines",2\n'  # line 4
        "\n"  # line 5: blank, skipped
        "plain,3\n"  # line 6
    )
    rows = read_rows(_write(tmp_path, "p.csv", text))
    assert [r.fields for r in rows] == [
        {"prompt": "a fox, red", "seed": "1"},
        {"prompt": "a poem\nin two lines", "seed": "2"},
        {"prompt": "plain", "seed": "3"},
    ]
    # csv reports the line a record ends on.
    assert [r.line for r in rows] == [2, 4, 6]


def test_csv_empty_cells_are_left_out(tmp_path: Path) -> None:
    rows = read_rows(_write(tmp_path, "p.csv", "prompt,seed,width\na,,256\n"))
    assert rows[0].fields == {"prompt": "a", "width": "256"}


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    # Spreadsheet programs write "UTF-8 CSV" with a BOM in front of the header.
    rows = read_rows(_write(tmp_path, "p.csv", "prompt,seed\nhello,1\n", encoding="utf-8-sig"))
    assert rows[0].fields == {"prompt": "hello", "seed": "1"}


def test_csv_more_values_than_header(tmp_path: Path) -> None:
    with pytest.raises(InvalidSubmission) as info:
        read_rows(_write(tmp_path, "p.csv", "prompt,seed\na,1\nb,2,extra\n"))
    assert info.value.line == 3
    assert "more values" in str(info.value)


def test_csv_without_prompt_column(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.csv", "text,seed\na,1\n")
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    message = str(info.value)
    assert f"{path}:1" in message
    assert "'prompt' column" in message
    assert "'text'" in message


def test_unknown_field_names_file_line_field_and_value(tmp_path: Path) -> None:
    text = json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "a", "negative": "blurry"}) + "\n"
    path = _write(tmp_path, "p.jsonl", text)
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    err = info.value
    assert (err.path, err.line, err.field, err.value) == (str(path), 2, "negative", "blurry")
    message = str(err)
    assert f"{path}:2" in message
    assert "negative" in message
    assert "unknown field" in message


def test_unknown_csv_column_names_line_and_value(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.csv", "prompt,style\na,\nb,noir\n")
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    # line 2's empty cell is dropped, so the first row carrying the unknown column is line 3.
    assert (info.value.line, info.value.field, info.value.value) == (3, "style", "noir")


def test_malformed_jsonl_names_line(tmp_path: Path) -> None:
    text = json.dumps({"prompt": "ok"}) + "\n\n" + '{"prompt": "broken",\n'
    path = _write(tmp_path, "p.jsonl", text)
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    assert info.value.line == 3
    assert f"{path}:3" in str(info.value)
    assert "malformed JSON" in str(info.value)


@pytest.mark.parametrize(("line", "kind"), [('"just a string"', "str"), ("[1, 2]", "list"), ("42", "int")])
def test_non_object_json_line(tmp_path: Path, line: str, kind: str) -> None:
    path = _write(tmp_path, "p.jsonl", line + "\n")
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    assert info.value.line == 1
    assert f"JSON object, got {kind}" in str(info.value)


@pytest.mark.parametrize(
    ("name", "text"), [("e.txt", ""), ("e.txt", "\n  \n\n"), ("e.jsonl", "\n"), ("e.csv", "prompt\n")]
)
def test_empty_file(tmp_path: Path, name: str, text: str) -> None:
    path = _write(tmp_path, name, text)
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    assert "no prompts" in str(info.value)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.txt"
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


@pytest.mark.parametrize("name", ["p.json", "p.tsv", "prompts"])
def test_unsupported_suffix(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name, "a\n")
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    assert "unsupported file type" in str(info.value)
    assert ".jsonl" in str(info.value)


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    assert read_rows(_write(tmp_path, "P.TXT", "a\n"))[0].fields == {"prompt": "a"}


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "p.txt"
    path.write_bytes(b"caf\xe9\n")
    with pytest.raises(InvalidSubmission, match="not UTF-8"):
        read_rows(path)


def test_control_fields_are_row_fields(tmp_path: Path) -> None:
    text = json.dumps({"prompt": "a", "control_image": "edges/a.png", "conditioning_scale": 0.5}) + "\n"
    (row,) = read_rows(_write(tmp_path, "p.jsonl", text))
    # Kept raw: the path is resolved and the image decoded by farm.submit, which knows the file's folder.
    assert row.fields == {"prompt": "a", "control_image": "edges/a.png", "conditioning_scale": 0.5}


# ---- parquet ------------------------------------------------------------------------------------------


def _parquet(tmp_path: Path, columns: dict[str, list[Any]], name: str = "p.parquet") -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / name
    pq.write_table(pa.table(columns), path)
    return path


def test_parquet_rows_numbered_from_one_with_nulls_absent(tmp_path: Path) -> None:
    path = _parquet(
        tmp_path,
        {
            "prompt": ["a fox", "a whale", "a cat"],
            "seed": [5, None, 7],
            "width": [256, 512, None],
            "steps": [2, None, None],
        },
    )
    rows = read_rows(path)
    assert [r.line for r in rows] == [1, 2, 3]
    assert [r.fields for r in rows] == [
        {"prompt": "a fox", "seed": 5, "width": 256, "num_inference_steps": 2},
        {"prompt": "a whale", "width": 512},
        {"prompt": "a cat", "seed": 7},
    ]
    assert all(r.path == str(path) for r in rows)


def test_parquet_error_names_the_row(tmp_path: Path) -> None:
    path = _parquet(tmp_path, {"prompt": ["a", "b", "c"], "style": [None, None, "noir"]})
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    assert (info.value.line, info.value.field, info.value.value) == (3, "style", "noir")
    assert f"{path}:row 3" in str(info.value)


def test_parquet_bad_value_names_the_row_through_submit(tmp_path: Path) -> None:
    from farm.submit.plan import SubmitOptions, plan_submission

    path = _parquet(tmp_path, {"prompt": ["a", "b", "c", "d"], "width": [256, None, 256, 1001]})
    with pytest.raises(InvalidSubmission) as info:
        plan_submission(path, SubmitOptions(dataset="d"))
    assert (info.value.line, info.value.field, info.value.value) == (4, "width", 1001)
    assert f"{path}:row 4: field 'width'" in str(info.value)
    assert "multiple of 16" in str(info.value)


def test_parquet_null_prompt_is_a_missing_prompt(tmp_path: Path) -> None:
    from farm.submit.plan import SubmitOptions, plan_submission

    path = _parquet(tmp_path, {"prompt": ["a", None], "seed": [1, 2]})
    with pytest.raises(InvalidSubmission) as info:
        plan_submission(path, SubmitOptions(dataset="d"))
    assert info.value.line == 2
    assert f"{path}:row 2" in str(info.value)
    assert "missing or empty prompt" in str(info.value)


def test_parquet_without_prompt_column(tmp_path: Path) -> None:
    path = _parquet(tmp_path, {"text": ["a"]})
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    assert "'prompt' column" in str(info.value)
    assert "'text'" in str(info.value)


def test_parquet_that_is_not_parquet(tmp_path: Path) -> None:
    path = _write(tmp_path, "p.parquet", "prompt\na\n")
    with pytest.raises(InvalidSubmission) as info:
        read_rows(path)
    assert str(path) in str(info.value)
    assert "not a readable parquet file" in str(info.value)


def test_empty_parquet(tmp_path: Path) -> None:
    import pyarrow as pa

    path = _parquet(tmp_path, {"prompt": pa.array([], type=pa.string())})
    with pytest.raises(InvalidSubmission, match="no prompts"):
        read_rows(path)


def test_missing_parquet(tmp_path: Path) -> None:
    with pytest.raises(InvalidSubmission, match="not found"):
        read_rows(tmp_path / "nope.parquet")


# ---- negative_prompt and prompts from Python ----------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("p.jsonl", json.dumps({"prompt": "a", "negative_prompt": "blurry"}) + "\n"),
        ("p.csv", "prompt,negative_prompt\na,blurry\n"),
    ],
)
def test_negative_prompt_is_an_accepted_field(tmp_path: Path, name: str, text: str) -> None:
    (row,) = read_rows(_write(tmp_path, name, text))
    assert row.fields == {"prompt": "a", "negative_prompt": "blurry"}


def test_rows_from_records_mixes_strings_and_dicts() -> None:
    rows = rows_from_records(["a fox", {"prompt": "a cat", "steps": 2, "seed": None}])
    assert [(r.path, r.line, r.fields) for r in rows] == [
        (IN_MEMORY, 1, {"prompt": "a fox"}),
        (IN_MEMORY, 2, {"prompt": "a cat", "num_inference_steps": 2}),
    ]


def test_rows_from_records_errors_name_the_row() -> None:
    with pytest.raises(InvalidSubmission) as info:
        rows_from_records(["a", "b", {"prompt": "c", "colour": "red"}])
    assert info.value.line == 3
    assert f"{IN_MEMORY}:row 3: field 'colour'" in str(info.value)
    with pytest.raises(InvalidSubmission, match="string or a dict, got int"):
        rows_from_records(["a", 7])  # type: ignore[list-item]
    with pytest.raises(InvalidSubmission, match="no prompts"):
        rows_from_records([])
    with pytest.raises(InvalidSubmission, match="list of strings or dicts"):
        rows_from_records("a single prompt")

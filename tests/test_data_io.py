"""Local data reading: good files load, every kind of bad input names its file, line and field."""

from __future__ import annotations

import json
import warnings

import pytest

from metatuner.tasks.data_io import DataError, DataWarning, RowError, read_csv, read_jsonl, read_table


def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def jsonl(rows):
    return "".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows)


def test_read_jsonl_reads_objects_skips_blank_lines_and_bom(tmp_path):
    path = write(tmp_path, "a.jsonl", "\ufeff" + jsonl([{"q": "x", "a": 18}, "", {"q": "y", "a": "2", "extra": [1]}]))
    rows = read_jsonl(path, ("q", "a"))
    assert rows == [{"q": "x", "a": "18"}, {"q": "y", "a": "2", "extra": [1]}]  # numbers become strings


def test_read_csv_reads_quoted_multiline_records(tmp_path):
    path = write(tmp_path, "a.csv", 'id,text\n1,"two\nlines"\n\n2,plain\n')
    assert read_csv(path, ("text",), id_field="id") == [{"id": "1", "text": "two\nlines"}, {"id": "2", "text": "plain"}]


def test_read_table_picks_the_reader_by_suffix(tmp_path):
    assert read_table(write(tmp_path, "a.tsv", "q\ta\nx\ty\n"), ("q", "a")) == [{"q": "x", "a": "y"}]
    with pytest.raises(ValueError, match="unknown data format"):
        read_table(write(tmp_path, "a.parquet", "x"), ("q",))


@pytest.mark.bad_input
def test_bad_input_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl", ("q",))
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        read_csv(tmp_path / "nope.csv", ("q",))


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "bad_line, field, reason",
    [
        ('{"q": "x", "a": ', None, "malformed JSON"),
        ('["q", "a"]', None, "expected a JSON object, got list"),
        ('"just text"', None, "expected a JSON object, got str"),
        ('{"q": "x"}', "a", "missing field"),
        ('{"q": "x", "a": ""}', "a", "empty value"),
        ('{"q": "x", "a": "   "}', "a", "empty value"),
        ('{"q": "x", "a": null}', "a", "expected a string, got NoneType"),
        ('{"q": "x", "a": true}', "a", "expected a string, got bool"),
        ('{"q": ["x"], "a": "1"}', "q", "expected a string, got list"),
    ],
)
def test_bad_input_jsonl_row_names_file_line_and_field(tmp_path, bad_line, field, reason):
    path = write(tmp_path, "data.jsonl", jsonl([{"q": "fine", "a": "1"}, bad_line]))
    with pytest.raises(DataError) as info:
        read_jsonl(path, ("q", "a"))
    message = str(info.value)
    assert str(path) in message and "line 2" in message and reason in message
    assert info.value.line == 2 and info.value.field == field
    if field:
        assert f"field '{field}'" in message


@pytest.mark.bad_input
def test_bad_input_non_utf8_bytes_are_traced_to_line_and_field(tmp_path):
    path = write(tmp_path, "data.jsonl", b'{"q": "ok", "a": "1"}\n{"q": "caf\xe9", "a": "2"}\n')
    with pytest.raises(DataError, match=r"line 2, field 'q': not valid UTF-8"):
        read_jsonl(path, ("q", "a"))
    path = write(tmp_path, "data.csv", b'q,a\nok,1\nok,2\n"caf\xe9",3\n')
    with pytest.raises(DataError, match=r"data.csv, line 4, field 'q': not valid UTF-8"):
        read_csv(path, ("q", "a"))


@pytest.mark.bad_input
def test_bad_input_duplicate_ids_name_both_lines(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl([{"id": "a", "q": "1"}, {"id": "b", "q": "2"}, {"id": "a", "q": "3"}]))
    with pytest.raises(DataError, match=r"line 3, field 'id': duplicate id 'a' \(first seen at line 1\)"):
        read_jsonl(path, ("q",), id_field="id")


@pytest.mark.bad_input
def test_bad_input_csv_missing_column_fails_even_when_skipping(tmp_path):
    path = write(tmp_path, "data.csv", "q,b\nx,y\n")
    with pytest.raises(DataError, match=r"data.csv, line 1, field 'a': missing column"):
        read_csv(path, ("q", "a"), on_bad_row="skip")


@pytest.mark.bad_input
@pytest.mark.parametrize(
    "content, line, field, reason",
    [
        ("q,a\nx,1\ny,\n", 3, "a", "empty value"),
        ("q,a\nx,1\ny\n", 3, None, "the row has 1 values, the header 2"),
        ("q,a\nx,1\ny,2,3\n", 3, None, "the row has 3 values, the header 2"),
        ('q,a\n"x\n\nx",1\nz,  \n', 5, "a", "empty value"),  # a record spanning lines 2-4
    ],
)
def test_bad_input_csv_row_names_file_line_and_field(tmp_path, content, line, field, reason):
    path = write(tmp_path, "data.csv", content)
    with pytest.raises(DataError) as info:
        read_csv(path, ("q", "a"))
    assert (info.value.line, info.value.field) == (line, field)
    assert str(path) in str(info.value) and f"line {line}" in str(info.value) and reason in str(info.value)


@pytest.mark.bad_input
def test_bad_input_empty_files_are_errors(tmp_path):
    with pytest.raises(DataError, match="no usable rows"):
        read_jsonl(write(tmp_path, "e.jsonl", "\n\n"), ("q",))
    with pytest.raises(DataError, match="empty"):
        read_csv(write(tmp_path, "e.csv", ""), ("q",))


@pytest.mark.bad_input
def test_bad_input_skip_mode_warns_once_with_count_and_lines(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl([{"q": "1"}, "{oops", {"q": ""}, {"q": "4"}, {"r": "5"}]))
    with pytest.warns(DataWarning) as record:
        rows = read_jsonl(path, ("q",), on_bad_row="skip")
    assert rows == [{"q": "1"}, {"q": "4"}]
    assert len(record) == 1
    message = str(record[0].message)
    assert "Skipped 3 bad row(s)" in message and "lines 2, 3, 5" in message and str(path) in message


@pytest.mark.bad_input
def test_bad_input_skip_mode_with_no_good_rows_is_an_error(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl(["{bad", "[]"]))
    with warnings.catch_warnings(record=True), pytest.raises(DataError, match=r"no usable rows \(2 bad ones skipped\)"):
        read_jsonl(path, ("q",), on_bad_row="skip")


@pytest.mark.bad_input
def test_bad_input_validator_errors_carry_line_and_field(tmp_path):
    def positive(row):
        if int(row["n"]) <= 0:
            raise RowError("n", "must be positive")
        row["n"] = int(row["n"])

    path = write(tmp_path, "data.csv", "n\n3\n-1\n")
    with pytest.raises(DataError, match=r"line 3, field 'n': must be positive"):
        read_csv(path, ("n",), validate=positive)
    with pytest.warns(DataWarning, match="lines 3"):
        assert read_csv(path, ("n",), validate=positive, on_bad_row="skip") == [{"n": 3}]


@pytest.mark.bad_input
def test_bad_input_unknown_on_bad_row_value(tmp_path):
    with pytest.raises(ValueError, match="on_bad_row"):
        read_jsonl(write(tmp_path, "a.jsonl", jsonl([{"q": "x"}])), ("q",), on_bad_row="ignore")


@pytest.mark.bad_input
def test_bad_input_rows_remember_file_and_line_for_later_checks(tmp_path):
    path = write(tmp_path, "data.jsonl", jsonl([{"q": "x"}, "", {"q": "y"}]))
    rows = read_jsonl(path, ("q",))
    assert rows == [{"q": "x"}, {"q": "y"}]  # still plain dicts to every reader
    assert [row.origin for row in rows] == [(str(path), 1, "line"), (str(path), 3, "line")]

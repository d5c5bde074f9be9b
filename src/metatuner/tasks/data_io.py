"""Reading task data from local JSONL and CSV files, with errors that say exactly what is wrong and where.

    rows = read_jsonl("train.jsonl", required_fields=("question", "answer"))
    rows = read_csv("valid.csv", required_fields=("id", "context", "label"), id_field="id", on_bad_row="skip")

Every row is checked: the file must be UTF-8, every JSONL line a JSON object, every required field present, a
non-empty string (JSON numbers are accepted and turned into strings, because JSON writers often emit numeric
answers as numbers), and ids, when an `id_field` is named, unique. A task adds its own checks with `validate`, a
callable that raises `RowError(field, reason)` and may normalise the row in place.

A bad row raises `DataError` (a ValueError) naming the file, the 1-based line and the field. With
`on_bad_row="skip"` bad rows are dropped instead and one `DataWarning` says how many and which lines; a file
problem that no row can escape (a missing CSV column, no rows at all) still raises.

`check_rows` runs the same checks over rows that came from elsewhere (the Hugging Face hub), numbering them as
rows rather than lines. Every row it returns is a `Row`, a dict that remembers its source and line, so a problem
found later (an example longer than the context, see `check_lengths`) is reported at the same place.
"""

from __future__ import annotations

import csv
import io
import json
import re
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

OnBadRow = Literal["error", "skip"]
Validator = Callable[[dict[str, Any]], None]

# Undecodable bytes survive decoding as lone surrogates (errors="surrogateescape"), so they can be traced to the
# field that holds them instead of failing the whole file at once.
_SURROGATE_RE = re.compile("[\udc80-\udcff]")
# How many skipped line numbers the warning lists before it abbreviates.
_MAX_LISTED_LINES = 20


class DataError(ValueError):
    """A data file (or hub split) that cannot be used as it is; the message names source, line and field."""

    def __init__(
        self, source: str, line: int | None, field: str | None, reason: str, unit: str = "line"
    ) -> None:
        self.source, self.line, self.field, self.reason, self.unit = source, line, field, reason, unit
        where = str(source)
        if line is not None:
            where += f", {unit} {line}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {reason}")


class RowError(ValueError):
    """Raised by a row validator; `check_rows` turns it into a DataError that carries the file and line."""

    def __init__(self, field: str | None, reason: str) -> None:
        self.field, self.reason = field, reason
        super().__init__(f"field '{field}': {reason}" if field else reason)


class DataWarning(UserWarning):
    """Bad rows were skipped (on_bad_row="skip")."""


class Row(dict):
    """A data row (a plain dict to every reader) that also knows where it came from."""

    def __init__(self, values: dict[str, Any], source: str, line: int, unit: str = "line") -> None:
        super().__init__(values)
        self.origin = (source, line, unit)


def read_jsonl(
    path: str | Path,
    required_fields: Sequence[str],
    on_bad_row: OnBadRow = "error",
    id_field: str | None = None,
    validate: Validator | None = None,
) -> list[dict[str, Any]]:
    """Rows of a JSON-lines file (one JSON object per line; blank lines are ignored)."""
    path = _existing(path)
    text = _decode(path.read_bytes())
    numbered: list[tuple[int, dict[str, Any] | RowError]] = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        numbered.append((line_no, _parse_json_line(line)))
    return check_rows(numbered, str(path), required_fields, on_bad_row, id_field, validate)


def read_csv(
    path: str | Path,
    required_fields: Sequence[str],
    on_bad_row: OnBadRow = "error",
    id_field: str | None = None,
    validate: Validator | None = None,
    delimiter: str = ",",
) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header line; a row's line is the line where its record starts."""
    path = _existing(path)
    reader = csv.reader(io.StringIO(_decode(path.read_bytes()), newline=""), delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(str(path), None, None, "the file is empty (no header line)") from None
    except csv.Error as e:
        raise DataError(str(path), 1, None, f"malformed CSV header ({e})") from None
    header = [name.strip() for name in header]
    # A missing column makes every row bad, so it is an error even in skip mode.
    for name in [*required_fields, *([id_field] if id_field else [])]:
        if name not in header:
            raise DataError(str(path), 1, name, f"missing column (the header has: {', '.join(header)})")
    numbered: list[tuple[int, dict[str, Any] | RowError]] = []
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            numbered.append((start, RowError(None, f"malformed CSV ({e})")))
            break  # the reader cannot resynchronise after a quoting error
        if not values:
            continue  # a blank line
        if len(values) != len(header):
            numbered.append((start, RowError(None, f"the row has {len(values)} values, the header {len(header)}")))
            continue
        numbered.append((start, dict(zip(header, values))))
    return check_rows(numbered, str(path), required_fields, on_bad_row, id_field, validate)


def check_rows(
    numbered_rows: Iterable[tuple[int, dict[str, Any] | RowError]],
    source: str,
    required_fields: Sequence[str],
    on_bad_row: OnBadRow = "error",
    id_field: str | None = None,
    validate: Validator | None = None,
    unit: str = "line",
) -> list[dict[str, Any]]:
    """Check (line, row) pairs; a RowError in place of a row marks a line that could not be parsed."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', not {on_bad_row!r}")
    rows: list[dict[str, Any]] = []
    seen_ids: dict[str, int] = {}
    skipped: list[DataError] = []
    for line, row in numbered_rows:
        try:
            if isinstance(row, RowError):
                raise row
            _check_row(row, required_fields, validate, id_field)
            if id_field is not None:
                id_ = row[id_field]
                if id_ in seen_ids:
                    raise RowError(id_field, f"duplicate id {id_!r} (first seen at {unit} {seen_ids[id_]})")
                seen_ids[id_] = line
        except RowError as e:
            error = DataError(source, line, e.field, e.reason, unit)
            if on_bad_row == "error":
                raise error from None
            skipped.append(error)
            continue
        rows.append(Row(row, source, line, unit))
    if skipped:
        _warn_skipped(skipped, source, unit)
    if not rows:
        reason = "no usable rows" + (f" ({len(skipped)} bad ones skipped)" if skipped else " (the source is empty)")
        raise DataError(source, None, None, reason)
    return rows


def _warn_skipped(skipped: list[DataError], source: str, unit: str) -> None:
    lines = ", ".join(str(e.line) for e in skipped[:_MAX_LISTED_LINES])
    more = f" and {len(skipped) - _MAX_LISTED_LINES} more" if len(skipped) > _MAX_LISTED_LINES else ""
    warnings.warn(
        f"Skipped {len(skipped)} bad row(s) of {source} ({unit}s {lines}{more}); first problem: {skipped[0]}",
        DataWarning,
        stacklevel=4,
    )


def token_counter(tokenizer) -> Callable[[str], int]:
    """A `count_tokens` for `check_lengths`: the tokenizer's length of a text, without special tokens."""
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def check_lengths(
    examples: Sequence[Any],
    count_tokens: Callable[[str], int],
    max_tokens: int,
    on_bad_row: OnBadRow = "error",
    fields: Sequence[str] = ("question", "target"),
) -> list[Any]:
    """Examples whose `fields` together fit in `max_tokens` tokens (as `count_tokens` counts them). A longer one
    raises DataError at its file and line (naming its longest field), or with on_bad_row="skip" is dropped and
    reported like any other bad row; truncating it silently would train on, or answer, a different question."""
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', not {on_bad_row!r}")
    kept, skipped = [], []
    for index, example in enumerate(examples, start=1):
        lengths = {name: count_tokens(getattr(example, name) or "") for name in fields}
        if sum(lengths.values()) <= max_tokens:
            kept.append(example)
            continue
        source, line, unit = getattr(example, "origin", None) or (f"example {example.id!r}", None, "line")
        longest = max(lengths, key=lengths.get)
        error = DataError(source, line, longest, f"the example is {sum(lengths.values())} tokens "
                          f"({', '.join(f'{k} {v}' for k, v in lengths.items())}), longer than the context "
                          f"of {max_tokens}", unit)
        if on_bad_row == "error":
            raise error
        skipped.append(error)
    if skipped:
        sources = sorted({e.source for e in skipped})
        _warn_skipped(skipped, ", ".join(sources), skipped[0].unit)
    if not kept:
        raise DataError(skipped[0].source, None, None, f"no example fits in {max_tokens} tokens")
    return kept


def _check_row(
    row: dict[str, Any], required_fields: Sequence[str], validate: Validator | None, id_field: str | None
) -> None:
    for name, value in row.items():
        if _holds_surrogate(value):
            raise RowError(name, "not valid UTF-8 (undecodable bytes)")
    for name in required_fields:
        row[name] = _text_field(row, name)
    if validate is not None:
        validate(row)
    if id_field is not None:
        row[id_field] = _text_field(row, id_field)


def _text_field(row: dict[str, Any], name: str) -> str:
    if name not in row:
        raise RowError(name, "missing field")
    value = row[name]
    # bool is an int subclass but never a sensible answer or id.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowError(name, f"expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(name, "empty value")
    return value


def _parse_json_line(line: str) -> dict[str, Any] | RowError:
    try:
        value = json.loads(line)
    except json.JSONDecodeError as e:
        if _SURROGATE_RE.search(line):
            return RowError(None, "not valid UTF-8 (undecodable bytes)")
        return RowError(None, f"malformed JSON ({e.msg} at column {e.colno})")
    if not isinstance(value, dict):
        return RowError(None, f"expected a JSON object, got {type(value).__name__}")
    return value


def _holds_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        return _SURROGATE_RE.search(value) is not None
    if isinstance(value, dict):
        return any(_holds_surrogate(k) or _holds_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_holds_surrogate(v) for v in value)
    return False


def _decode(data: bytes) -> str:
    text = data.decode("utf-8", errors="surrogateescape")
    return text[1:] if text.startswith("\ufeff") else text  # a byte-order mark is not part of the first row


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    return path


def read_table(
    path: str | Path,
    required_fields: Sequence[str],
    on_bad_row: OnBadRow = "error",
    id_field: str | None = None,
    validate: Validator | None = None,
) -> list[dict[str, Any]]:
    """`read_jsonl` or `read_csv` by the file's suffix (.jsonl/.json/.ndjson, .csv, .tsv)."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path, required_fields, on_bad_row, id_field, validate)
    if suffix in (".csv", ".tsv"):
        return read_csv(path, required_fields, on_bad_row, id_field, validate, "\t" if suffix == ".tsv" else ",")
    raise ValueError(f"{path}: unknown data format {suffix!r}; use .jsonl or .csv")

"""Loading a split from the Hugging Face hub, and the split names tasks accept.

    rows = load_hub_rows("openai/gsm8k", "main", "test")     # list of plain dicts
    rows = hub_split_rows("openai/gsm8k", "main", "test", ("question", "answer"), "error")   # checked, as files are

`datasets` is imported only here and only when a hub split is actually loaded, so local-file use and the tests
never touch the network. Hub rows then go through `data_io.check_rows`, the same checks as local files.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .data_io import OnBadRow, Validator, check_rows

#: The split names every task understands; tasks map them to the hub's own split names.
SPLITS = ("train", "test")


def check_split(split: str, allowed: Sequence[str] = SPLITS) -> str:
    if split not in allowed:
        raise ValueError(f"unknown split {split!r}; expected one of: {', '.join(allowed)}")
    return split


def hub_source(repo: str, config: str | None, split: str) -> str:
    """How hub data is named in error messages."""
    return f"hf://{repo}" + (f"[{config}]" if config else "") + f":{split}"


def load_hub_rows(repo: str, config: str | None, split: str) -> list[dict[str, Any]]:
    """All rows of one split of a hub dataset, as dicts."""
    from datasets import load_dataset  # deferred: heavy import, and only hub loading needs it

    try:
        dataset = load_dataset(repo, config, split=split)
    except Exception as e:  # network, auth, missing config: all end the same way for the user
        raise RuntimeError(
            f"could not load {hub_source(repo, config, split)} from the Hugging Face hub ({type(e).__name__}: {e}). "
            "Pass path=... to load a local JSONL/CSV copy instead."
        ) from e
    return dataset.to_list()


def number_rows(rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """Hub rows numbered from 1, the shape `check_rows` takes."""
    return list(enumerate(rows, start=1))


def hub_split_rows(repo: str, config: str | None, split: str, fields: Sequence[str], on_bad_row: OnBadRow, *,
                   id_field: str | None = None, validate: Validator | None = None) -> list[dict[str, Any]]:
    """A hub split's rows through the checks a local file gets (`data_io.check_rows`); errors name the row."""
    return check_rows(number_rows(load_hub_rows(repo, config, split)), hub_source(repo, config, split), fields,
                      on_bad_row, id_field=id_field, validate=validate, unit="row")

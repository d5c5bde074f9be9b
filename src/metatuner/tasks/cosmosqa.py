"""CosmosQA: 4-way multiple-choice reading comprehension, scored by accuracy.

    task = get_task("cosmosqa")                                   # train_rows=2000
    train = task.load("train", path="data/cosmosqa/valid.csv")   # rows 1..2000 of the file
    test = task.load("test", path="data/cosmosqa/valid.csv")     # the remaining 985 rows
    task.score("The answer is (B).", test[0])                              # {"accuracy": 1.0 or 0.0}

Rows have `id, context, question, answer0..answer3, label` (label 0..3). The Example's `question` holds the
context, the question and the options lettered A-D and asks for the letter; `answer` is the gold letter,
`choices` the four option texts, and `target` "The answer is B." (the full sentence, so SFT teaches the same
answer line that the extractor reads). `choice_targets` gives the four sentences "The answer is A." ... "The
answer is D." whose likelihoods rank the options, so a task can be scored by generation or by likelihood.

Row split: the hub's training split is not available offline, so a local file is split by rows. `train_rows`
(default 2000) rows from the top form "train" and the rest "test"; `train_rows=None` uses the whole file for any
split. From the hub (allenai/cosmos_qa) "train" is the train split and "test" the validation split, since the
hub's test labels are hidden.

The extractor reads, in order: "answer is B" / "Answer: (B)", an output that starts with the letter ("B",
"(B)", "B. ..."), "option B", and the last "(B)"; only capital A-D count, so the article "a" is never a letter.
"""

from __future__ import annotations

import re
from typing import Any

from .base import Example, Task
from .data_io import OnBadRow, RowError, read_table
from .hub import check_split, hub_split_rows

LETTERS = "ABCD"
FIELDS = ("id", "context", "question", "answer0", "answer1", "answer2", "answer3", "label")

# (?i:...) makes only the words case-insensitive: the letter itself must be a capital.
_LETTER_PATTERNS = (
    re.compile(r"(?i:answer)\s*(?:(?i:is)\s*:?|:)\s*(?:(?i:option|choice)\s*)?[(\[]?([A-D])(?![A-Za-z0-9])"),
    re.compile(r"\A\s*[*_]*[(\[]?([A-D])(?:[)\].:]|[*_]*\s*\Z)"),
    re.compile(r"(?i:option|choice)\s+[(\[]?([A-D])(?![A-Za-z0-9])"),
    re.compile(r"\(([A-D])\)"),
)


def extract_letter(output: str) -> str | None:
    for pattern in _LETTER_PATTERNS:
        matches = pattern.findall(output)
        if matches:
            return matches[-1]
    return None


class CosmosQATask(Task):
    name = "cosmosqa"
    default_prompt = (
        "Read the passage and answer the multiple-choice question. "
        "End with 'The answer is X.' where X is the letter A, B, C or D."
    )
    metrics = ("accuracy",)
    max_new_tokens = 64
    stop_strings = ("\n\nContext:",)

    HUB_ID = "allenai/cosmos_qa"
    HUB_SPLITS = {"train": "train", "test": "validation"}

    def __init__(self, train_rows: int | None = 2000, on_bad_row: OnBadRow = "error") -> None:
        self.train_rows, self.on_bad_row = train_rows, on_bad_row

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        check_split(split)
        if path is not None:
            rows = read_table(path, FIELDS, self.on_bad_row, id_field="id", validate=_validate)
            rows = self._row_split(rows, split, path)
        else:
            hub_split = self.HUB_SPLITS[split]
            rows = hub_split_rows(self.HUB_ID, None, hub_split, FIELDS, self.on_bad_row, id_field="id",
                                  validate=_validate)
        return [_example(row) for row in rows[:limit]]

    def _row_split(self, rows: list[dict[str, Any]], split: str, path: str) -> list[dict[str, Any]]:
        if self.train_rows is None:
            return rows
        if split == "train":
            return rows[: self.train_rows]
        if len(rows) <= self.train_rows:
            raise ValueError(
                f"{path} has {len(rows)} rows and train_rows={self.train_rows} leaves none for 'test'; "
                "pass a smaller train_rows, or train_rows=None to use the whole file"
            )
        return rows[self.train_rows :]

    def extract(self, output: str) -> dict[str, str | None]:
        return {"accuracy": extract_letter(output)}

    def score(self, output: str, example: Example) -> dict[str, float]:
        return {"accuracy": float(self.extract(output)["accuracy"] == example.answer)}

    def choice_targets(self, example: Example) -> list[str] | None:
        return [f"The answer is {letter}." for letter in LETTERS]


def format_question(context: str, question: str, options: list[str]) -> str:
    lines = [f"Context: {context.strip()}", f"Question: {question.strip()}", "Options:"]
    lines += [f"{letter}. {option.strip()}" for letter, option in zip(LETTERS, options)]
    lines.append("Answer with the letter of the correct option (A, B, C or D).")
    return "\n".join(lines)


def _example(row: dict[str, Any]) -> Example:
    options = [row[f"answer{i}"] for i in range(4)]
    letter = LETTERS[row["label"]]
    return Example(
        id=row["id"],
        question=format_question(row["context"], row["question"], options),
        answer=letter,
        target=f"The answer is {letter}.",
        choices=[option.strip() for option in options],
        meta={"label": row["label"]},
        origin=getattr(row, "origin", None),
    )


def _validate(row: dict[str, Any]) -> None:
    label = row["label"].strip()
    if label not in ("0", "1", "2", "3"):
        raise RowError("label", f"expected 0, 1, 2 or 3, got {row['label']!r}")
    row["label"] = int(label)

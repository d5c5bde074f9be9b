"""A task from your own JSONL/CSV file, with no code: name the fields and pick a checker.

    task = get_task("custom", path="faq.jsonl", question_field="input", answer_field="output", metric="contains")
    train = task.load("train", path="faq_train.jsonl")     # a `load` path overrides the constructor's
    task.score("It opens at 9am.", train[0])               # {"accuracy": 1.0 or 0.0}

Options: `path` (the file for every split; or `split_paths={"train": ..., "test": ...}`), `question_field`
("question"), `answer_field` ("answer"), `target_field` (a column holding the SFT completion; default
"The answer is {answer}."), `id_field` (ids must then be unique; default f"{split}-{index}"), `prompt` (the
initial instruction), `metric`, `name`, `max_new_tokens` (256), `stop_strings`, `on_bad_row`.

Metrics (the score is always reported as "accuracy"):
- "exact_match": the text after "The answer is"/"Answer:", else the last line, equals the answer, ignoring
  case, repeated whitespace and punctuation at either end;
- "contains": the answer appears in that text (the whole output when there is no answer marker);
- "numeric": the number after the marker, else the last number, equals the answer as a number ("$1,000" is 1000).
"""

from __future__ import annotations

import re
import string
from typing import Literal

from .answers import answer_span, is_number, last_line, last_number, normalize_number
from .base import Example, Task
from .data_io import OnBadRow, RowError, read_table

Metric = Literal["exact_match", "contains", "numeric"]
_EDGE_CHARS = string.punctuation + string.whitespace


def normalize_text(text: str) -> str:
    return " ".join(text.casefold().split()).strip(_EDGE_CHARS)


class CustomTask(Task):
    metrics = ("accuracy",)

    def __init__(
        self,
        path: str | None = None,
        question_field: str = "question",
        answer_field: str = "answer",
        target_field: str | None = None,
        id_field: str | None = None,
        prompt: str = "Answer the question. End with 'The answer is X.' where X is your final answer.",
        metric: Metric = "exact_match",
        name: str = "custom",
        split_paths: dict[str, str] | None = None,
        max_new_tokens: int = 256,
        stop_strings: tuple[str, ...] | list[str] = (),
        on_bad_row: OnBadRow = "error",
    ) -> None:
        if metric not in ("exact_match", "contains", "numeric"):
            raise ValueError(f"metric must be 'exact_match', 'contains' or 'numeric', not {metric!r}")
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.:-]*", name) or ".." in name:
            # The name becomes part of folder names (runs/eval-<name>): it must not climb out of them.
            raise ValueError(f"task name {name!r} must be letters, digits, '_', '-', ':' or '.' (no '..', no '/')")
        self.path, self.split_paths = path, dict(split_paths or {})
        self.question_field, self.answer_field = question_field, answer_field
        self.target_field, self.id_field = target_field, id_field
        self.default_prompt, self.metric, self.name = prompt, metric, name
        self.max_new_tokens, self.stop_strings = max_new_tokens, tuple(stop_strings)
        self.on_bad_row = on_bad_row

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        path = path or self.split_paths.get(split) or self.path
        if path is None:
            raise ValueError(f"task {self.name!r} has no data for split {split!r}: pass path=... (or split_paths)")
        required = [self.question_field, self.answer_field] + ([self.target_field] if self.target_field else [])
        rows = read_table(path, required, self.on_bad_row, id_field=self.id_field, validate=self._validate)
        examples = []
        for index, row in enumerate(rows[:limit]):
            answer = row[self.answer_field].strip()
            examples.append(
                Example(
                    id=row[self.id_field] if self.id_field else f"{split}-{index}",
                    question=row[self.question_field].strip(),
                    answer=answer,
                    target=row[self.target_field] if self.target_field else f"The answer is {answer}.",
                    origin=getattr(row, "origin", None),
                )
            )
        return examples

    def _validate(self, row: dict) -> None:
        if self.metric == "numeric" and not is_number(row[self.answer_field]):
            raise RowError(self.answer_field, f"metric 'numeric' needs a number, got {row[self.answer_field]!r}")

    def extract(self, output: str) -> dict[str, str | None]:
        span = answer_span(output)
        if self.metric == "numeric":
            found = (last_number(span) if span is not None else None) or last_number(output)
        elif self.metric == "contains":
            found = span if span is not None else (output.strip() or None)
        else:
            found = span if span is not None else last_line(output)
        return {"accuracy": found}

    def score(self, output: str, example: Example) -> dict[str, float]:
        found = self.extract(output)["accuracy"]
        if found is None:
            return {"accuracy": 0.0}
        if self.metric == "numeric":
            correct = normalize_number(found) == normalize_number(example.answer)
        elif self.metric == "contains":
            gold = normalize_text(example.answer)
            correct = bool(gold) and gold in normalize_text(found)
        else:
            correct = normalize_text(found) == normalize_text(example.answer)
        return {"accuracy": float(correct)}

"""GSM8K: grade-school math word problems, scored with lm-eval's strict and flexible accuracy.

    task = get_task("gsm8k")
    test = task.load("test")                                      # openai/gsm8k (config "main") from the hub
    test = task.load("test", path="data/gsm8k/test.jsonl")
    task.score("... The answer is 18.", test[0])                 # {"strict": 1.0, "flexible": 1.0}

Data rows have `question` and `answer`, the answer being a rationale with `<<calc>>` annotations whose last line
is `#### N`. An Example's `target` is that rationale without the annotations and with the last line rewritten as
"The answer is N."; its `answer` is N normalised. Ids are f"{split}-{index}" (GSM8K has no ids of its own).

Metrics, as lm-eval's `gsm8k` / `gsm8k-cot` tasks define them:
- strict: the first `#### N` or `The answer is N` in the output. lm-eval's cot pattern ends with "." (any
  character); here that character is optional, so an output that ends right after the number still counts.
- flexible: the last number in the output (lm-eval's `(-?[$0-9.,]{2,})|(-?[0-9]+)`, last match that has a digit).
Both are compared with the gold answer after removing commas, `$` and a trailing period, as numbers ("18.00" is 18).
"""

from __future__ import annotations

import re

from .answers import is_number, last_number, normalize_number
from .base import Example, Task
from .data_io import OnBadRow, RowError, read_table
from .hub import check_split, hub_split_rows

# lm-eval's strict-match patterns (the cot one without its final wildcard, see the module docstring).
STRICT_RE = re.compile(r"#### (\-?[0-9\.\,]+)|The answer is (\-?[0-9\.\,]+)")
_CALC_RE = re.compile(r"<<[^<>]*>>")


def rationale_to_target(rationale: str) -> tuple[str, str]:
    """(target, answer) of a GSM8K-style rationale ending in "#### N"; ValueError when there is no numeric N."""
    body, marker, final = rationale.rpartition("####")
    if not marker:
        raise ValueError("no final '#### N' line")
    if not is_number(final):
        raise ValueError(f"the final '####' line holds {final.strip()!r}, not a number")
    answer = normalize_number(final)
    body = _CALC_RE.sub("", body).strip()
    return (f"{body}\nThe answer is {answer}." if body else f"The answer is {answer}."), answer


def strict_answer(output: str) -> str | None:
    match = STRICT_RE.search(output)
    return normalize_number(match.group(1) or match.group(2)) if match else None


def numbers_equal(found: str | None, gold: str) -> bool:
    return found is not None and found != "" and normalize_number(found) == normalize_number(gold)


class GSM8KTask(Task):
    name = "gsm8k"
    default_prompt = (
        "Solve the math problem step by step. End with 'The answer is N.' where N is the final number."
    )
    metrics = ("strict", "flexible")
    max_new_tokens = 256
    # Base models tend to go on with a new few-shot item once they have answered.
    stop_strings = ("\n\nQuestion:", "\n\nProblem:")

    HUB_ID, HUB_CONFIG = "openai/gsm8k", "main"

    def __init__(self, on_bad_row: OnBadRow = "error") -> None:
        self.on_bad_row = on_bad_row

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        if path is not None:
            rows = read_table(path, ("question", "answer"), self.on_bad_row, validate=_validate)
        else:
            check_split(split)
            rows = hub_split_rows(self.HUB_ID, self.HUB_CONFIG, split, ("question", "answer"), self.on_bad_row,
                                  validate=_validate)
        examples = []
        for index, row in enumerate(rows[:limit]):
            target, answer = rationale_to_target(row["answer"])
            examples.append(
                Example(id=f"{split}-{index}", question=row["question"].strip(), answer=answer, target=target,
                        meta={"rationale": row["answer"]}, origin=getattr(row, "origin", None))
            )
        return examples

    def extract(self, output: str) -> dict[str, str | None]:
        return {"strict": strict_answer(output), "flexible": last_number(output)}

    def score(self, output: str, example: Example) -> dict[str, float]:
        found = self.extract(output)
        return {metric: float(numbers_equal(found[metric], example.answer)) for metric in self.metrics}


def _validate(row: dict) -> None:
    try:
        rationale_to_target(row["answer"])
    except ValueError as e:
        raise RowError("answer", str(e)) from None

"""MATH (Hendrycks et al.): competition problems with LaTeX answers, checked by math-verify.

    task = get_task("math")
    test = task.load("test")            # HuggingFaceH4/MATH-500 from the hub; "train": EleutherAI/hendrycks_math
    test = task.load("test", path="math500.jsonl")
    task.score("... so $x=\\\\frac{1}{2}$. The answer is $\\\\boxed{\\\\frac12}$.", test[0])   # {"accuracy": 1.0}

Rows have `problem` and `solution`, and optionally `answer` (MATH-500 has it; otherwise it is the last
\\boxed{...} of the solution) and `unique_id` (used as the id, else f"{split}-{index}"). The target is the
solution followed by a final line "The answer is $\\boxed{ANSWER}$.", so SFT teaches the line the extractor reads.

Extraction: the last \\boxed{...} (nested braces handled), else the text after "The answer is" with its $...$
delimiters removed. Checking: math-verify's `parse` and `verify` on the extracted and the gold answer, both
wrapped in \\boxed{}. math-verify bounds its own work with SIGALRM timeouts (`timeout_s`, default 5 s per call);
signals only exist in the main thread, so in other threads the check runs without a time limit (logged once).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from .answers import answer_span, last_boxed
from .base import Example, Task
from .data_io import OnBadRow, RowError, read_table
from .hub import check_split, hub_split_rows

logger = logging.getLogger(__name__)

HENDRYCKS_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
_warned_about_threads = False


def extract_math_answer(output: str) -> str | None:
    boxed = last_boxed(output)
    if boxed is not None:
        return boxed
    span = answer_span(output)
    if span is None:
        return None
    for left, right in (("$$", "$$"), ("$", "$"), ("\\(", "\\)"), ("\\[", "\\]")):
        if span.startswith(left) and span.endswith(right) and len(span) > len(left) + len(right):
            span = span[len(left) : -len(right)].strip()
            break
    return span.rstrip(".").strip() or None


def math_equal(found: str | None, gold: str, timeout_s: int = 5) -> bool:
    """Whether math-verify finds the extracted answer equal to the gold one; never raises, never hangs (main thread)."""
    if not found or not gold:
        return False
    timeout = timeout_s if _in_main_thread() else None
    try:
        from math_verify import parse, verify  # deferred: pulls in sympy

        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=timeout)
        found_parsed = parse(f"\\boxed{{{found}}}", parsing_timeout=timeout)
        if not gold_parsed or not found_parsed:
            return _same_text(found, gold)
        return bool(verify(gold_parsed, found_parsed, timeout_seconds=timeout))
    except Exception:  # math-verify swallows most of its errors; anything left means "not shown equal"
        return _same_text(found, gold)


def _same_text(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())


def _in_main_thread() -> bool:
    global _warned_about_threads
    if threading.current_thread() is threading.main_thread():
        return True
    if not _warned_about_threads:
        logger.warning("math-verify runs without its SIGALRM timeout outside the main thread")
        _warned_about_threads = True
    return False


class MATHTask(Task):
    name = "math"
    default_prompt = (
        "Solve the math problem step by step. End with 'The answer is $\\boxed{ANSWER}$.' "
        "where ANSWER is the final answer in LaTeX."
    )
    metrics = ("accuracy",)
    max_new_tokens = 512
    stop_strings = ("\n\nProblem:",)

    TRAIN_HUB_ID = "EleutherAI/hendrycks_math"
    TEST_HUB_ID = "HuggingFaceH4/MATH-500"

    def __init__(self, timeout_s: int = 5, on_bad_row: OnBadRow = "error") -> None:
        self.timeout_s, self.on_bad_row = timeout_s, on_bad_row

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        if path is not None:
            rows = read_table(path, ("problem", "solution"), self.on_bad_row, validate=_validate)
        elif check_split(split) == "test":
            rows = self._hub_rows(self.TEST_HUB_ID, None, "test")
        else:
            # The hub keeps one config per subject; the training split is all of them.
            rows = [row for subject in HENDRYCKS_SUBJECTS for row in self._hub_rows(self.TRAIN_HUB_ID, subject, split)]
        return [_example(row, split, index) for index, row in enumerate(rows[:limit])]

    def _hub_rows(self, repo: str, config: str | None, split: str) -> list[dict[str, Any]]:
        return hub_split_rows(repo, config, split, ("problem", "solution"), self.on_bad_row, validate=_validate)

    def extract(self, output: str) -> dict[str, str | None]:
        return {"accuracy": extract_math_answer(output)}

    def score(self, output: str, example: Example) -> dict[str, float]:
        return {"accuracy": float(math_equal(self.extract(output)["accuracy"], example.answer, self.timeout_s))}


def _example(row: dict[str, Any], split: str, index: int) -> Example:
    answer = row["answer"]
    target = f"{row['solution'].strip()}\nThe answer is $\\boxed{{{answer}}}$."
    meta = {key: row[key] for key in ("level", "type", "subject") if key in row}
    return Example(id=str(row.get("unique_id") or f"{split}-{index}"), question=row["problem"].strip(),
                   answer=answer, target=target, meta=meta, origin=getattr(row, "origin", None))


def _validate(row: dict[str, Any]) -> None:
    answer = row.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if answer is None:
        answer = last_boxed(row["solution"])
        if answer is None:
            raise RowError("solution", "no \\boxed{...} answer in the solution and no 'answer' field")
    elif not isinstance(answer, str) or not answer.strip():
        raise RowError("answer", "expected a non-empty string")
    row["answer"] = answer.strip()

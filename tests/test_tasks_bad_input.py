"""Property tests: every extractor and checker takes any text without crashing, carries nothing from one call
to the next, and the file readers turn any bytes into rows or a DataError, nothing else. Select them with
`-m bad_input`.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from metatuner.tasks import DataError, fixture_path, get_task
from metatuner.tasks.answers import answer_span, is_number, last_boxed, last_number, normalize_number
from metatuner.tasks.cosmosqa import extract_letter
from metatuner.tasks.hotpotqa import extract_short_answer
from metatuner.tasks.math import extract_math_answer
from metatuner.tasks.reasoning_gym_task import is_plain_math
from metatuner.tasks.data_io import read_csv, read_jsonl

pytestmark = pytest.mark.bad_input

# Pieces that steer random text into the extractors' interesting branches.
FRAGMENTS = [
    "The answer is ", "the final answer is", "Answer:", "####", " ", "\n", "\n\n", "\\boxed{", "\\boxed ", "\\fbox{",
    "{", "}", "$", "\\(", "\\)", ",", ".", "-", "1", "23", "4.50", "1,000", "(B)", "A", "D.", "option ", "**", "yes",
    "no", "the", "\\frac{1}{2}", "x^2", "'", '"', "\u00e9", "\x00",
    # Text that code-evaluating scorers would run or choke on.
    "__import__('os')", ".system('true')", "[", "]", "9**9**9", "**", "x", "sqrt(", "['a', 'b']",
]
OUTPUTS = st.one_of(st.text(max_size=200), st.lists(st.sampled_from(FRAGMENTS), max_size=30).map("".join))
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _tasks():
    gsm8k = get_task("gsm8k")
    cosmos = get_task("cosmosqa", train_rows=None)
    hotpot = get_task("hotpotqa")
    math = get_task("math")
    custom_options = {"path": str(fixture_path("custom.jsonl")), "question_field": "input", "answer_field": "output"}
    pairs = [
        (gsm8k, gsm8k.load("test", path=str(fixture_path("gsm8k.jsonl")), limit=1)[0]),
        (cosmos, cosmos.load("test", path=str(fixture_path("cosmosqa.csv")), limit=1)[0]),
        (hotpot, hotpot.load("test", path=str(fixture_path("hotpotqa.jsonl")), limit=1)[0]),
        (math, math.load("test", path=str(fixture_path("math.jsonl")), limit=1)[0]),
    ]
    for metric in ("exact_match", "contains", "numeric"):
        task = get_task("custom", metric=metric, on_bad_row="skip", **custom_options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "numeric" skips the fixture's non-numeric answers
            pairs.append((task, task.load("test", limit=1)[0]))
    # One-line numbers, chains of thought, words, and the scorers that evaluate text (sympy, literals).
    for name in ("rg:chain_sum", "gsm_symbolic", "rg:spell_backward", "rg:countdown", "rg:string_insertion"):
        task = get_task(name, size=5, test_size=5)
        pairs.append((task, task.load("train", limit=1)[0]))
    return pairs


TASKS = _tasks()
TASK_IDS = [task.name if task.name != "custom" else f"custom-{task.metric}" for task, _ in TASKS]


@pytest.mark.parametrize("task, example", TASKS, ids=TASK_IDS)
@PROPERTY
@given(output=OUTPUTS, other=OUTPUTS)
def test_bad_input_extract_and_score_never_crash_and_keep_no_state(task, example, output, other):
    """Scores are in [0, 1] for the task's metrics, and an output scores the same before and after the scorer
    has seen another output and the gold target: fails on state carried between calls (a cache keyed on the
    wrong value, a scorer that times out on one input and answers from the previous one)."""
    found = task.extract(output)
    assert set(found) <= set(task.metrics)
    assert all(value is None or isinstance(value, str) for value in found.values())
    scores = task.score(output, example)
    assert list(scores) == list(task.metrics)
    assert all(0.0 <= value <= 1.0 for value in scores.values())
    task.score(other, example), task.score(example.target, example), task.extract(other)
    assert task.extract(output) == found and task.score(output, example) == scores
    assert task.reward(output, example) == scores[task.primary_metric]


@PROPERTY
@given(text=OUTPUTS, other=OUTPUTS)
@example(text=". .", other="")  # a period left after the trailing space went: normalised twice it changed
def test_bad_input_answer_helpers_never_crash(text, other):
    """Each helper returns a string or None, and the same for `text` before and after it has read `other` (state
    carried between calls fails it); normalised numbers are a fixed point, so they compare as equals."""
    for helper in (answer_span, last_boxed, last_number, extract_letter, extract_short_answer, extract_math_answer):
        result = helper(text)
        assert result is None or isinstance(result, str)
        helper(other)
        assert helper(text) == result
    assert is_plain_math(text) in (True, False)
    normalized = normalize_number(text)
    assert normalize_number(normalized) == normalized  # idempotent, so normalised values compare as equals
    assert is_number(text) == is_number(normalized)


@PROPERTY
@given(data=st.one_of(st.binary(max_size=300), st.lists(st.sampled_from([
    b'{"q": "x", "a": "1"}', b'{"q": 1}', b"[1]", b"{", b"\n", b"\xff\xfe", b'"', b",", b"q,a", b"\r\n", b'{"a": null}',
]), max_size=12).map(b"\n".join)))
def test_bad_input_readers_return_rows_or_data_error(data):
    with tempfile.TemporaryDirectory() as directory:
        for name, reader in (("d.jsonl", read_jsonl), ("d.csv", read_csv)):
            path = Path(directory) / name
            path.write_bytes(data)
            for mode in ("error", "skip"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        rows = reader(path, ("q",), on_bad_row=mode)
                    except DataError as e:
                        assert str(path) in str(e)
                    else:
                        assert rows and all(isinstance(row["q"], str) and row["q"].strip() for row in rows)

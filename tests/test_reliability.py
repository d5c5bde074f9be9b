"""Reliability and trust: bad configs and models caught before weights load, faults that lose nothing, and nothing
that MetaTuner loads or reads from a model is ever run. Select with `pytest -k "bad_input or fault or trust"`;
docs/reliability.md lists every case with its test.
"""

from __future__ import annotations

import inspect
import json
import re
import sys

import pytest

from metatuner.tasks import get_task
from metatuner.tasks.reasoning_gym_task import EVAL_SCORERS, SYMPY_SCORERS, is_plain_math

# ----- model output is never executed ------------------------------------------------------------------------


@pytest.mark.parametrize("dataset", sorted(EVAL_SCORERS | SYMPY_SCORERS))
def test_trust_reasoning_gym_scorers_never_run_model_output(dataset, tmp_path):
    task = get_task(f"rg:{dataset}", size=2, test_size=1)
    example = task.load("train", limit=1)[0]
    marker = tmp_path / "ran"
    attack = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    for output in (f"The answer is {attack}", f"The answer is {attack}!", f"The answer is [{attack}]"):
        assert task.score(output, example)["accuracy"] == 0.0
    assert not marker.exists()
    # ...while the gold answer still scores, so the guard does not just switch the scorer off.
    assert task.score(example.target, example)["accuracy"] == 1.0


def test_trust_literal_answers_still_read_without_eval():
    task = get_task("rg:string_insertion", size=2, test_size=1)
    example = task.load("train", limit=1)[0]
    # The scorer gives partial credit to the answer written as a Python list of characters.
    assert task.score(f"The answer is {list(example.answer)}", example)["score"] == pytest.approx(0.1)
    import reasoning_gym.algorithmic.string_insertion as module

    assert "eval" not in vars(module)  # the replacement is undone after the call


@pytest.mark.parametrize("text, plain", [
    ("-5*X**9 - 2*X**6/3 + 4*X**3 + C", True), ("6*(98 - 54) - 34 - 66", True), ("sqrt(2)*pi + x**y", True),
    ("9**9**9", False), ("(9**99)**99", False), ("2**(10**10)", False), ("__import__('os')", False),
    ("x.real", False), ("'a'*10", False), ("f'{1}'", False), ("S('1')", False), ("x!", False), ("1" * 2000, False),
])
def test_trust_sympy_answers_must_be_plain_math(text, plain):
    assert is_plain_math(text) is plain


def test_trust_every_evaluating_reasoning_gym_scorer_is_guarded():
    """A reasoning-gym upgrade that adds a scorer calling eval/parse_expr fails here instead of running answers."""
    import reasoning_gym

    # Reviewed: they evaluate the generator's own expressions (or, for codeio, its shipped code) while building
    # items, and propositional_logic's parse_expr is its own parser, not Python's.
    reviewed = {"basic_arithmetic", "bitwise_arithmetic", "codeio", "propositional_logic"}
    calls = re.compile(r"(?<![\w.])(eval|exec|parse_expr|sympify)\s*\(|\.(parse_expr|sympify)\s*\(")
    unguarded = []
    for name, (cls, _) in reasoning_gym.factory.DATASETS.items():
        modules = {sys.modules[c.__module__] for c in cls.__mro__ if c.__module__.startswith("reasoning_gym")}
        if any(calls.search(inspect.getsource(m)) for m in modules):
            if name not in EVAL_SCORERS | SYMPY_SCORERS | reviewed:
                unguarded.append(name)
    assert not unguarded


def test_trust_math_verify_runs_under_a_timeout():
    import time

    from metatuner.tasks.math import math_equal

    start = time.perf_counter()
    for found in ("9^{9^{9^{9}}}", "2^{2^{2^{2^{2^{2}}}}}", "(" * 25 + "x" + ")" * 25):
        assert math_equal(found, "3", timeout_s=1) is False
    assert time.perf_counter() - start < 15  # about 1 s each; without the timeout the first one never returns

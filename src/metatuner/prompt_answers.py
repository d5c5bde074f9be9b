"""Do the written prompts carry answers rather than instructions? Measured on an evaluation's per-item outputs.

    answers_in_prompts(samples)   # samples: evaluate()'s per-item dicts (input, prompt, output, extracted, answer)

A per-query prompt can raise M's accuracy by what it says about solving the query, or by stating an answer that M
repeats: "The answer is 84." for 58 + 26. The two look alike in the accuracy and in the prompt diagnostics (both are
query-specific), so this counts, over the items whose gold answer is a number, how often the prompt states an answer
(a number the query does not name, or the number of an answer line such as "The answer is 43." for 43 + 14 - 14),
how often a stated answer is the gold one, how often M's answer is one its prompt stated, and how often that
answer is wrong (M repeating a wrong guess). MetaTuner's evaluation adds it to its diagnostics, and the results
tables compute it from the published per-item outputs.
"""

from __future__ import annotations

from collections.abc import Iterable

from .tasks.answers import answer_span, is_number, normalize_number, numbers_in


def answers_in_prompts(samples: Iterable[dict]) -> dict | None:
    """Shares over the items with a numeric gold answer; None when there is none (multiple choice, free text)."""
    items = guesses = gold_named = from_prompt = wrong_repeated = 0
    for sample in samples:
        gold = normalize_number(str(sample.get("answer", "")))
        if not is_number(gold):
            continue
        items += 1
        stated = stated_answers(sample["prompt"], sample["input"])
        answer = _answer(sample)
        guesses += bool(stated)
        gold_named += gold in stated
        from_prompt += answer in stated
        wrong_repeated += answer in stated and answer != gold
    if not items:
        return None
    return {
        "items": items,
        "prompt_states_answer": round(guesses / items, 4),
        "prompt_states_gold": round(gold_named / items, 4),
        "answer_from_prompt": round(from_prompt / items, 4),
        "wrong_answer_from_prompt": round(wrong_repeated / items, 4),
    }


def stated_answers(prompt: str, query: str) -> set[str]:
    """The answers a prompt states for its query: the numbers it names that the query does not, and the number on
    its answer line ("The answer is 43."; the "N" of "End with 'The answer is N.'" is no number)."""
    stated = numbers_in(prompt) - numbers_in(query)
    line = answer_span(prompt)
    if line is not None and is_number(line):
        stated.add(normalize_number(line))
    return stated


def _answer(sample: dict) -> str | None:
    """M's extracted answer as a normalised number (the first metric's extraction that has one), else None."""
    for value in (sample.get("extracted") or {}).values():
        if value is not None and is_number(str(value)):
            return normalize_number(str(value))
    return None

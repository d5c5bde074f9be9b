"""`answers_in_prompts`: whether G's prompts carry answers that M repeats, against hand-counted items."""

import pytest

from metatuner.prompt_answers import answers_in_prompts, stated_answers


def _sample(query, prompt, answer, extracted):
    return {"input": query, "prompt": prompt, "answer": answer, "extracted": {"accuracy": extracted}}


def test_stated_answers_are_new_numbers_and_the_answer_line():
    assert stated_answers("58 + 26 is 84. The answer is N.", "58 + 26 =") == {"84"}
    assert stated_answers("The answer is 43.", "43 + 14 - 14 =") == {"43"}  # a number of the query, as an answer
    assert stated_answers("First add 58 and 26. End with 'The answer is N.'", "58 + 26 =") == set()
    assert stated_answers("The answer is 1,000.", "999 + 1 =") == {"1000"}


def test_answers_in_prompts_by_hand():
    samples = [
        _sample("58 + 26 =", "The answer is 84.", "84", "84"),  # the gold answer, repeated
        _sample("43 + 14 - 14 =", "The answer is 5.", "43", "5"),  # a wrong guess, repeated
        _sample("7 - 2 =", "The answer is 9.", "5", "5"),  # a wrong guess, not repeated
        _sample("12 + 7 =", "First add 12 and 7.", "19", "19"),  # an instruction
        _sample("Which? A) x B) y", "The answer is B.", "B", "B"),  # not a number: not counted
    ]
    assert answers_in_prompts(samples) == {
        "items": 4, "prompt_states_answer": 0.75, "prompt_states_gold": 0.25,
        "answer_from_prompt": 0.5, "wrong_answer_from_prompt": 0.25}


def test_no_numeric_answers_gives_none():
    assert answers_in_prompts([_sample("Which? A) x B) y", "Think.", "B", "B")]) is None
    assert answers_in_prompts([]) is None


@pytest.mark.parametrize("extracted", [None, "no number"])
def test_an_answer_without_a_number_is_not_from_the_prompt(extracted):
    d = answers_in_prompts([_sample("2 + 2 =", "The answer is 4.", "4", extracted)])
    assert d["prompt_states_gold"] == 1.0 and d["answer_from_prompt"] == 0.0

"""Tasks: loading the shipped fixtures, the registry, and each task's extraction and checking, offline."""

from __future__ import annotations

import json

import pytest

import metatuner.tasks.cosmosqa as cosmosqa_module
import metatuner.tasks.gsm8k as gsm8k_module
import metatuner.tasks.hotpotqa as hotpotqa_module
import metatuner.tasks.hub as hub_module
import metatuner.tasks.math as math_module
from metatuner.tasks import (
    CosmosQATask,
    DataError,
    Example,
    GSM8KTask,
    ReasoningGymTask,
    Task,
    fixture_path,
    get_task,
    list_tasks,
    register_task,
)
from metatuner.tasks.answers import answer_span, last_boxed, last_number, normalize_number, numbers_in
from metatuner.tasks.cosmosqa import extract_letter
from metatuner.tasks.gsm8k import rationale_to_target
from metatuner.tasks.hotpotqa import exact_match, f1_score, normalize_answer
from metatuner.tasks.math import extract_math_answer
from metatuner.tasks.reasoning_gym_task import TEST_SEED_OFFSET


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


# --- registry ---------------------------------------------------------------------------------------------------


def test_registry_lists_builtin_tasks_and_reasoning_gym():
    names = list_tasks()
    for name in ("gsm8k", "math", "hotpotqa", "cosmosqa", "custom", "gsm_symbolic", "rg:chain_sum", "rg:gsm_symbolic"):
        assert name in names
    assert "rg:chain_sum" not in list_tasks(include_reasoning_gym=False)


def test_registry_builds_tasks_with_options():
    assert isinstance(get_task("gsm8k"), GSM8KTask)
    assert get_task("cosmosqa", train_rows=3).train_rows == 3
    task = get_task("gsm_symbolic", size=10, test_size=5)
    assert isinstance(task, ReasoningGymTask) and task.name == "rg:gsm_symbolic" and task.size == 10


def test_registry_unknown_names_list_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown task 'gsm9k'; known tasks: .*cosmosqa.*gsm8k.*rg:<name>"):
        get_task("gsm9k")
    with pytest.raises(ValueError, match="unknown reasoning-gym dataset 'no_such_thing'; available: .*chain_sum"):
        get_task("rg:no_such_thing")
    with pytest.raises(ValueError, match="bad option"):
        get_task("rg:chain_sum", not_an_option=1)
    with pytest.raises(ValueError, match="bad option"):
        get_task("rg:composite")  # its config rejects the defaults


def test_register_task_as_call_and_decorator():
    @register_task("test-echo")
    def make(**options):
        return get_task("custom", name="test-echo", **options)

    assert get_task("test-echo").name == "test-echo"
    with pytest.raises(ValueError, match="already registered"):
        register_task("test-echo", make)
    register_task("test-echo", make, overwrite=True)
    with pytest.raises(ValueError, match="reserved"):
        register_task("rg:mine", make)


# --- GSM8K ------------------------------------------------------------------------------------------------------


def test_gsm8k_fixture_loads_with_targets_and_answers():
    task = get_task("gsm8k")
    examples = task.load("test", path=str(fixture_path("gsm8k.jsonl")))
    assert [e.answer for e in examples] == ["18", "3", "70000", "540", "20"]
    assert [e.id for e in examples] == [f"test-{i}" for i in range(5)]
    assert examples[0].target.endswith("The answer is 18.") and "<<" not in examples[0].target
    assert task.load("test", path=str(fixture_path("gsm8k.jsonl")), limit=2) == examples[:2]
    for example in examples:
        assert task.score(example.target, example) == {"strict": 1.0, "flexible": 1.0}


def test_gsm8k_rationale_to_target():
    target, answer = rationale_to_target("He pays 2*3=<<2*3=6>>6 dollars.\n#### 1,000")
    assert (target, answer) == ("He pays 2*3=6 dollars.\nThe answer is 1000.", "1000")
    with pytest.raises(ValueError, match="no final"):
        rationale_to_target("no marker 6")
    with pytest.raises(ValueError, match="not a number"):
        rationale_to_target("x\n#### six")


@pytest.mark.parametrize(
    "output, strict, flexible",
    [
        ("The answer is 18.", "18", "18"),
        ("The answer is 18", "18", "18"),  # lm-eval's pattern would need a character after the number
        ("So she makes 9 * 2 = 18.\n#### 18", "18", "18"),
        ("The answer is -5.", "-5", "-5"),
        ("It costs $1,000. The answer is 1,000.", "1000", "1000"),
        ("The answer is $1,000.", None, "1000"),  # strict needs the number right after "is "
        ("The answer is 18.00", "18", "18"),
        ("The answer is 0.5.", "0.5", "0.5"),
        ("first 3, then 4, finally 7", None, "7"),
        ("The answer is 5. Actually 6.", "5", "6"),
        ("#### 6\nThe answer is 5.", "6", "5"),
        ("no number here", None, None),
        ("", None, None),
        ("the answer is 5", None, "5"),  # strict is case-sensitive, as in lm-eval
        ("Total: 12... done...", None, "12"),
    ],
)
def test_gsm8k_extraction(output, strict, flexible):
    assert GSM8KTask().extract(output) == {"strict": strict, "flexible": flexible}


@pytest.mark.parametrize(
    "output, expected",
    [
        ("The answer is 18.00.", {"strict": 1.0, "flexible": 1.0}),
        ("#### $18", {"strict": 0.0, "flexible": 1.0}),
        ("I think 18 but the answer is 19.", {"strict": 0.0, "flexible": 0.0}),
        ("The answer is 18. Check: 18 - 1 = 17", {"strict": 1.0, "flexible": 0.0}),
        ("", {"strict": 0.0, "flexible": 0.0}),
    ],
)
def test_gsm8k_score(output, expected):
    example = Example(id="x", question="q", answer="18", target="The answer is 18.")
    assert GSM8KTask().score(output, example) == expected
    assert GSM8KTask().reward(output, example) == expected["strict"]


@pytest.mark.bad_input
def test_bad_input_hub_rows_are_checked_like_files(monkeypatch):
    rows = [{"question": "q1", "answer": "1+1=<<1+1=2>>2\n#### 2"}, {"question": "q2", "answer": "no final line"}]
    seen = []

    def fake_hub(repo, config, split):
        seen.append((repo, config, split))
        return rows

    monkeypatch.setattr(hub_module, "load_hub_rows", fake_hub)
    with pytest.raises(DataError, match=r"hf://openai/gsm8k\[main\]:test, row 2, field 'answer'"):
        GSM8KTask().load("test")
    assert seen == [("openai/gsm8k", "main", "test")]
    with pytest.warns(UserWarning, match="Skipped 1"):
        assert [e.answer for e in GSM8KTask(on_bad_row="skip").load("train")] == ["2"]
    with pytest.raises(ValueError, match="unknown split"):
        GSM8KTask().load("dev")


# --- shared answer helpers ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("$1,000", "1000"), ("18.00", "18"), ("-0.50", "-0.5"), ("-0", "0"), (".5", "0.5"), ("007", "7"),
     ("12.", "12"), ("1.2.3", "1.2.3"), ("abc", "abc"), ("", "")],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


def test_answer_span_takes_the_last_marker_and_multiline_blocks():
    assert answer_span("Answer: 3\nThe final answer is **Paris**.") == "Paris"
    assert answer_span("The answer is:\n1 2\n3 4\n\nDone.") == "1 2\n3 4"
    assert answer_span("no marker") is None
    assert last_number("x = -3.5 and y = 2,000") == "2000"


def test_numbers_in_finds_every_number_and_signs_only_when_attached():
    assert numbers_in("add 1,000 and 7.") == {"1000", "7"}
    assert numbers_in("38 - 57 - 10 =") == {"38", "57", "10"} and numbers_in("is -19.") == {"-19"}
    assert numbers_in("The answer is N.") == set()


def test_states_answer_catches_the_gold_number_in_any_wording():
    """A prompt that names the gold answer without the answer line the checker reads ("... is 84. The answer is N.")
    passed the checker-only test and won D2 by leaking the label; numbers taken from the question are no leak."""
    example = Example(id="x", question="What is 58 + 26?", answer="84", target="The answer is 84.")
    task = GSM8KTask()
    assert task.states_answer("The answer is 84.", example)  # the checker's own reading
    assert task.states_answer("58 + 26 is 84. The answer is N.", example)
    # GSM8K's checker reads 84 here; reasoning-gym's reads "84.'", and only the number rule catches it.
    assert task.states_answer("End with 'The answer is 84.'", example)
    assert not task.states_answer("Add 58 and 26, then end with 'The answer is N.'", example)
    assert not task.states_answer("The answer is 85.", example)
    echo = Example(id="y", question="What is 5 + 0?", answer="5", target="The answer is 5.")
    assert not task.states_answer("Add 5 and 0.", echo)  # the gold number is in the question itself


# --- reasoning-gym ------------------------------------------------------------------------------------------------


def test_reasoning_gym_train_and_test_are_disjoint_and_deterministic():
    task = get_task("rg:chain_sum", size=300, test_size=100, seed=3)
    train, test = task.load("train"), task.load("test")
    assert len(train) == 300 and len(test) == 100
    assert not {e.question for e in train} & {e.question for e in test}
    assert [e.question for e in get_task("rg:chain_sum", size=300, test_size=100, seed=3).load("test")] == [
        e.question for e in test
    ]
    assert task.load("test", limit=10) == test[:10]  # a limited load is a prefix of the full one
    assert len({e.id for e in train + test}) == 400
    assert TEST_SEED_OFFSET > 300


def test_reasoning_gym_drops_test_questions_seen_in_train():
    # A tiny question space (single-digit sums of two terms) forces collisions that must be dropped.
    task = get_task("rg:chain_sum", size=150, test_size=20, min_terms=2, max_terms=2, min_digits=1, max_digits=1)
    train, test = task.load("train"), task.load("test")
    assert len(test) == 20 and not {e.question for e in train} & {e.question for e in test}
    assert any(e.id != f"test-{i}" for i, e in enumerate(test))  # some generated items were skipped


def test_reasoning_gym_gsm_symbolic_targets_and_scoring():
    task = get_task("gsm_symbolic", size=20, test_size=5)
    example = task.load("train", limit=1)[0]
    assert example.target.endswith(f"The answer is {example.answer}.") and "####" not in example.target
    assert task.numeric and task.metrics[0] == "accuracy"
    assert task.score(example.target, example)["accuracy"] == 1.0
    assert task.score(f"It is {example.answer}", example)["accuracy"] == 1.0  # last-number fallback
    assert task.score("The answer is 1.5e9.", example)["accuracy"] == 0.0


@pytest.mark.parametrize(
    "output, accuracy",
    [("The answer is -14.", 1.0), ("The answer is -14.0", 1.0), ("Thinking... -14", 1.0), ("The answer is 14.", 0.0),
     ("no idea", 0.0), ("", 0.0)],
)
def test_reasoning_gym_numeric_extraction_uses_the_dataset_scorer(output, accuracy):
    task = get_task("rg:chain_sum", size=5, test_size=5)
    example = task.load("train", limit=1)[0]
    example = Example(example.id, example.question, "-14", "The answer is -14.",
                      meta={"entry": {**example.meta["entry"], "answer": "-14"}})
    assert task.score(output, example)["accuracy"] == accuracy


def test_reasoning_gym_non_numeric_dataset_falls_back_to_last_line():
    task = get_task("rg:spell_backward", size=5, test_size=5)
    assert not task.numeric
    assert task.extract("thinking\nfinal line")["accuracy"] == "final line"
    assert task.extract("The answer is: olleh")["accuracy"] == "olleh"


def test_reasoning_gym_block_targets_round_trip():
    # sentence_reordering answers end in a period, n_queens answers are grids: both need the verbatim block form.
    for name in ("rg:sentence_reordering", "rg:n_queens"):
        task = get_task(name, size=5, test_size=5)
        for example in task.load("train"):
            if example.answer.endswith(".") or "\n" in example.answer:
                assert example.target.startswith("The answer is:\n")
            assert task.extract(example.target)["accuracy"] == example.answer.strip()
            assert task.score(example.target, example)["accuracy"] == 1.0


def test_reasoning_gym_loads_a_local_file(tmp_path):
    rows = [{"question": "1 + 2 =", "answer": "3"}, {"id": "k", "question": "2 + 2 =", "answer": 4}]
    path = write_jsonl(tmp_path / "rg.jsonl", rows)
    task = get_task("rg:chain_sum", size=5, test_size=5)
    examples = task.load("test", path=str(path))
    assert [(e.id, e.answer) for e in examples] == [("test-0", "3"), ("k", "4")]
    assert task.score("The answer is 3.", examples[0])["accuracy"] == 1.0
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "1", "metadata": [1]}])
    with pytest.raises(DataError, match="line 1, field 'metadata'"):
        task.load("test", path=str(bad))


# --- CosmosQA -----------------------------------------------------------------------------------------------------


def test_cosmosqa_row_split_and_examples():
    path = str(fixture_path("cosmosqa.csv"))
    task = get_task("cosmosqa", train_rows=5)
    train, test = task.load("train", path=path), task.load("test", path=path)
    assert len(train) == 5 and len(test) == 3 and not {e.id for e in train} & {e.id for e in test}
    example = train[0]
    assert example.answer == "B" and example.target == "The answer is B." and len(example.choices) == 4
    assert "\nA. " in example.question and "\nD. " in example.question and example.question.startswith("Context: ")
    assert task.choice_targets(example) == [f"The answer is {x}." for x in "ABCD"]
    assert len(get_task("cosmosqa", train_rows=None).load("test", path=path)) == 8
    with pytest.raises(ValueError, match="leaves none for 'test'"):
        get_task("cosmosqa").load("test", path=path)  # the default 2000 rows swallow the whole fixture


def test_cosmosqa_hub_uses_validation_as_test(monkeypatch):
    row = {"id": "x", "context": "c", "question": "q", "label": 3} | {f"answer{i}": f"option {i}" for i in range(4)}
    calls = []
    monkeypatch.setattr(hub_module, "load_hub_rows", lambda repo, config, split: calls.append(split) or [row])
    assert CosmosQATask().load("test")[0].answer == "D" and calls == ["validation"]


@pytest.mark.bad_input
@pytest.mark.parametrize("label", ["4", "-1", "x", "1.0"])
def test_bad_input_cosmosqa_label_outside_range(tmp_path, label):
    source = fixture_path("cosmosqa.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    header = source[0]
    path = tmp_path / "c.csv"
    path.write_text(header + f"a,ctx,q,o0,o1,o2,o3,1\nb,ctx,q,o0,o1,o2,o3,{label}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"c.csv, line 3, field 'label'"):
        get_task("cosmosqa", train_rows=None).load("test", path=str(path))


@pytest.mark.parametrize(
    "output, letter",
    [("B", "B"), ("(B)", "B"), ("Answer: B", "B"), ("The answer is B.", "B"), ("The answer is (C)", "C"),
     ("**D**", "D"), ("A. He wants to marry", "A"), ("I pick option C because", "C"), ("the answer is a dog", None),
     ("A man was there.", None), ("Answer: A, no wait, the answer is D", "D"), ("(A) or maybe (B)", "A"),
     ("Because of rain", None), ("", None)],
)
def test_cosmosqa_letter_extraction(output, letter):
    assert extract_letter(output) == letter


# --- MATH ---------------------------------------------------------------------------------------------------------


def test_math_fixture_loads_answers_and_scores_targets():
    task = get_task("math")
    examples = task.load("test", path=str(fixture_path("math.jsonl")))
    assert [e.answer for e in examples] == ["\\frac{5}{6}", "3", "2\\sqrt{2}", "\\{-1, 1\\}"]
    assert examples[1].id == "test/algebra/1.json" and examples[0].id == "test-0"
    for example in examples:
        assert example.target.endswith(f"The answer is $\\boxed{{{example.answer}}}$.")
        assert task.score(example.target, example) == {"accuracy": 1.0}


@pytest.mark.parametrize(
    "output, answer",
    [("so \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"), ("\\boxed{1} then \\boxed{\\{a, \\{b\\}\\}}", "\\{a, \\{b\\}\\}"),
     ("\\boxed 5", "5"), ("\\fbox{7}", "7"), ("The answer is $x^2$.", "x^2"), ("The answer is \\(3\\)", "3"),
     ("\\boxed{unbalanced and The answer is 4", "4"), ("\\boxed{}", None), ("nothing", None)],
)
def test_math_extraction(output, answer):
    assert extract_math_answer(output) == answer
    assert last_boxed("a \\boxed{{x}}") == "{x}"


@pytest.mark.parametrize(
    "output, correct",
    [("The answer is $\\boxed{\\frac{10}{12}}$.", 1.0), ("\\boxed{5/6}", 1.0), ("The answer is 0.8333333.", 1.0),
     ("\\boxed{\\frac{6}{5}}", 0.0), ("no answer", 0.0), ("\\boxed{\\frac{", 0.0)],
)
def test_math_score_uses_math_verify(output, correct):
    example = Example(id="x", question="q", answer="\\frac{5}{6}", target="")
    assert get_task("math").score(output, example) == {"accuracy": correct}


@pytest.mark.bad_input
def test_bad_input_math_row_without_answer(tmp_path):
    rows = [{"problem": "p", "solution": "s \\boxed{1}"}, {"problem": "p", "solution": "no box"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    with pytest.raises(DataError, match=r"line 2, field 'solution': no \\boxed"):
        get_task("math").load("test", path=str(path))


# --- HotpotQA -----------------------------------------------------------------------------------------------------


def test_hotpotqa_fixture_both_context_forms():
    task = get_task("hotpotqa")
    examples = task.load("test", path=str(fixture_path("hotpotqa.jsonl")))
    assert [e.id for e in examples] == ["hp-1", "hp-2", "hp-3"]
    assert "Louvre: The Louvre is an art museum in Paris." in examples[2].question
    assert examples[2].question.endswith("Question: What river flows through the city where the Louvre is?")
    assert examples[2].meta["supporting"] == ["Louvre", "Paris"]
    assert task.score(examples[2].target, examples[2]) == {"em": 1.0, "f1": 1.0}
    gold_only = get_task("hotpotqa", paragraphs="supporting").load("test", path=str(fixture_path("hotpotqa.jsonl")))
    assert "Thames" not in gold_only[2].question and "Big Ben" not in gold_only[0].question
    short = get_task("hotpotqa", max_context_chars=40).load("test", path=str(fixture_path("hotpotqa.jsonl")))
    assert short[0].question.split("\n\nQuestion:")[0].endswith(" ...")


def test_hotpotqa_and_math_hub_splits(monkeypatch):
    hotpot_row = json.loads(fixture_path("hotpotqa.jsonl").read_text().splitlines()[0])
    calls = []
    monkeypatch.setattr(hub_module, "load_hub_rows", lambda *args: calls.append(args) or [hotpot_row])
    assert get_task("hotpotqa").load("test")[0].answer == "Paris"
    assert calls == [("hotpotqa/hotpot_qa", "distractor", "validation")]
    math_row = {"problem": "p", "solution": "so \\boxed{2}", "level": "Level 1", "type": "Algebra"}
    calls.clear()
    monkeypatch.setattr(hub_module, "load_hub_rows", lambda *args: calls.append(args) or [math_row])
    assert len(get_task("math").load("train")) == 7 and {c[1] for c in calls} == set(math_module.HENDRYCKS_SUBJECTS)
    calls.clear()
    assert get_task("math").load("test")[0].answer == "2" and calls == [("HuggingFaceH4/MATH-500", None, "test")]


@pytest.mark.bad_input
def test_bad_input_hotpotqa_bad_context(tmp_path):
    path = write_jsonl(tmp_path / "h.jsonl", [{"id": "1", "question": "q", "answer": "a", "context": "text"}])
    with pytest.raises(DataError, match="line 1, field 'context'"):
        get_task("hotpotqa").load("test", path=str(path))


@pytest.mark.parametrize(
    "prediction, gold, em, f1",
    [("The Eiffel Tower!", "eiffel tower", 1.0, 1.0), ("Paris France", "Paris", 0.0, 2 / 3), ("yes", "no", 0.0, 0.0),
     ("no", "no", 1.0, 1.0), ("yes it is", "yes", 0.0, 0.0), ("London", "Paris", 0.0, 0.0), (None, "x", 0.0, 0.0)],
)
def test_hotpotqa_em_f1(prediction, gold, em, f1):
    assert exact_match(prediction, gold) == em
    assert f1_score(prediction, gold) == pytest.approx(f1)


def test_hotpotqa_extraction():
    task = get_task("hotpotqa")
    assert task.extract("Paris is it. The answer is the Seine.")["em"] == "the Seine"
    assert task.extract("Answer: Seine\n")["f1"] == "Seine"
    assert task.extract("\n  Seine river\nmore text")["em"] == "Seine river"
    assert task.extract("   ")["em"] is None
    assert normalize_answer("  The  Seine, river. ") == "seine river"


# --- custom -------------------------------------------------------------------------------------------------------


def custom(**options) -> Task:
    path = str(fixture_path("custom.jsonl"))
    return get_task("custom", path=path, question_field="input", answer_field="output", **options)


def test_custom_task_fields_ids_and_targets():
    examples = custom(id_field="uid").load("train")
    assert [(e.id, e.question, e.answer) for e in examples][0] == ("c1", "What is the capital of France?", "Paris")
    assert examples[0].target == "The answer is Paris."
    assert custom().load("test")[0].id == "test-0"
    with pytest.raises(DataError, match="line 1, field 'explanation': missing field"):
        custom(target_field="explanation").load("train")
    with pytest.raises(ValueError, match="pass path"):
        get_task("custom").load("train")


@pytest.mark.parametrize(
    "metric, output, correct",
    [("exact_match", "The answer is paris.", 1.0), ("exact_match", "It is Paris", 0.0),
     ("exact_match", "blah\nParis", 1.0), ("contains", "I believe it is Paris, France", 1.0), ("contains", "Lyon", 0.0),
     ("contains", "The answer is Lyon.\nParis is wrong.", 0.0)],
)
def test_custom_metrics(metric, output, correct):
    example = Example(id="x", question="q", answer="Paris", target="")
    assert custom(metric=metric).score(output, example) == {"accuracy": correct}


@pytest.mark.bad_input
def test_bad_input_custom_numeric_answers_must_be_numbers(tmp_path):
    task = custom(metric="numeric")
    with pytest.raises(DataError, match="line 1, field 'output': metric 'numeric' needs a number"):
        task.load("train")
    path = write_jsonl(tmp_path / "n.jsonl", [{"input": "q", "output": "-2.5"}])
    example = task.load("train", path=str(path))[0]
    assert task.score("The answer is -2.50 apples", example)["accuracy"] == 1.0
    assert task.score("maybe 3, no: -2.5", example)["accuracy"] == 1.0
    assert task.score("no number", example)["accuracy"] == 0.0

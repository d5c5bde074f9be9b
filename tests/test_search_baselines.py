"""The OPRO-like and BetterTogether-like baselines on a tiny model saved to a temporary directory."""

import json

import pytest
from typer.testing import CliRunner

from metatuner.baselines.better_together import train_better_together
from metatuner.baselines.opro import clean_instruction, meta_prompt, search_instructions, search_metrics, split_dev
from metatuner.cli import app
from metatuner.config import ConfigError, SearchSettings, load_config
from metatuner.generation import chat_prompt, score_targets
from metatuner.models import load_model
from metatuner.tasks import get_task
from metatuner.testing import tensorboard_scalars

TASK = ["data.task=rg:chain_sum", "data.task_options={size: 8, test_size: 4}"]
SMALL_SEARCH = ["search.rounds=2", "search.proposals_per_round=3", "search.dev_size=4",
                "search.max_instruction_tokens=10", "eval.max_new_tokens=4"]



@pytest.fixture(scope="module")
def tiny_dir(tiny_dir_2layers):
    return tiny_dir_2layers


@pytest.fixture(scope="module")
def task():
    return get_task("rg:chain_sum", size=8, test_size=4)


def _mean_loglik(model, tokenizer, task, examples, instruction):
    chats = [chat_prompt(tokenizer, task.messages(instruction, ex)) for ex in examples]
    scores = score_targets(model, tokenizer, chats, [ex.target for ex in examples])
    return sum(s / c for s, c in scores) / len(scores)


def test_search_keeps_the_best_instruction_and_never_loses_to_p0(tiny_dir, task):
    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    train = task.load("train")
    settings = SearchSettings(rounds=3, proposals_per_round=3, dev_size=4, max_instruction_tokens=10)
    rounds_entered = []

    import contextlib

    class Tracker:  # what the search sends to an accelerate tracker
        logged = []

        def log(self, values, step=None):
            self.logged.append((step, values))

    result = search_instructions(model, tokenizer, task, train, [task.default_prompt], settings, seed=1,
                                 generator_context=lambda: rounds_entered.append(1) or contextlib.nullcontext(),
                                 tracker=Tracker(), tag_prefix="s/")
    proposals = [h for h in result.history if h["source"] == "proposal"]
    assert result.history[0] == {"round": 0, "source": "initial", "instruction": task.default_prompt,
                                 "score": result.p0_score}
    assert len(proposals) == 9 and [h["round"] for h in proposals] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert len(rounds_entered) == 3  # the generator's context wraps every round's proposals
    scored = [h for h in proposals if h["score"] is not None and not h.get("duplicate")]
    assert scored, "no proposal was scored"

    # Recomputed independently on the dev items the search names: the reported scores are real, the best is the
    # maximum over everything tried, and it is at least p0's.
    dev = [ex for ex in train if ex.id in set(result.dev_ids)]
    assert len(dev) == 4 and not set(result.dev_ids) & {ex.id for ex in task.load("test")}
    best_again = _mean_loglik(model, tokenizer, task, dev, result.best)
    p0_again = _mean_loglik(model, tokenizer, task, dev, task.default_prompt)
    assert best_again == pytest.approx(result.best_score, abs=1e-4)
    assert p0_again == pytest.approx(result.p0_score, abs=1e-4)
    assert best_again >= p0_again
    assert result.best_score == max(h["score"] for h in result.history if h["score"] is not None)
    assert result.examples_scored == 4 * result.instructions_scored

    # One history value per round (0: the initial pool), the best so far climbing from p0's score to the best's.
    history = search_metrics(result, 4)["history"]
    assert set(history) == {"train/best_score", "train/round_best_score", "train/round_mean_score",
                            "train/new_instructions"}
    assert all(len(values) == 4 for values in history.values())
    best = history["train/best_score"]
    assert best[0] == result.p0_score and best[-1] == result.best_score and best == sorted(best)
    assert sum(history["train/new_instructions"]) == result.instructions_scored
    for round_ in (1, 2, 3):
        tried = [h["score"] for h in proposals if h["round"] == round_ and h["score"] is not None]
        assert history["train/round_best_score"][round_] == (max(tried) if tried else None)
    # ... and each round's figures went to the tracker as the round ended, under the prefix, None left out.
    assert [step for step, _ in Tracker.logged] == [0, 1, 2, 3]
    assert [values["s/train/best_score"] for _, values in Tracker.logged] == best
    assert all(None not in values.values() for _, values in Tracker.logged)


@pytest.mark.parametrize("p0_is_best", [False, True])
def test_the_best_scored_instruction_wins_wherever_it_comes(tiny_dir, task, monkeypatch, p0_is_best):
    """With proposals fixed (the generator stubbed out), the result must be the dev argmax, not the last or the
    first proposal; and p0 must survive proposals that are all worse."""
    import metatuner.baselines.opro as opro
    from metatuner.generation import GenerationOutput

    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    train = task.load("train")
    dev, _ = split_dev(train, 4, seed=0)
    pool = [task.default_prompt, "Add the numbers.", "Compute the sum, then say the answer.", "x", "The answer is"]
    ranked = sorted(pool, key=lambda ins: _mean_loglik(model, tokenizer, task, dev, ins))
    if p0_is_best:
        p0, proposals = ranked[-1], ranked[:-1]
    else:  # the best in the middle, the worst last, and p0 second worst
        p0, proposals = ranked[1], [ranked[-2], ranked[-1], ranked[2], "", ranked[0]]
    monkeypatch.setattr(opro, "generate", lambda *a, **k: GenerationOutput(list(proposals), [1] * len(proposals), 0.0))
    settings = SearchSettings(rounds=1, proposals_per_round=len(proposals), dev_size=4)
    result = search_instructions(model, tokenizer, task, train, [p0], settings, seed=0)
    assert result.best == ranked[-1] and result.p0 == p0
    assert [h["instruction"] for h in result.history] == [p0, *proposals]
    assert [h.get("skipped") for h in result.history].count("empty") == (0 if p0_is_best else 1)


def test_accuracy_scorer_and_ties_keep_p0(tiny_dir, task):
    model, tokenizer = load_model(str(tiny_dir), device="cpu")
    settings = SearchSettings(rounds=1, proposals_per_round=2, dev_size=3, scorer="accuracy", max_instruction_tokens=6)
    result = search_instructions(model, tokenizer, task, task.load("train"), [task.default_prompt], settings,
                                 max_new_tokens=3)
    # A random tiny model answers nothing right: every instruction ties at 0, and a tie never displaces p0.
    assert all(h["score"] in (0.0, None) for h in result.history)
    assert result.best == task.default_prompt and result.best_score == 0.0


def test_meta_prompt_lists_scores_worst_first_and_replies_are_cleaned(task):
    train = task.load("train")
    dev, rest = split_dev(train, 3, seed=0)
    assert len(dev) == 3 and len(rest) == 5 and not {e.id for e in dev} & {e.id for e in rest}
    text = meta_prompt([("bad", -3.0), ("good", -0.5)], rest[:2], "likelihood")
    assert text.index("text:\nbad\nscore:\n5.0") < text.index("text:\ngood\nscore:\n60.7")
    assert rest[0].question in text and f"output:\n{rest[0].answer}" in text
    assert clean_instruction(' "Add the numbers\n carefully."</INS> junk') == "Add the numbers carefully."


def test_search_settings_are_validated():
    with pytest.raises(ConfigError, match="search.scorer"):
        load_config(None, ["method=opro", "search.scorer=bleu"])
    with pytest.raises(ConfigError, match="search.rounds"):
        load_config(None, ["method=better_together", "search.rounds=0"])


def test_cli_opro_trains_and_evaluates_with_the_found_instruction(tiny_dir, tmp_path):
    out = tmp_path / "opro"
    result = CliRunner().invoke(app, [
        "train", "--method", "opro", f"model.name={tiny_dir}", "model.device=cpu", f"output_dir={out}",
        *TASK, *SMALL_SEARCH, "--eval",
    ])
    assert result.exit_code == 0, result.output
    search = json.loads((out / "search.json").read_text())
    best = (out / "best_prompt.txt").read_text().strip()
    assert search["best"] == best and search["history"][0]["source"] == "initial"
    assert len([h for h in search["history"] if h["source"] == "proposal"]) == 6
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert {"command", "train_seconds", "train_examples", "peak_rss_mb"} <= set(metrics)
    assert metrics["train_examples"] == 4 * search["instructions_scored"]
    best_so_far = metrics["history"]["train/best_score"]
    assert len(best_so_far) == 3 and best_so_far[-1] == search["best_score"]  # rounds 0 (p0), 1 and 2
    logged = tensorboard_scalars(out / "tb")  # the same figures in TensorBoard, by round
    assert [step for step, _ in logged["train/best_score"]] == [0, 1, 2]
    assert [value for _, value in logged["train/best_score"]] == pytest.approx(best_so_far, abs=1e-6)
    assert "run/train_seconds" in logged
    evaluated = json.loads((out / "eval" / "metrics.json").read_text())
    assert evaluated["prompt"] == best and evaluated["n_eval"] == 4
    sample = json.loads((out / "eval" / "samples.jsonl").read_text().splitlines()[0])
    assert sample["prompt"] == best


def test_better_together_searches_fine_tunes_and_searches_again(tiny_dir, tmp_path):
    from peft import PeftModel

    cfg = load_config(None, [
        "method=better_together", f"model.name={tiny_dir}", "model.device=cpu", f"output_dir={tmp_path / 'bt'}",
        *TASK, *SMALL_SEARCH, "train.max_steps=2", "train.batch_size=4", "train.lr=5e-3", "train.warmup_ratio=0",
        "train.mixed_precision=fp32", "lora.r=4", "lora.alpha=8",
    ])
    out = train_better_together(cfg)
    search = json.loads((out / "search.json").read_text())
    first, second = search["before_sft"], search["after_sft"]
    # The second search starts from the instruction SFT trained under, with p0 beside it.
    assert [h["instruction"] for h in second["history"][:2]] == list(dict.fromkeys([first["best"], first["p0"]]))
    assert second["best_score"] >= second["history"][0]["score"]
    assert (out / "best_prompt.txt").read_text().strip() == second["best"]

    metrics = json.loads((out / "train_metrics.json").read_text())
    phases = metrics["phases"]
    assert metrics["method"] == "better_together" and phases["sft"]["steps"] == 2
    assert metrics["train_examples"] == sum(p["train_examples"] for p in phases.values())
    # Every phase's history, by phase: the searches' rounds (0 to 2) and the SFT's steps.
    history = metrics["history"]
    for phase in ("search_before_sft", "search_after_sft"):
        assert len(history[f"{phase}/train/best_score"]) == 3
        assert history[f"{phase}/train/best_score"][-1] == search[phase.removeprefix("search_")]["best_score"]
    assert len(history["sft/train/loss"]) == 2
    logged = tensorboard_scalars(out / "tb")
    assert [step for step, _ in logged["search_after_sft/train/best_score"]] == [0, 1, 2]
    assert {"search_before_sft/train/best_score", "train/loss", "run/train_seconds"} <= logged.keys()
    assert load_config(out / "config.yaml").method == "better_together"

    base, _ = load_model(str(tiny_dir), device="cpu")
    model = PeftModel.from_pretrained(base, out / "adapter")
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # two SFT steps moved the adapter off zero

"""The RL baselines of the paper's table on tiny models: GRPO (its PPO row), BPO-like and RLPrompt-like."""

from __future__ import annotations

import contextlib
import json
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from metatuner.baselines import bpo as bpo_module
from metatuner.baselines import grpo as grpo_module
from metatuner.baselines import rlprompt as rlprompt_module
from metatuner.baselines.bpo import choose_better_prompt, rewrite_candidates, train_bpo
from metatuner.baselines.grpo import TaskReward, train_grpo
from metatuner.baselines.prompt_writer import build_prompt_writer, prompt_writer_config
from metatuner.baselines.rlprompt import advantages, reinforce_step, train_rlprompt
from metatuner.config import ConfigError, load_config
from metatuner.generation import lm_batch, sequence_logprobs, score_targets, task_chats
from metatuner.model import MetaTuner
from metatuner.models import load_model
from metatuner.tasks import get_task
from metatuner.testing import pretend_earlier_sittings_took, tensorboard_scalars
from metatuner.trainer import TrainingStopped

CHAIN_SUM = ["data.task=rg:chain_sum", "data.task_options={size: 8, test_size: 4}"]
SMALL = ["model.device=cpu", "train.mixed_precision=fp32", "train.batch_size=4", "eval.max_new_tokens=4",
         "eval.batch_size=16", "lora.r=4", "lora.alpha=8", "metatuner.g_lora_r=4", "metatuner.max_prompt_tokens=6"]


@pytest.fixture(scope="module")
def tiny_dir(tiny_dir_2layers):
    return tiny_dir_2layers


def _init_adapter(tiny_dir, path):
    """A non-trivial PEFT adapter (B not zero), as a trained SFT adapter would be."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(std=0.5)
    model.save_pretrained(path)
    return path


# ----- GRPO ---------------------------------------------------------------------------------------------------------

def test_task_reward_is_the_task_checker_on_the_answer_cut_at_the_stop_strings(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1 + 1", "answer": "2"}) + "\n")
    task = get_task("custom", path=str(path), metric="numeric", stop_strings=["\n\nQuestion:"])
    ex = task.load("train")[0]
    reward = TaskReward(task, [ex])
    completions = [[{"role": "assistant", "content": "The answer is 2."}], "3",
                   "2\n\nQuestion: 3 + 4\n5"]  # cut at the stop string: "2" (the whole text's last number is 5)
    assert reward(prompts=[None] * 3, completions=completions, id=[ex.id] * 3) == [1.0, 0.0, 1.0]
    assert task.reward("2\n\nQuestion: 3 + 4\n5", ex) == 0.0  # so the cut is what made the third right


def _grpo_config(tiny_dir, tmp_path, *extra):
    # "contains e": a random tiny model's answers sometimes hold an "e", so groups have rewards that differ.
    rows = [{"question": f"{i} + {i}", "answer": "e"} for i in range(6)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(None, [
        "method=grpo", f"model.name={tiny_dir}", f"output_dir={tmp_path / 'run'}", *SMALL, "data.task=custom",
        f"data.task_options={{path: {path}, metric: contains}}", "train.batch_size=2", "train.max_steps=2",
        "train.log_every=1", "eval.max_new_tokens=8", "lora.target_modules=[q_proj,v_proj]", "grpo.num_generations=4",
        "grpo.lr=5e-2", *extra])


def test_grpo_trains_the_start_adapter_with_the_task_checker_as_reward(tiny_dir, tmp_path, monkeypatch):
    built = []

    class Recording(grpo_module.GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(grpo_module, "GRPOTrainer", Recording)
    init = _init_adapter(tiny_dir, tmp_path / "init")
    cfg = _grpo_config(tiny_dir, tmp_path, f"grpo.init_adapter={init}")
    out = train_grpo(cfg)

    (trainer,) = built
    (reward,) = trainer.reward_funcs
    assert isinstance(reward, TaskReward) and reward.task.name == "custom"
    assert set(reward.examples) == {ex.id for ex in get_task("custom", **cfg.data.task_options).load("train")}
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["method"] == "grpo" and metrics["steps"] == 2
    assert metrics["train_examples"] == 2 * 2 and metrics["completions"] == 2 * 2 * 4
    assert {"train_seconds", "peak_rss_mb", "precision", "command"} <= set(metrics)
    assert len(metrics["history"]["train/reward"]) == 2  # one per logging interval (train.log_every=1)
    assert any(r > 0 for r in metrics["history"]["train/reward"]), "no answer was rewarded: nothing to learn from"
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    start = load_file(init / "adapter_model.safetensors")
    assert saved.keys() == start.keys()  # the trained adapter only, not TRL's frozen reference copy
    assert any(not torch.equal(saved[k], start[k]) for k in saved)
    assert [step for step, _ in tensorboard_scalars(out / "tb")["train/reward"]] == [1, 2]  # TRL's logs in tb/


@pytest.mark.fault
def test_fault_grpo_stopped_by_sigterm_saves_and_resumes_to_the_end(tiny_dir, tmp_path, monkeypatch):
    calls = []
    checker = TaskReward.__call__

    def reward_then_sigterm(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:  # during the first step: the step finishes, a checkpoint is written, training stops
            os.kill(os.getpid(), signal.SIGTERM)
        return checker(self, *args, **kwargs)

    monkeypatch.setattr(TaskReward, "__call__", reward_then_sigterm)
    cfg = _grpo_config(tiny_dir, tmp_path, "grpo.beta=0")
    with pytest.raises(TrainingStopped, match="after step 1") as stopped:
        train_grpo(cfg)
    assert stopped.value.exit_code == 128 + signal.SIGTERM
    assert (tmp_path / "run" / "trainer" / "checkpoint-1").is_dir()
    assert not (tmp_path / "run" / "adapter").exists()
    pretend_earlier_sittings_took(tmp_path / "run" / "trainer" / "checkpoint-1", 1000.0)
    out = train_grpo(_grpo_config(tiny_dir, tmp_path, "grpo.beta=0", "train.resume=auto"))
    assert len(calls) == 2  # the resumed run generated (and was rewarded) for step 2 only
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 2 and len(metrics["history"]["train/reward"]) == 2  # step 1's log came with it
    assert 1000 < metrics["train_seconds"] < 1000 + 600  # both sittings: the checkpoint carried the first one's


@pytest.mark.fault
def test_fault_grpo_resumed_with_save_every_saves_at_its_interval(tiny_dir, tmp_path, monkeypatch):
    """A run started without train.save_every, stopped and resumed with it: transformers restores the checkpoint's
    save interval (500) with its state, so the resumed run saved nothing before its end."""
    calls = []
    checker = TaskReward.__call__

    def reward_then_sigterm(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return checker(self, *args, **kwargs)

    monkeypatch.setattr(TaskReward, "__call__", reward_then_sigterm)
    with pytest.raises(TrainingStopped):
        train_grpo(_grpo_config(tiny_dir, tmp_path, "grpo.beta=0", "train.max_steps=4"))
    monkeypatch.setattr(TaskReward, "__call__", checker)
    saved = []
    monkeypatch.setattr(grpo_module.GRPOTrainer, "_save_checkpoint",
                        lambda self, *a, **k: saved.append(self.state.global_step))
    train_grpo(_grpo_config(tiny_dir, tmp_path, "grpo.beta=0", "train.max_steps=4", "train.resume=auto",
                            "train.save_every=1"))
    assert saved == [2, 3, 4]


# ----- BPO ----------------------------------------------------------------------------------------------------------

def test_bpo_pairs_only_hold_prompts_that_beat_p0():
    # exact_match scores are (checker, likelihood): the checker decides against p0, likelihood only among samples
    assert choose_better_prompt((0.0, -1.0), ["a", "b", "c"], [(0.0, -0.5), (1.0, -3.0), (1.0, -2.0)]) == (
        "c", (1.0, -2.0))
    assert choose_better_prompt((0.0, -1.0), ["a"], [(0.0, -0.5)]) is None  # a likelihood-only win is no win
    assert choose_better_prompt((1.0, -1.0), ["a"], [(1.0, -0.1)]) is None
    assert choose_better_prompt(-1.0, ["a", "b"], [-2.0, -0.5]) == ("b", -0.5)  # likelihood reward
    assert choose_better_prompt(-1.0, ["a"], [-1.0]) is None  # a tie keeps p0
    assert choose_better_prompt(-1.0, [], []) is None


def test_bpo_candidates_drop_p0_duplicates_empties_and_answer_leaks(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1 + 1", "answer": "2"}) + "\n")
    task = get_task("custom", path=str(path), metric="numeric")
    ex = task.load("train")[0]
    sampled = ["p0", "Add them.", "", "Add them.", "The answer is 2.", "Think.", "1 + 1 makes 2; say so.", "Add 1 and 1."]
    assert rewrite_candidates(task, ex, sampled, "p0", reject_leaks=True) == (["Add them.", "Think.", "Add 1 and 1."], 2)
    assert rewrite_candidates(task, ex, sampled, "p0", reject_leaks=False) == (
        ["Add them.", "The answer is 2.", "Think.", "1 + 1 makes 2; say so.", "Add 1 and 1."], 0)


def _likelihood(model, tokenizer, task, ex, prompt):
    (total, count), = score_targets(model, tokenizer, task_chats(tokenizer, task, [prompt], [ex]), [ex.target])
    return total / count


def test_bpo_trains_g_on_prompts_that_beat_p0_under_the_frozen_m(tiny_dir, tmp_path):
    init = _init_adapter(tiny_dir, tmp_path / "sft")
    cfg = load_config(None, ["method=bpo", f"model.name={tiny_dir}", f"output_dir={tmp_path / 'bpo'}", *CHAIN_SUM,
                             *SMALL, "bpo.reward=likelihood", "bpo.samples_per_query=3", "bpo.epochs=2",
                             "bpo.lr=1e-2", f"bpo.actor_adapter={init}"])
    out = train_bpo(cfg)
    pairs = [json.loads(line) for line in (out / "pairs.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert pairs and metrics["pairs"] == len(pairs) and metrics["steps"] == len(metrics["history"]["train/sr_loss"])
    assert [v for _, v in tensorboard_scalars(out / "tb")["train/sr_loss"]] == pytest.approx(
        metrics["history"]["train/sr_loss"])

    # Recomputed independently with M = base + the frozen adapter: every pair's prompt beats p0 on its query.
    from peft import PeftModel

    task = get_task("rg:chain_sum", size=8, test_size=4)
    examples = {ex.id: ex for ex in task.load("train")}
    base, tokenizer = load_model(str(tiny_dir), device="cpu")
    m = PeftModel.from_pretrained(base, init).eval()
    for pair in pairs:
        ex = examples[pair["id"]]
        assert pair["prompt"] != task.default_prompt
        assert _likelihood(m, tokenizer, task, ex, pair["prompt"]) > _likelihood(m, tokenizer, task, ex,
                                                                                  task.default_prompt)

    # The run folder is MetaTuner's prompt branch alone: G trained, M's adapter the frozen one it was given.
    mt = MetaTuner.from_pretrained(out)
    assert not mt.settings.use_hyper and mt.actor_adapter is not None
    state = load_file(out / "model" / "metatuner.safetensors")
    assert any(t.abs().sum() > 0 for k, t in state.items() if ".prompt." in k and "lora_B" in k)  # G moved off zero
    for key, tensor in state.items():  # test prompts are written with the frozen twin: it must be the trained one
        if ".prompt." in key:
            assert torch.equal(state[key.replace(".prompt.", ".prompt_frozen.")], tensor)
    start = load_file(init / "adapter_model.safetensors")
    frozen = {k: t for k, t in state.items() if ".actor." in k}
    assert len(frozen) == len(start)
    for key, tensor in start.items():  # M's adapter, saved beside G's, is the given one unchanged
        module = key.split("base_model.model.", 1)[1].rsplit(".weight", 1)[0]
        assert torch.equal(frozen[f"g.base_model.model.{module}.actor.weight"], tensor)
    written = mt.evaluate(task.load("test"), batch_size=4, max_new_tokens=4, progress=False)
    assert written.metrics["n_eval"] == 4 and "diagnostics" in written.metrics


@pytest.mark.fault
def test_fault_bpo_rollouts_cut_short_resume_to_the_pairs_of_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch):
    """Eight queries in batches of four: a run killed after its first batch resumes with the second (the first is
    not sampled again) and ends with the pairs and counts of a run that was never stopped."""
    def config(out, *extra):
        return load_config(None, ["method=bpo", f"model.name={tiny_dir}", f"output_dir={out}", *CHAIN_SUM, *SMALL,
                                  "bpo.reward=likelihood", "bpo.samples_per_query=3", "bpo.epochs=1", *extra])

    whole = train_bpo(config(tmp_path / "whole"))
    batches = []
    real = bpo_module.better_prompt_pairs

    def killed_after_one_batch(mt, task, rows, *args):
        if len(batches) == 1:
            raise KeyboardInterrupt
        batches.append([ex.id for ex in rows])
        return real(mt, task, rows, *args)

    monkeypatch.setattr(bpo_module, "better_prompt_pairs", killed_after_one_batch)
    with pytest.raises(KeyboardInterrupt):
        train_bpo(config(tmp_path / "cut"))
    monkeypatch.setattr(bpo_module, "better_prompt_pairs",
                        lambda mt, task, rows, *a: batches.append([ex.id for ex in rows]) or real(mt, task, rows, *a))
    resumed = train_bpo(config(tmp_path / "cut", "train.resume=auto"))
    assert len(batches) == 2 and not set(batches[0]) & set(batches[1])
    assert (resumed / "pairs.jsonl").read_text() == (whole / "pairs.jsonl").read_text() != ""
    counted = ("pairs", "candidates_scored", "sampled_prompts", "answer_leaks")
    metrics = [json.loads((out / "train_metrics.json").read_text()) for out in (whole, resumed)]
    assert [metrics[0][k] for k in counted] == [metrics[1][k] for k in counted]
    with pytest.raises(ValueError, match=r"pairs\.progress\.json.*bpo\.temperature"):
        train_bpo(config(tmp_path / "cut", "train.resume=auto", "bpo.temperature=0.5"))


def test_bpo_without_pairs_says_what_to_change(tiny_dir, tmp_path):
    cfg = load_config(None, ["method=bpo", f"model.name={tiny_dir}", f"output_dir={tmp_path / 'bpo'}", *CHAIN_SUM,
                             *SMALL, "bpo.samples_per_query=1"])  # a random model answers nothing right: no pair
    with pytest.raises(ValueError, match="bpo.reward=likelihood"):
        train_bpo(cfg)


# ----- RLPrompt -----------------------------------------------------------------------------------------------------

def test_advantages_are_centred_and_scaled_and_zero_on_ties():
    assert advantages([1.0, 0.0], "zscore") == [1.0, -1.0]
    assert advantages([3.0, 1.0, 2.0], "mean") == [1.0, -1.0, 0.0]
    assert advantages([0.5, 0.5, 0.5], "zscore") == [0.0, 0.0, 0.0]


def test_reinforce_raises_the_probability_of_the_rewarded_prompt(tiny_dir):
    cfg = prompt_writer_config(load_config(None, ["method=rlprompt", f"model.name={tiny_dir}", *SMALL]))
    mt = build_prompt_writer(cfg, "cpu")
    request = mt.rewrite_requests(["Solve it."], ["1 + 2"])[0]
    prompts = ["Add the numbers.", "The answer is"]

    def logprobs():
        with torch.no_grad(), mt.role("learner"):
            sums, _ = sequence_logprobs(mt.g, lm_batch(mt.g_tok, [request] * 2, prompts, 512))
        return sums.tolist()

    before = logprobs()
    optimizer = torch.optim.AdamW(mt.generator_parameters(), lr=1e-2)
    for _ in range(3):  # a toy reward: the first prompt earns 1, the second 0
        loss = reinforce_step(mt, request, prompts, advantages([1.0, 0.0], "zscore"), optimizer, 1.0,
                              contextlib.nullcontext)
        assert loss != 0.0
    after = logprobs()
    assert after[0] > before[0] + 0.1 and after[1] < before[1] - 0.1
    # Tied rewards give no update at all.
    assert reinforce_step(mt, request, prompts, advantages([1.0, 1.0], "zscore"), optimizer, 1.0,
                          contextlib.nullcontext) == 0
    assert logprobs() == after


def test_rlprompt_keeps_the_dev_argmax_and_records_its_search(tiny_dir, tmp_path, monkeypatch):
    """With M's scores replaced by a toy reward (longer prompts score higher), the kept prompt is the dev argmax
    over p0, the best sampled prompts and the greedy one, and p0 survives when nothing beats it."""
    def toy(mt, task, examples, prompts, reward, batch_size):
        return [float(len(p)) for p in prompts]

    monkeypatch.setattr(rlprompt_module, "prompt_rewards", toy)
    cfg = load_config(None, ["method=rlprompt", f"model.name={tiny_dir}", f"output_dir={tmp_path / 'rl'}",
                             *CHAIN_SUM, *SMALL, "train.max_steps=3", "rlprompt.dev_size=3",
                             "rlprompt.samples_per_step=3", "rlprompt.finalists=2", "rlprompt.reward=likelihood"])
    out = train_rlprompt(cfg)
    search = json.loads((out / "search.json").read_text())
    samples = [h for h in search["history"] if h["source"] == "sample"]
    finals = [h for h in search["history"] if h.get("dev")]
    assert [h["round"] for h in samples] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert finals[0]["instruction"] == search["p0"] and len(search["dev_ids"]) == 3
    assert search["best"] == max(finals, key=lambda h: (h["score"], -finals.index(h)))["instruction"]
    assert search["best_score"] == max(len(h["instruction"]) for h in finals) >= search["p0_score"]
    assert (out / "best_prompt.txt").read_text().strip() == search["best"].strip()
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 3 and len(metrics["history"]["train/reward_mean"]) == 3
    assert [step for step, _ in tensorboard_scalars(out / "tb")["train/reward_mean"]] == [1, 2, 3]
    assert metrics["train_examples"] == 3 * 4 * 3 + 3 * len(finals)  # (steps x batch x samples) + dev x finalists


@pytest.mark.fault
def test_fault_rlprompt_killed_mid_run_resumes_to_the_search_of_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch):
    """Checkpoints every step: a run killed in its third step resumes from the second and ends with the sampled
    prompts, rewards, policy and final prompt of a run that was never stopped."""
    def config(out, *extra):
        return load_config(None, ["method=rlprompt", f"model.name={tiny_dir}", f"output_dir={out}", *CHAIN_SUM,
                                  *SMALL, "train.max_steps=4", "train.save_every=1", "rlprompt.dev_size=3",
                                  "rlprompt.samples_per_step=3", "rlprompt.reward=likelihood", *extra])

    whole = train_rlprompt(config(tmp_path / "whole"))
    steps = []
    real = rlprompt_module.reinforce_step

    def killed_in_step_3(*args):
        steps.append(1)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(rlprompt_module, "reinforce_step", killed_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_rlprompt(config(tmp_path / "cut"))
    monkeypatch.setattr(rlprompt_module, "reinforce_step", lambda *a: steps.append(1) or real(*a))
    resumed = train_rlprompt(config(tmp_path / "cut", "train.resume=auto"))
    assert len(steps) == 3 + 2  # steps 3 and 4 again, not 1 and 2
    searches = [json.loads((out / "search.json").read_text()) for out in (whole, resumed)]
    for search in searches:
        search.pop("seconds")
    assert searches[0] == searches[1]
    weights = [load_file(out / "checkpoints" / "step-00000003" / "weights.safetensors") for out in (whole, resumed)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.bad_input
@pytest.mark.parametrize("override, key", [
    ("grpo.num_generations=1", "grpo.num_generations"), ("grpo.loss_type=ppo", "grpo.loss_type"),
    ("bpo.reward=bleu", "bpo.reward"), ("bpo.epochs=0", "bpo.epochs"),
    ("rlprompt.samples_per_step=1", "rlprompt.samples_per_step"), ("rlprompt.advantage=none", "rlprompt.advantage"),
    ("rlprompt.request_template=write", "rlprompt.request_template")])
def test_bad_input_rl_baseline_settings_name_their_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.bad_input
def test_bad_input_missing_adapters_are_named_before_models_load(tmp_path):
    missing = tmp_path / "nothing"
    with pytest.raises(FileNotFoundError, match="grpo.init_adapter"):
        train_grpo(load_config(None, ["method=grpo", f"grpo.init_adapter={missing}", f"output_dir={tmp_path}/g"]))
    with pytest.raises(FileNotFoundError, match="bpo.actor_adapter"):
        train_bpo(load_config(None, ["method=bpo", f"bpo.actor_adapter={missing}", f"output_dir={tmp_path}/b"]))


# ----- in the comparison --------------------------------------------------------------------------------------------

def test_compare_runs_the_rl_baselines_into_the_table_with_their_intervals_and_budgets(tiny_dir, tmp_path):
    import yaml

    from metatuner.compare import compare

    base = {"model": {"name": str(tiny_dir), "device": "cpu"},
            "data": {"task": "rg:chain_sum", "task_options": {"size": 8, "test_size": 6}},
            "train": {"batch_size": 4, "max_steps": 2, "mixed_precision": "fp32"},
            "eval": {"batch_size": 8, "max_new_tokens": 4},
            "lora": {"r": 4, "alpha": 8},
            "metatuner": {"share_depth": 1, "rank": 4, "hyper_hidden": 32, "g_lora_r": 4, "max_prompt_tokens": 4,
                          "n_rollouts": 2, "warmup_generator": False},
            "grpo": {"num_generations": 2}, "bpo": {"reward": "likelihood", "samples_per_query": 2, "epochs": 1},
            "rlprompt": {"dev_size": 2, "samples_per_step": 2, "max_prompt_tokens": 4}}
    methods = {name: {} for name in ("sft", "metatuner_j", "grpo", "bpo", "bpo_zero_shot", "rlprompt")}
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump({"name": "toy", "results_dir": str(tmp_path / "results"),
                                    "runs_dir": str(tmp_path / "runs"), "base": base, "methods": methods}))
    results = compare(path)
    rows = results["methods"]
    assert set(rows) == set(methods)
    for name in ("grpo", "bpo", "bpo_zero_shot", "rlprompt"):
        row = rows[name]
        assert row["n_eval"] == 6 and len(row["ci_vs_metatuner_j"]) == 2
        assert row["train_seconds"] > 0 and row["eval_seconds"] > 0 and row["peak_rss_mb"] > 0
        assert row["train_command"] and row["eval_command"]
    sft_examples = rows["sft"]["train_examples"]
    for name in ("grpo", "bpo"):  # they start from (grpo) or answer with (bpo) the SFT run's adapter: its budget
        assert rows[name]["warmup_train_examples"] == sft_examples
    for name in ("bpo_zero_shot", "rlprompt"):
        assert "warmup_train_examples" not in rows[name]
    runs = tmp_path / "runs"
    configs = {name: load_config(runs / name / "config.yaml") for name in ("grpo", "bpo", "bpo_zero_shot")}
    assert configs["grpo"].grpo.init_adapter == str(runs / "sft" / "adapter")
    assert configs["bpo"].bpo.actor_adapter == str(runs / "sft" / "adapter")
    assert configs["bpo_zero_shot"].method == "bpo" and configs["bpo_zero_shot"].bpo.actor_adapter is None
    assert "diagnostics" in rows["bpo"] and "diagnostics" in rows["bpo_zero_shot"]  # G's written prompts
    best = (runs / "rlprompt" / "best_prompt.txt").read_text().strip()
    assert json.loads((runs / "rlprompt" / "eval" / "samples.jsonl").read_text().splitlines()[0])["prompt"] == best
    assert (tmp_path / "results" / "toy.md").read_text().count("| bpo") == 2

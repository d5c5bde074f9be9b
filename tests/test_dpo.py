"""The DPO baseline: pairs from the policy's own samples or option ranking, and TRL training from an adapter."""

from __future__ import annotations

import json
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file

from metatuner.baselines import dpo as dpo_module
from metatuner.baselines.dpo import pair_from_choices, pair_from_samples, train_dpo
from metatuner.config import load_config
from metatuner.tasks import get_task
from metatuner.tasks.base import Example
from metatuner.testing import pretend_earlier_sittings_took, tensorboard_scalars
from metatuner.trainer import TrainingStopped


@pytest.fixture()
def numeric_task(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "1 + 1", "answer": "2"}) + "\n")
    return get_task("custom", path=str(path), metric="numeric")


def test_pair_from_samples_takes_best_and_worst_and_drops_ties(numeric_task):
    ex = Example(id="0", question="1 + 1", answer="2", target="2")
    pair = pair_from_samples(numeric_task, ex, ["3", "2", "5"], gold_fallback=False)
    assert (pair["chosen"], pair["chosen_reward"], pair["rejected_reward"]) == ("2", 1.0, 0.0)
    assert pair["rejected"] in ("3", "5")
    assert pair_from_samples(numeric_task, ex, ["3", "4"], gold_fallback=False) is None
    assert pair_from_samples(numeric_task, ex, ["2", "2"], gold_fallback=True) is None  # gold is no better
    fallback = pair_from_samples(numeric_task, ex, ["3", "4"], gold_fallback=True)
    assert fallback["chosen"] == "2" and fallback["rejected"] in ("3", "4")


def test_pair_from_choices_rejects_the_best_ranked_wrong_option():
    task = get_task("cosmosqa")
    ex = Example(id="0", question="q", answer="B", target="The answer is B.")
    options = task.choice_targets(ex)
    # (sum log-prob, tokens): C has the best mean among the wrong options although A has the best sum
    pair = pair_from_choices(task, ex, options, [(-4.0, 2), (-9.0, 3), (-3.0, 2), (-8.0, 2)])
    assert (pair["chosen"], pair["rejected"]) == ("The answer is B.", "The answer is C.")


def _config(tiny_dir, tmp_path, *extra):
    rows = [{"question": f"{i} + {i}", "answer": str(2 * i)} for i in range(6)]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_config(None, [
        "method=dpo", f"model.name={tiny_dir}", "model.device=cpu", f"output_dir={tmp_path / 'run'}",
        "data.task=custom", f"data.task_options={{path: {path}}}", "train.batch_size=2", "train.max_steps=2",
        "train.max_length=64", "train.mixed_precision=fp32", "train.log_every=1", "eval.max_new_tokens=4",
        "lora.target_modules=[q_proj,v_proj]", "dpo.samples_per_question=2", "dpo.gold_fallback=true", "dpo.lr=1e-2",
        *extra])


def test_dpo_trains_from_an_adapter_that_is_also_its_reference(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    init = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    torch.manual_seed(1)
    for name, param in init.named_parameters():
        if "lora_B" in name:  # a non-trivial start: the adapted model differs from the base model
            param.data.normal_(std=0.5)
    init.save_pretrained(tmp_path / "init")

    out = train_dpo(_config(tiny_dir, tmp_path, f"dpo.init_adapter={tmp_path / 'init'}"))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["pairs"] == len((out / "pairs.jsonl").read_text().splitlines()) > 0
    # At the first step the policy is the reference (the initial adapter, not the base model): loss = ln 2.
    assert metrics["history"]["train/loss"][0] == pytest.approx(math.log(2), abs=1e-4)
    # TRL's logs (train.log_every=1, two steps) reach the run's TensorBoard folder, as SFT's and MetaTuner's do.
    logged = tensorboard_scalars(out / "tb")
    assert [step for step, _ in logged["train/loss"]] == [1, 2] and len(metrics["history"]["train/loss"]) == 2
    assert [v for _, v in logged["train/loss"]] == pytest.approx(metrics["history"]["train/loss"], abs=1e-6)
    assert {"train/rewards/accuracies", "train/learning_rate", "run/train_seconds"} <= logged.keys()
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    start = load_file(tmp_path / "init" / "adapter_model.safetensors")
    assert saved.keys() == start.keys()  # only the trained adapter, not TRL's frozen reference copy
    assert any(not torch.equal(saved[k], start[k]) for k in saved)


def test_dpo_without_pairs_says_what_to_change(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="dpo.gold_fallback"):
        train_dpo(_config(tiny_dir, tmp_path, "dpo.gold_fallback=false", "dpo.temperature=1e-4"))


@pytest.mark.fault
def test_fault_dpo_sampling_cut_short_resumes_to_the_pairs_of_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch):
    """Six questions in chunks of two, each chunk under its own seed: a run killed after its first chunk resumes
    with the second and ends with the pairs of a run that was never stopped."""
    chunks = ["eval.batch_size=2", "train.max_steps=1"]
    whole = train_dpo(_config(tiny_dir, tmp_path, *chunks, f"output_dir={tmp_path / 'whole'}"))
    sampled = []
    real = dpo_module.preference_pairs

    def killed_after_one_chunk(*args, **kwargs):
        if len(sampled) == 1:
            raise KeyboardInterrupt  # what the process sees of a kill, between two chunks
        sampled.append(args[3])
        return real(*args, **kwargs)

    monkeypatch.setattr(dpo_module, "preference_pairs", killed_after_one_chunk)
    with pytest.raises(KeyboardInterrupt):
        train_dpo(_config(tiny_dir, tmp_path, *chunks))
    assert json.loads((tmp_path / "run" / "pairs.progress.json").read_text())["questions"] == 2
    monkeypatch.setattr(dpo_module, "preference_pairs", lambda *a, **k: sampled.append(a[3]) or real(*a, **k))
    resumed = train_dpo(_config(tiny_dir, tmp_path, *chunks, "train.resume=auto"))
    assert [[ex.id for ex in chunk] for chunk in sampled] == [["train-0", "train-1"], ["train-2", "train-3"], ["train-4", "train-5"]]
    assert (resumed / "pairs.jsonl").read_text() == (whole / "pairs.jsonl").read_text() != ""


@pytest.mark.fault
def test_fault_dpo_stopped_by_sigterm_in_training_resumes_and_counts_both_sittings(tiny_dir, tmp_path, monkeypatch):
    real = dpo_module.DPOTrainer.compute_loss
    steps = []

    def loss_then_sigterm(self, *args, **kwargs):
        steps.append(1)
        if len(steps) == 1:  # the step finishes, a checkpoint is written, training stops
            os.kill(os.getpid(), signal.SIGTERM)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(dpo_module.DPOTrainer, "compute_loss", loss_then_sigterm)
    with pytest.raises(TrainingStopped, match="after step 1"):
        train_dpo(_config(tiny_dir, tmp_path, "train.save_every=1"))
    checkpoint = tmp_path / "run" / "trainer" / "checkpoint-1"
    pretend_earlier_sittings_took(checkpoint, 1000.0)
    monkeypatch.setattr(dpo_module, "preference_pairs", lambda *a, **k: pytest.fail("the pairs were sampled again"))
    out = train_dpo(_config(tiny_dir, tmp_path, "train.save_every=1", "train.resume=auto"))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["steps"] == 2 and len(steps) == 2  # the resumed run trained step 2 only
    assert 1000 < metrics["train_seconds"] < 1000 + 600


@pytest.mark.bad_input
def test_bad_input_dpo_resumed_with_other_sampling_settings_names_the_file_and_setting(tiny_dir, tmp_path):
    train_dpo(_config(tiny_dir, tmp_path, "train.max_steps=1"))
    with pytest.raises(ValueError, match=r"pairs\.progress\.json.*temperature"):
        train_dpo(_config(tiny_dir, tmp_path, "train.max_steps=1", "train.resume=auto", "dpo.temperature=0.5"))

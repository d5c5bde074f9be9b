"""End-to-end MetaTuner training on a tiny model: the loss trajectory, outputs, reload, inference and export."""

import json

import pytest
import torch
from typer.testing import CliRunner

from metatuner.cli import app
from metatuner.config import load_config
from metatuner.model import MetaTuner
from metatuner.train import train_metatuner




def _cfg(tiny_dir, out, *extra, task="rg:chain_sum", task_options="{size: 4, test_size: 4}"):
    return load_config(None, [
        f"model.name={tiny_dir}", "model.device=cpu", f"output_dir={out}",
        f"data.task={task}", f"data.task_options={task_options}",
        "train.batch_size=4", "train.max_steps=16", "train.warmup_ratio=0", "train.mixed_precision=fp32",
        "metatuner.share_depth=2", "metatuner.rank=4", "metatuner.hyper_hidden=32", "metatuner.g_lora_r=4",
        "metatuner.max_prompt_tokens=4", "metatuner.n_rollouts=2", "metatuner.lr_hyper=1e-2",
        "metatuner.lr_generator=1e-2", "metatuner.sync_every=4", "metatuner.rollout_every=100",
        "eval.batch_size=8", *extra,
    ])


def test_short_j_run_lowers_both_losses_and_writes_a_run_folder(tiny_dir, tmp_path):
    torch.manual_seed(0)
    out = train_metatuner(_cfg(tiny_dir, tmp_path / "run"))
    metrics = json.loads((out / "train_metrics.json").read_text())
    task, sr = metrics["history"]["train/task_loss"], metrics["history"]["train/sr_loss"]
    assert len(task) == 16 and len(sr) == 16
    assert metrics["precision"]["setting"] == "fp32" and metrics["precision"]["mixed_precision"] == "no"
    # Measured on this seed: task 5.92 -> 5.64, SR 5.79 -> 5.5 (means of the first and last four steps).
    assert sum(task[-4:]) / 4 < sum(task[:4]) / 4 - 0.1
    assert sum(sr[-4:]) / 4 < sum(sr[:4]) / 4 - 0.1
    for name in ("config.yaml", "model/metatuner.safetensors", "model/expert_prompts.json"):
        assert (out / name).is_file()
    assert list((out / "tb").rglob("events.*"))


def _record_phases(monkeypatch) -> list[str]:
    """The order in which training steps compute the task loss, run rollouts and compute the SR loss."""
    from metatuner import train

    events = []
    for name, event in (("task_loss", "task"), ("sr_loss", "sr")):
        original = getattr(MetaTuner, name)
        monkeypatch.setattr(MetaTuner, name, lambda self, *a, _f=original, _e=event, **k: (events.append(_e),
                                                                                           _f(self, *a, **k))[1])
    original_rollouts = train.run_rollouts
    monkeypatch.setattr(train, "run_rollouts", lambda *a, **k: (events.append("rollouts"), original_rollouts(*a, **k))[1])
    return events


def test_interleaved_schedule_alternates_the_losses(tiny_dir, tmp_path, monkeypatch):
    """Schedule I with blocks of 2: steps 1-2 train the task loss only, steps 3-4 the SR loss only. Fails on an
    off-by-one block index (steps 1 / 2-3 / 4) or a schedule that trains both, which the old check of two losses
    of each kind could not tell apart."""
    events = _record_phases(monkeypatch)
    out = train_metatuner(_cfg(tiny_dir, tmp_path / "run", "metatuner.schedule=I", "train.max_steps=4",
                               "metatuner.interleave_block=2", "metatuner.warmup_generator=false",
                               "train.log_every=1"))
    assert events == ["task", "task", "rollouts", "sr", "sr"]  # rollouts on the first SR step (rollout_every=100)
    history = json.loads((out / "train_metrics.json").read_text())["history"]
    assert len(history["train/task_loss"]) == 2 and len(history["train/sr_loss"]) == 2


def test_trained_run_reloads_infers_and_exports(tiny_dir, tmp_path):
    out = train_metatuner(_cfg(tiny_dir, tmp_path / "run", "train.max_steps=2", "metatuner.warmup_actor_steps=2"))
    mt = MetaTuner.from_pretrained(out)
    first = mt.generate(["1 + 2 ="], max_new_tokens=4)
    assert first == MetaTuner.from_pretrained(out).generate(["1 + 2 ="], max_new_tokens=4)
    assert set(first[0]) == {"question", "prompt", "answer"}

    runner = CliRunner()
    result = runner.invoke(app, ["eval", "--run", str(out), "--limit", "4", "--out", str(tmp_path / "ev"),
                                 "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["n_eval"] == 4
    # The same run with M under p0 (G only encodes): every prompt is p0, the per-query LoRA still applies.
    result = runner.invoke(app, ["eval", "--run", str(out), "--limit", "4", "--out", str(tmp_path / "ev-p0"),
                                 "--max-new-tokens", "4", "--without-prompts"])
    assert result.exit_code == 0, result.output
    p0_eval = json.loads((tmp_path / "ev-p0" / "metrics.json").read_text())
    assert p0_eval["diagnostics"]["p0_share"] == 1.0 and p0_eval["written_prompts"] is False
    assert p0_eval["diagnostics"]["lora_diversity"]["queries"] == 4

    result = runner.invoke(app, ["export", "--run", str(out), "--query", "1 + 2 =", "--out", str(tmp_path / "ad")])
    assert result.exit_code == 0, result.output

    # The exported adapter (per-query LoRA folded with M's warm-up adapter) reproduces the actor's logits.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from metatuner.generation import chat_prompt, score_targets
    prompt = (tmp_path / "ad" / "metatuner_prompt.txt").read_text().rstrip("\n")
    chat = chat_prompt(mt.m_tok, mt.task.messages(prompt, mt.task.load("test")[0].__class__(
        id="q", question="1 + 2 =", answer="", target="")))
    _, h = mt.write_all(["1 + 2 ="])
    ours = mt.score([chat], ["The answer is 3."], mt.hyper(h))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_dir), tmp_path / "ad").eval()
    theirs = score_targets(peft_model, mt.m_tok, [chat], ["The answer is 3."])
    assert abs(ours[0][0] - theirs[0][0]) < 1e-3
    # The model card says how to build that same input: its messages are the ones the actor was given.
    card = (tmp_path / "ad" / "README.md").read_text()
    messages = mt.task.messages(prompt, mt.task.load("test")[0].__class__(id="q", question="1 + 2 =", answer="",
                                                                          target=""))
    assert json.dumps(messages, ensure_ascii=False) in card and "1 + 2 =" in card and f"rank {mt.hyper_config.r + 16}" in card
    assert "base_model:" in card and "MetaTuner 0.1.0" in card


@pytest.mark.parametrize("ablation,trained,absent", [
    ("metatuner.use_hyper=false", "train/sr_loss", "train/task_loss"),   # prompt only (without F)
    ("metatuner.use_prompt=false", "train/task_loss", "train/sr_loss"),  # parameters only (without P)
    ("metatuner.prompt_objective=gumbel", "train/task_loss", "train/sr_loss"),  # Gumbel-softmax for SR
])
def test_ablations_train_only_their_branch_and_evaluate(tiny_dir, tmp_path, ablation, trained, absent):
    out = train_metatuner(_cfg(tiny_dir, tmp_path / "run", "train.max_steps=2", "metatuner.rollout_every=1", ablation))
    history = json.loads((out / "train_metrics.json").read_text())["history"]
    assert len(history[trained]) == 2 and absent not in history
    mt = MetaTuner.from_pretrained(out)
    result = mt.evaluate(mt.task.load("test", limit=2), max_new_tokens=4, progress=False)
    assert result.metrics["n_eval"] == 2
    if ablation.startswith("metatuner.use_prompt"):
        assert {s["prompt"] for s in result.samples} == {mt.p0}


def test_frozen_prompt_decoder_changes_only_at_sync_steps_in_the_loop(tiny_dir, tmp_path):
    from metatuner.checkpoint import load_checkpoint

    out = train_metatuner(_cfg(tiny_dir, tmp_path / "run", "train.max_steps=5", "train.save_every=1",
                               "train.keep_checkpoints=10", "metatuner.sync_every=3"))
    frozen, trained = [], []
    for step in range(1, 5):
        tensors = load_checkpoint(out / "checkpoints" / f"step-{step:08d}").tensors
        frozen.append({k: v for k, v in tensors.items() if ".prompt_frozen." in k})
        trained.append({k: v for k, v in tensors.items() if ".prompt." in k and "lora_B" in k})

    def same(a, b):
        return all(torch.equal(a[k], b[k]) for k in a)

    assert same(frozen[0], frozen[1])                   # steps 1 and 2: no sync
    assert not same(frozen[1], frozen[2])               # step 3 syncs...
    assert same(frozen[2], frozen[3])                   # ...and step 4 does not
    assert not same(trained[2], trained[3])             # while phi_p itself keeps training
    synced = {k.replace(".prompt_frozen.", ".prompt."): v for k, v in frozen[2].items()}
    assert all(torch.equal(v, load_checkpoint(out / "checkpoints" / "step-00000003").tensors[k])
               for k, v in synced.items())


def test_gradient_checkpointing_trains_the_same_weights(tiny_dir, tmp_path):
    """Checkpointed layers recompute their forward during backward: each loss's backward must run under the role
    (G's adapters) and per-query LoRA its forward used, or the gradients silently change."""
    from safetensors.torch import load_file

    from metatuner import train

    extra = ["train.max_steps=3", "metatuner.rollout_every=1", "metatuner.warmup_actor_steps=2",
             "metatuner.warmup_generator_steps=1"]
    runs = {}
    for name, flag in (("plain", "false"), ("checkpointed", "true")):
        out = train_metatuner(_cfg(tiny_dir, tmp_path / name, *extra, f"train.gradient_checkpointing={flag}"))
        runs[name] = load_file(str(out / "model" / "metatuner.safetensors"))
    a, b = runs["plain"], runs["checkpointed"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    # Checkpointing really ran: backward recomputed the layers (hooks on a linear inside a layer fire again).
    mt = train.build_metatuner(_cfg(tiny_dir, tmp_path / "count"))
    train.enable_gradient_checkpointing(mt)
    calls = []
    mt.g.get_base_model().model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: calls.append(1))
    with train._training(mt, True):
        loss = mt.sr_loss(mt.rewrite_requests(["Solve it."], ["1 + 2"]), ["Add the numbers."])
    forward_calls = len(calls)
    with mt.role("learner"):
        loss.backward()
    assert forward_calls == 1 and len(calls) == 2


def test_gradient_accumulation_trains_the_weights_of_the_whole_batch(tiny_dir, tmp_path):
    """Two micro-batches of 4 make the optimiser step of one batch of 8: the same rows, the same mean loss and the
    same update, while memory holds 4 rows at a time (how a long-context run fits a smaller machine)."""
    from safetensors.torch import load_file

    from metatuner.testing import tiny_tokenizer

    data = tmp_path / "digits.jsonl"
    data.write_text("".join(json.dumps({"question": f"{n} + 0 =", "answer": str(n)}) + "\n" for n in range(1, 9)))
    # Every target has as many tokens, so the token mean of 8 rows is the mean of the two micro-batches' means.
    tok = tiny_tokenizer()
    assert len({len(tok(f"The answer is {n}.")["input_ids"]) for n in range(1, 9)}) == 1
    extra = ["train.max_steps=2", "metatuner.use_prompt=false"]
    task = {"task": "custom", "task_options": f"{{path: {data}}}"}
    runs, history = {}, {}
    for name, batch in (("whole", ["train.batch_size=8"]), ("accumulated", ["train.batch_size=4", "train.grad_accum=2"])):
        out = train_metatuner(_cfg(tiny_dir, tmp_path / name, *extra, *batch, **task))
        runs[name] = load_file(str(out / "model" / "metatuner.safetensors"))
        history[name] = json.loads((out / "train_metrics.json").read_text())["history"]
    assert history["accumulated"]["train/examples_seen"] == [8, 16]
    assert history["accumulated"]["train/task_loss"] == pytest.approx(history["whole"]["train/task_loss"], abs=1e-5)
    a, b = runs["whole"], runs["accumulated"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5

    with pytest.raises(ValueError, match="train.grad_accum"):  # more rows per step than the data has
        train_metatuner(_cfg(tiny_dir, tmp_path / "too-many", *extra, "train.batch_size=8", "train.grad_accum=2", **task))


def test_memory_estimate_counts_the_model_exactly_and_names_the_knobs(tiny_dir, tmp_path):
    from metatuner.memory_estimate import MemoryEstimateError, assert_fits, check_memory, estimate_memory
    from metatuner.testing import tiny_model_and_tokenizer

    cfg = _cfg(tiny_dir, tmp_path / "run")
    est = estimate_memory(cfg)
    model, _ = tiny_model_and_tokenizer(num_layers=4)
    assert est.parts["weights"] == 4 * sum(p.numel() for p in model.parameters())  # float32, G = M: counted once
    # Trainable: measured, not restated. Build the MetaTuner, take one AdamW step on what training optimises and
    # count the bytes that exist afterwards: the adapters' and the hypernetwork's values, their gradients, AdamW's
    # moments, and the frozen twin of the prompt decoder (values only). Fails when the estimate leaves out a part
    # (the twin, the hypernetwork's optimiser state) or counts G's LoRA on every layer for both branches.
    mt = MetaTuner(model, _, cfg.metatuner)
    trained = mt.generator_parameters() + list(mt.hyper.parameters())
    optimizer = torch.optim.AdamW(trained)
    for param in trained:
        param.grad = torch.zeros_like(param)
    optimizer.step()
    size = lambda t: t.numel() * t.element_size()  # noqa: E731
    adapters = [p for n, p in mt.g.named_parameters() if "lora_" in n] + list(mt.hyper.parameters())
    measured = (sum(size(p) for p in adapters) + sum(size(p.grad) for p in trained)
                + sum(size(v) for state in optimizer.state.values() for k, v in state.items() if k != "step"))
    assert est.parts["trainable (LoRA+Adam)"] == measured
    bigger = estimate_memory(load_config(None, [f"model.name={tiny_dir}", "train.batch_size=16"]))
    smaller = estimate_memory(load_config(None, [f"model.name={tiny_dir}", "train.batch_size=16",
                                                 "train.gradient_checkpointing=true"]))
    assert smaller.parts["activations"] < bigger.parts["activations"]
    assert estimate_memory(cfg, num_processes=2).parts["activations"] < est.parts["activations"]
    assert check_memory(cfg, "cpu") is None  # CPU runs are not checked
    with pytest.raises(MemoryEstimateError, match="train.gradient_checkpointing=true") as err:
        assert_fits(est, free_bytes=est.total // 2, device="cuda:0")
    assert "train.batch_size" in str(err.value) and "fsdp.yaml" in str(err.value)


@pytest.mark.parametrize("block", [1, 2, 3])
def test_sr_steps_before_counts_only_the_steps_that_trained_sr(block):
    from metatuner.train import sr_steps_before

    sr_steps = [step for step in range(1, 30) if ((step - 1) // block) % 2 == 1]
    assert [sr_steps_before(step, "I", block) for step in sr_steps] == list(range(len(sr_steps)))
    assert [sr_steps_before(step, "J", block) for step in range(1, 5)] == [0, 1, 2, 3]


def test_rollouts_under_schedule_i_run_on_sr_steps_and_change_d2(tiny_dir, tmp_path, monkeypatch):
    """Rollouts run on every `rollout_every`-th SR step. Counting all steps instead left D2 unchanged for the whole
    of a schedule-I run with interleave_block=1 and rollout_every=2 (SR trains only on even steps, and the
    rollouts fell on odd ones): here they must run at steps 2 and 6, and D2 must gain entries."""
    events = _record_phases(monkeypatch)
    out = train_metatuner(_cfg(tiny_dir, tmp_path / "run", "metatuner.schedule=I", "metatuner.interleave_block=1",
                               "metatuner.rollout_every=2", "train.max_steps=6", "metatuner.warmup_generator=false"))
    assert events == ["task", "rollouts", "sr", "task", "sr", "task", "rollouts", "sr"]
    d2 = json.loads((out / "model" / "expert_prompts.json").read_text())
    assert len(d2) > 0


def test_batch_rows_is_a_pure_function_of_the_step_and_covers_each_epoch():
    """What resume relies on: the rows of a step depend on the step alone. Fails on a shared random stream (a
    resumed run would see other batches), on one shuffle for every epoch, and on rows repeated or lost within an
    epoch."""
    from metatuner.batching import batch_rows

    steps = [batch_rows(step, 10, 3, seed=7) for step in range(1, 7)]  # 3 batches an epoch; row 9's turn varies
    assert steps == [batch_rows(step, 10, 3, seed=7) for step in range(1, 7)]
    assert batch_rows(5, 10, 3, seed=7) == steps[4]  # asked alone, as after a resume at step 5
    for epoch in (steps[:3], steps[3:]):
        rows = [r for batch in epoch for r in batch]
        assert all(len(batch) == 3 for batch in epoch) and len(set(rows)) == 9 and set(rows) <= set(range(10))
    assert steps[:3] != steps[3:]  # each epoch is a fresh shuffle
    assert batch_rows(1, 10, 3, seed=8) != steps[0]
    assert sorted(batch_rows(1, 2, 4, seed=0)) == [0, 1]  # fewer rows than a batch: all of them


def test_shuffled_batches_keep_a_short_last_batch_only_when_every_process_gets_a_row():
    """SFT keeps an epoch's short last batch unless it would leave one of the processes without a row; the
    warm-ups (full_batches) use whole batches only. Fails when either rule drops or keeps the wrong batch."""
    import itertools
    import random

    from metatuner.batching import full_batches, shuffled_batches

    first_epoch = lambda batches, k: list(itertools.islice(batches, k))  # noqa: E731
    assert [len(b) for b in first_epoch(shuffled_batches(7, 3, random.Random(0), min_rows=1), 3)] == [3, 3, 1]
    assert [len(b) for b in first_epoch(shuffled_batches(7, 3, random.Random(0), min_rows=2), 3)] == [3, 3, 3]
    assert [len(b) for b in first_epoch(full_batches(7, 3, random.Random(0)), 3)] == [3, 3, 3]
    assert first_epoch(full_batches(2, 4, random.Random(0)), 2)[0] in ([0, 1], [1, 0])  # fewer rows than a batch
    one = first_epoch(shuffled_batches(7, 3, random.Random(0), min_rows=1), 3)
    assert sorted(r for b in one for r in b) == list(range(7))


@pytest.mark.bad_input
def test_bad_input_p0_longer_than_the_prompt_limit_is_reported(tiny_dir, tmp_path, caplog):
    """G's prompts are cut at max_prompt_tokens: a p0 longer than that could never be written back whole."""
    with caplog.at_level("WARNING", logger="metatuner.train"):
        train_metatuner(_cfg(tiny_dir, tmp_path / "short", "train.max_steps=1", "metatuner.warmup_generator=false"))
    assert "longer than metatuner.max_prompt_tokens=4" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="metatuner.train"):
        train_metatuner(_cfg(tiny_dir, tmp_path / "long", "train.max_steps=1", "metatuner.warmup_generator=false",
                             "metatuner.max_prompt_tokens=200"))
    assert "max_prompt_tokens" not in caplog.text


def test_d2_from_samples_skips_the_sr_loss_for_queries_without_a_sample(tiny_dir, tmp_path):
    """With d2_source=samples, p0 is never an SR target: step 1 runs rollouts on its rows, step 2's rows have no
    sample yet (rollouts next at step 101) and train no SR loss. Fails if p0 stands in for the missing entries."""
    common = ("train.max_steps=2", "metatuner.warmup_generator=false", "metatuner.rollout_every=100")
    opts = "{size: 8, test_size: 4}"
    out = train_metatuner(_cfg(tiny_dir, tmp_path / "samples", *common, "metatuner.d2_source=samples",
                               task_options=opts))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert len(metrics["history"]["train/task_loss"]) == 2 and len(metrics["history"]["train/sr_loss"]) == 1
    d = metrics["diagnostics"]
    assert d["d2_entries"] == 4 and d["d2_from_samples"] == 1.0
    assert {"prompts", "distinct_prompts", "p0_share", "edit_distance_to_p0"} <= set(d)
    assert {"mean_pairwise_cosine_distance", "between_query_variance_share", "mean_frobenius_norm",
            "static_adapter_frobenius_norm"} <= set(d["lora_diversity"])
    assert {"rollouts/gap_over_p0", "rollouts/answer_leak_share", "d2/from_samples_share"} <= set(metrics["history"])

    out = train_metatuner(_cfg(tiny_dir, tmp_path / "with_p0", *common, "metatuner.d2_source=samples_and_p0",
                               task_options=opts))
    assert len(json.loads((out / "train_metrics.json").read_text())["history"]["train/sr_loss"]) == 2


def test_evaluation_reports_the_diagnostics(tiny_dir, tmp_path):
    out = train_metatuner(_cfg(tiny_dir, tmp_path / "run", "train.max_steps=1", "metatuner.warmup_generator=false"))
    mt = MetaTuner.from_pretrained(out)
    result = mt.evaluate(mt.task.load("test", limit=4), max_new_tokens=2, progress=False)
    d = result.metrics["diagnostics"]
    assert d["prompts"] == 4 and 0 <= d["p0_share"] <= 1 and d["lora_diversity"]["queries"] == 4
    assert d["answers_in_prompts"]["items"] == 4  # chain_sum's answers are numbers


@pytest.mark.parametrize("share, sampled_rows", [(0.0, 0), (1.0, 3)])
def test_m_warm_up_can_train_under_g_sampled_prompts(share, sampled_rows, monkeypatch):
    from types import SimpleNamespace

    from metatuner.tasks.base import Example
    from metatuner.train import _warmup_prompts

    mt = SimpleNamespace(rewrite_requests=lambda ps, qs: list(qs),
                         sample_prompts=lambda requests, n, temperature: [[f"written for {r}"] for r in requests])
    rows = [Example(id=str(i), question=f"q{i}", answer="1", target="1") for i in range(3)]
    settings = SimpleNamespace(warmup_actor_sampled_prompts=share, rollout_temperature=0.8)
    prompts = _warmup_prompts(mt, rows, "p0", settings, __import__("random").Random(0))
    assert sum(p != "p0" for p in prompts) == sampled_rows
    if sampled_rows:
        assert prompts == [f"written for q{i}" for i in range(3)]


@pytest.mark.parametrize("lever, check", [
    (("metatuner.g_target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]",
      "metatuner.g_lora_r=8"),
     lambda mt: any("mlp.down_proj" in n for n, p in mt.g.named_parameters() if "lora_A.prompt." in n)
     and mt.settings.g_lora_r == 8),
    (("metatuner.pool=mean", "metatuner.hyper_query_dim=16"), lambda mt: mt.hyper.query_proj.out_features == 16),
    (("metatuner.warmup_actor_steps=2", "metatuner.warmup_actor_sampled_prompts=0.5"),
     lambda mt: mt.actor_adapter is not None),
    (("metatuner.reward=exact_match", "metatuner.d2_source=samples", "metatuner.rollout_every=1"),
     lambda mt: True),
    (("metatuner.reject_answer_leaks=true", "metatuner.d2_source=samples"), lambda mt: mt.settings.reject_answer_leaks),
    (("metatuner.prompt_without_digits=true", "metatuner.d2_source=samples", "metatuner.max_prompt_tokens=12"),
     lambda mt: not any(c.isdigit() for p in mt.write_all(["What is 12 + 7?", "Add 3, 40 and 5."])[0]
                        + [s for row in mt.sample_prompts(mt.rewrite_requests(["p0"], ["What is 9 - 2?"]), 16, 1.0)
                           for s in row] for c in p)),
])
def test_prompt_branch_levers_train_save_and_reload(tiny_dir, tmp_path, lever, check):
    """Each lever of the prompt-branch A/B (docs/results/README.md) is a config option that trains and reloads."""
    out = train_metatuner(_cfg(tiny_dir, tmp_path / "run", "train.max_steps=2", *lever))
    assert check(MetaTuner.from_pretrained(out))


def test_standardised_hypernetwork_input_keeps_its_statistics_across_save_and_load(tiny_dir, tmp_path):
    out = train_metatuner(_cfg(tiny_dir, tmp_path / "run", "train.max_steps=2", "metatuner.hyper_query_norm=standard"))
    mt = MetaTuner.from_pretrained(out)
    assert int(mt.hyper.query_norm.count) > 0 and not mt.hyper.training
    assert json.loads((out / "train_metrics.json").read_text())["diagnostics"]["lora_diversity"]["queries"] == 4


@pytest.mark.fault
def test_fault_warm_up_share_is_of_the_visited_queries_when_g_samples_nothing(tiny_dir, tmp_path, monkeypatch):
    """Fails if the warm-up's improved share is divided by the queries left after narrowing them to D2's entries:
    when G samples nothing usable, D2 stays empty and that division was by zero."""
    monkeypatch.setattr(MetaTuner, "sample_prompts", lambda self, requests, n, temperature: [[""] * n for _ in requests])
    out = train_metatuner(_cfg(tiny_dir, tmp_path / "run", "train.max_steps=1", "metatuner.d2_source=samples",
                               "metatuner.warmup_generator_steps=1"))
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["warmup_generator_improved_share"] == 0.0 and metrics["warmup_generator_answer_leak_share"] == 0.0

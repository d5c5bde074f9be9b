"""DPO baseline: LoRA preference tuning (Rafailov et al. 2023) on pairs the policy samples itself, through TRL.

    metatuner train --method dpo --config configs/sft-gsm8k.yaml dpo.init_adapter=runs/sft-gsm8k/adapter --eval

1. **Pairs.** For a free-text task the policy samples `dpo.samples_per_question` answers to every training question
   (instruction p0, `dpo.temperature`) and the task's reward scores them; the best and the worst form the
   question's pair when their rewards differ. Questions where every sample ties are dropped, or with
   `dpo.gold_fallback` pair the gold target with the worst sample. For a multiple-choice task the policy ranks
   the options by likelihood, as evaluation does: the gold option is chosen and the best-ranked wrong one rejected.
2. **Training.** TRL's `DPOTrainer` tunes LoRA weights on the pairs for `train.epochs` at `dpo.lr` with
   `dpo.beta`. With `dpo.init_adapter` (the comparison passes its SFT run's adapter) that adapter is both the start
   and DPO's reference policy; without it a fresh LoRA starts on the base model, which is then the reference.

**Sittings.** The pairs are sampled in chunks of `eval.batch_size` questions, each under its own seed, and
`pairs.progress.json` records every finished chunk (`baselines.chunked_sampling`); with `train.save_every` TRL
checkpoints every N steps under `trainer/`. `train.resume=auto` goes on from both (the pairs an uninterrupted run
would have sampled, then TRL's own resume), SIGINT or SIGTERM during training saves and stops the run, and
`train_seconds` adds up every sitting (`baselines.trl_run`).

**Memory.** A micro-batch runs its chosen and rejected answers through the policy with logits over the whole
vocabulary at every position, so memory grows with `train.batch_size` x `train.max_length`: CosmosQA's passages
(up to 512 tokens) at 8 questions took SmolLM2-135M's run to 16.5 GB on a CPU. `train.batch_size=4
train.grad_accum=2` trains on the same rows in the same steps with less (peaks of 9.6 to 10.5 GB there over its
sittings).

The run folder gets `config.yaml`, `pairs.jsonl` (every pair and its rewards), `train_metrics.json`, TensorBoard
scalars in `tb/` (what TRL logs every `train.log_every` steps, as `train/loss`, `train/rewards/accuracies`, ...) and
`adapter/`, a standard PEFT adapter over the base model (`metatuner eval --adapter RUN/adapter`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from datasets import Dataset
from trl import DPOConfig, DPOTrainer

from ..config import RunConfig
from ..evaluate import option_means
from ..generation import generate, score_choices, task_chats
from ..runtime import Precision, resolve_precision
from ..tasks import check_lengths, token_counter
from ..tasks.base import Example, Task
from ..trainer import TrackerCallback, open_run_folder, run_metrics, start_run, start_tracker, write_metrics
from .policy import load_policy
from .chunked_sampling import sample_in_chunks, sampled_with
from .prompt_writer import check_actor_adapter
from .trl_run import checkpoint_arguments, train_resumably


def pair_from_samples(task: Task, example: Example, samples: list[str], gold_fallback: bool) -> dict | None:
    """The (chosen, rejected) answers of one question from the policy's samples, or None when they all tie."""
    scored = sorted(((task.reward(text, example), text) for text in samples), key=lambda rs: rs[0])
    (worst_reward, worst), (best_reward, best) = scored[0], scored[-1]
    if best_reward > worst_reward:
        return {"chosen": best, "rejected": worst, "chosen_reward": best_reward, "rejected_reward": worst_reward}
    gold_reward = task.reward(example.target, example)
    if gold_fallback and gold_reward > worst_reward:
        return {"chosen": example.target, "rejected": worst, "chosen_reward": gold_reward,
                "rejected_reward": worst_reward}
    return None


def pair_from_choices(task: Task, example: Example, options: list[str], option_scores: list[tuple[float, int]]):
    """Gold option chosen, the policy's best-ranked wrong option rejected (mean token log-likelihood, as in eval)."""
    rewards = [task.reward(option, example) for option in options]
    means = option_means(option_scores)
    gold = max(range(len(options)), key=rewards.__getitem__)
    wrong = [j for j in range(len(options)) if rewards[j] < rewards[gold]]
    if not wrong:
        return None
    rejected = max(wrong, key=means.__getitem__)
    return {"chosen": options[gold], "rejected": options[rejected], "chosen_reward": rewards[gold],
            "rejected_reward": rewards[rejected]}


@torch.no_grad()
def preference_pairs(model, tokenizer, task: Task, examples: list[Example], prompt: str, cfg: RunConfig) -> list[dict]:
    """One preference pair per training question where the policy's own answers (or options) tell one apart."""
    chats = task_chats(tokenizer, task, [prompt] * len(examples), examples)
    model.eval()
    if task.choice_targets(examples[0]) is not None:
        options = [task.choice_targets(ex) for ex in examples]
        scores = score_choices(model, tokenizer, chats, options, batch_size=cfg.eval.batch_size)
        found = [pair_from_choices(task, ex, opts, sc) for ex, opts, sc in zip(examples, options, scores)]
    else:
        n = cfg.dpo.samples_per_question
        out = generate(model, tokenizer, [c for c in chats for _ in range(n)], do_sample=True,
                       temperature=cfg.dpo.temperature, max_new_tokens=cfg.eval.max_new_tokens or task.max_new_tokens,
                       stop_strings=task.stop_strings, batch_size=cfg.eval.batch_size)
        found = [pair_from_samples(task, ex, out.texts[i * n:(i + 1) * n], cfg.dpo.gold_fallback)
                 for i, ex in enumerate(examples)]
    return [{"id": ex.id, "prompt": chat, **pair} for ex, chat, pair in zip(examples, chats, found) if pair is not None]


def train_dpo(cfg: RunConfig) -> Path:
    """Sample preference pairs with the policy, then DPO-tune its LoRA weights; returns the run folder."""
    out = open_run_folder(cfg)
    run = start_run(cfg, out)
    task, prompt = run.task, run.p0
    examples = task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit)
    start = time.perf_counter()
    check_actor_adapter(cfg.dpo.init_adapter, "dpo.init_adapter")
    model, tokenizer, lora = load_policy(cfg, cfg.dpo.init_adapter)
    examples = check_lengths(examples, token_counter(tokenizer), cfg.train.max_length, cfg.data.on_bad_row)
    pairs, _, sampling_seconds = sample_in_chunks(
        out, "pairs", examples, cfg.eval.batch_size, cfg, sampled_with(cfg, "dpo", prompt=prompt),
        lambda rows: (preference_pairs(model, tokenizer, task, rows, prompt, cfg), {}), start)
    if not pairs:
        raise ValueError(f"no preference pairs among {len(examples)} training questions: every question's "
                         f"{cfg.dpo.samples_per_question} samples got the same reward. Raise dpo.samples_per_question "
                         "or dpo.temperature, or set dpo.gold_fallback=true")

    precision = resolve_precision(cfg.train.mixed_precision, cfg.model.device)
    precision.announce()
    trainer = DPOTrainer(model=model, args=_dpo_config(cfg, out, precision), train_dataset=Dataset.from_list(
        [{k: p[k] for k in ("prompt", "chosen", "rejected")} for p in pairs]), processing_class=tokenizer,
        peft_config=lora)
    tracker = start_tracker(out)  # after the Trainer, which sets up the processes the tracker asks about
    trainer.add_callback(TrackerCallback(tracker))
    tuning_seconds = train_resumably(trainer, cfg, out, tracker, time.perf_counter())
    # Only the trained adapter: TRL keeps a frozen copy of an initial adapter beside it as the reference.
    trainer.model.save_pretrained(out / "adapter", selected_adapters=["default"])

    logged = [row for row in trainer.state.log_history if "loss" in row]
    # TRL logs every `train.log_every` steps: one history value per logging interval.
    write_metrics(out, run_metrics(
        "dpo", train_examples=len(examples), unique_train_examples=len(examples), pairs=len(pairs),
        steps=trainer.state.global_step, sampling_seconds=round(sampling_seconds, 1),
        train_seconds=round(sampling_seconds + tuning_seconds, 1), precision=precision.as_dict(),
        history={"train/loss": [row["loss"] for row in logged],
                 "train/reward_accuracy": [row.get("rewards/accuracies") for row in logged]}),
        tracker, step=trainer.state.global_step)
    tracker.finish()
    return out


def _dpo_config(cfg: RunConfig, out: Path, precision: Precision) -> DPOConfig:
    """TRL's settings from the run config. TRL reports to nothing itself: `TrackerCallback` hands its logs to the
    run's tracker, so they land in tb/ beside every other method's."""
    return DPOConfig(
        output_dir=str(out / "trainer"), beta=cfg.dpo.beta, learning_rate=cfg.dpo.lr,
        num_train_epochs=cfg.train.epochs, max_steps=cfg.train.max_steps or -1,
        per_device_train_batch_size=cfg.train.batch_size, gradient_accumulation_steps=cfg.train.grad_accum,
        max_length=cfg.train.max_length, warmup_steps=cfg.train.warmup_ratio, weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.grad_clip, seed=cfg.seed, bf16=precision.mixed_precision == "bf16",
        fp16=precision.mixed_precision == "fp16",
        use_cpu=cfg.model.device == "cpu", gradient_checkpointing=cfg.train.gradient_checkpointing,
        logging_steps=cfg.train.log_every, report_to="none", **checkpoint_arguments(cfg),
    )

"""The paper's PPO baseline as GRPO: RL fine-tuning of M's LoRA with the task's checker as the reward, through TRL.

    metatuner train --method grpo --config configs/sft-gsm8k.yaml grpo.init_adapter=runs/sft-gsm8k/adapter --eval
    metatuner compare -c configs/compare-arithmetic.yaml --only grpo

**Why GRPO and not PPO.** TRL 1.16, the version this project runs, has no `PPOTrainer` (neither in `trl` nor in
`trl.experimental`); its maintained on-policy RL trainer is `GRPOTrainer`. GRPO (Shao et al. 2024, DeepSeekMath) is
PPO's clipped policy-gradient objective with a KL penalty to a reference policy, where the advantage of an answer
is its reward against the other answers sampled for the same question instead of a learned value model's estimate.
With a checker's 0/1 reward per answer there is nothing for a value model to add at the answer level, and it
would be a second model to train. So the paper's PPO row is this method, named `grpo` here so that the results
say what ran.

For each optimiser step, `train.batch_size` training questions (times `train.grad_accum`) under p0 get
`grpo.num_generations` sampled answers each (`grpo.temperature`, at most `eval.max_new_tokens` or the task's
limit); the reward of an answer is the task's own checker (`Task.reward`, the function evaluation scores with,
after cutting the answer at the task's stop strings, as evaluation's decoding does); rewards are normalised per
group (`grpo.scale_rewards`) and the LoRA weights take a clipped (`grpo.epsilon`) policy-gradient step at `grpo.lr`
with `grpo.beta` times the KL to the reference. The LoRA has SFT's shape (`lora.r`, `lora.alpha`,
`lora.target_modules`); with `grpo.init_adapter` (the comparison passes its SFT run's adapter) training starts
from that adapter, which is also the KL reference (TRL keeps a frozen copy of it). On a multiple-choice task the
reward reads the letter M generates, where evaluation with `eval.mc_mode=likelihood` ranks the options. Under
`accelerate launch` TRL trains data parallel and each process takes `train.batch_size` questions per micro-batch.

Precision follows `train.mixed_precision` (`runtime.resolve_precision`). With `train.save_every` TRL writes a
checkpoint every N steps under `trainer/`, and `train.resume=auto` (or a checkpoint path) continues from the last
one with TRL's own resume (weights, optimizer, scheduler, RNG states; TRL reads its optimizer and RNG files with
tensors-only loading). SIGINT or SIGTERM finishes the step, writes a checkpoint and stops the run
(`TrainingStopped`); `train_seconds` adds up every sitting of a resumed run (`baselines.trl_run`). The run folder
gets `config.yaml`, `train_metrics.json` (`history`: TRL's policy loss, mean reward, its spread and the KL per
logging interval), TensorBoard scalars in `tb/` (all TRL logs, as `train/<name>`) and `adapter/`, a standard PEFT
adapter over M.
"""

from __future__ import annotations

import time
from pathlib import Path

from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from ..config import RunConfig
from ..generation import task_chats
from ..runtime import resolve_precision
from ..tasks import check_lengths, token_counter
from ..tasks.base import Example, Task
from ..trainer import TrackerCallback, open_run_folder, run_metrics, start_run, start_tracker, write_metrics
from .policy import load_policy
from .prompt_writer import check_actor_adapter
from .trl_run import checkpoint_arguments, train_resumably

# TRL's log keys -> ours in train_metrics.json's history
HISTORY_KEYS = {"loss": "train/policy_loss", "reward": "train/reward", "reward_std": "train/reward_std",
                "kl": "train/kl"}


class TaskReward:
    """GRPO's reward function: the task's checker on each completion, against its question's example (found by the
    dataset's `id` column, which TRL passes along)."""

    def __init__(self, task: Task, examples: list[Example]):
        self.task = task
        self.examples = {ex.id: ex for ex in examples}

    def __call__(self, prompts, completions, id, **_) -> list[float]:  # noqa: A002 (TRL passes the column by name)
        return [self.task.reward(self.text(c), self.examples[i]) for c, i in zip(completions, id)]

    def text(self, completion) -> str:
        """A completion as the checker sees it: the assistant's text, cut at the first of the task's stop strings."""
        if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
            completion = completion[-1]["content"]
        cuts = [completion.find(s) for s in self.task.stop_strings if s and s in completion]
        return (completion[: min(cuts)] if cuts else completion).strip()


def grpo_dataset(task: Task, examples: list[Example], prompt: str, tokenizer) -> Dataset:
    """One row per training question: its messages under `prompt` (TRL applies the chat template as evaluation
    does), or the plain text `task_chats` gives for a tokenizer without a template, and its id."""
    if tokenizer.chat_template is not None:
        prompts = [task.messages(prompt, ex) for ex in examples]
    else:
        prompts = task_chats(tokenizer, task, [prompt] * len(examples), examples)
    return Dataset.from_list([{"prompt": p, "id": ex.id} for p, ex in zip(prompts, examples)])


def train_grpo(cfg: RunConfig) -> Path:
    """GRPO-tune M's LoRA on the training questions with the task's checker as the reward; returns the run folder."""
    check_actor_adapter(cfg.grpo.init_adapter, "grpo.init_adapter")
    out = open_run_folder(cfg)
    precision = resolve_precision(cfg.train.mixed_precision, cfg.model.device)
    run = start_run(cfg, out, True, precision)
    task, s, start = run.task, cfg.grpo, time.perf_counter()
    model, tokenizer, lora = load_policy(cfg, s.init_adapter)
    examples = check_lengths(task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit),
                             token_counter(tokenizer), cfg.train.max_length, cfg.data.on_bad_row)
    args = GRPOConfig(
        output_dir=str(out / "trainer"), learning_rate=s.lr, beta=s.beta, epsilon=s.epsilon, loss_type=s.loss_type,
        scale_rewards=s.scale_rewards, num_generations=s.num_generations, temperature=s.temperature,
        max_completion_length=cfg.eval.max_new_tokens or task.max_new_tokens,
        # A micro-batch holds every answer of `train.batch_size` questions; an optimiser step, grad_accum of them.
        per_device_train_batch_size=cfg.train.batch_size * s.num_generations,
        gradient_accumulation_steps=cfg.train.grad_accum, num_train_epochs=cfg.train.epochs,
        max_steps=cfg.train.max_steps or -1, warmup_steps=cfg.train.warmup_ratio, weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.grad_clip, seed=cfg.seed, bf16=precision.mixed_precision == "bf16",
        fp16=precision.mixed_precision == "fp16", use_cpu=cfg.model.device == "cpu",
        gradient_checkpointing=cfg.train.gradient_checkpointing, logging_steps=cfg.train.log_every,
        report_to="none", **checkpoint_arguments(cfg))
    trainer = GRPOTrainer(model=model, reward_funcs=TaskReward(task, examples), args=args,
                          train_dataset=grpo_dataset(task, examples, run.p0, tokenizer), processing_class=tokenizer,
                          peft_config=lora)
    tracker = start_tracker(out)  # after the Trainer, which sets up the processes the tracker asks about
    trainer.add_callback(TrackerCallback(tracker))
    seconds = train_resumably(trainer, cfg, out, tracker, start)
    # Only the trained adapter: with beta > 0 TRL keeps a frozen copy of an initial adapter beside it as the reference.
    trainer.model.save_pretrained(out / "adapter", selected_adapters=["default"])
    # One row per logging interval (`train.log_every`), and the final row when the run ends between two.
    logged = [row for row in trainer.state.log_history if "reward" in row]
    questions = trainer.state.global_step * cfg.train.batch_size * cfg.train.grad_accum
    write_metrics(out, run_metrics(
        "grpo", train_examples=questions, unique_train_examples=len(examples), steps=trainer.state.global_step,
        completions=questions * s.num_generations, train_seconds=round(seconds, 1),
        precision=precision.as_dict(),
        history={ours: [row[key] for row in logged if key in row] for key, ours in HISTORY_KEYS.items()}),
        tracker, step=trainer.state.global_step)
    tracker.finish()
    return out

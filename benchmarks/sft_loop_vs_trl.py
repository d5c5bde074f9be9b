"""Our accelerate SFT loop (`metatuner.baselines.sft`) against TRL's `SFTTrainer`, on the same LoRA SFT step.

Run from the repository root with the project's environment (`.venv/bin/python` in place of `python`):

    OMP_NUM_THREADS=2 python benchmarks/sft_loop_vs_trl.py                 # SmolLM2-135M, rg:chain_sum
    OMP_NUM_THREADS=1 python benchmarks/sft_loop_vs_trl.py --model tiny --steps 2 --repeats 2 --out /tmp/t.json
    python benchmarks/sft_loop_vs_trl.py --task gsm8k --data-path train.jsonl --mixed-precision fp32

Both sides train the same LoRA (rank, alpha, target modules, no dropout) on their own copy of the same base weights,
with the same examples (prompt/completion pairs from `sft_pairs`), in the same order, with the same batch size, max
length, learning rate (AdamW, linear schedule, no warm-up, no weight decay), gradient clipping and mixed precision
(bf16 autocast through accelerate, or fp32). TRL gets a prompt-completion `datasets.Dataset`, so it masks the prompt
and trains on completion tokens (plus the EOS it appends) only, as our `lm_batch` does; the script checks that the
two tokenise every example into identical token sequences and labels, and that each timed repetition sees the same
number of target tokens. TRL runs without packing, padding-free batching, gradient checkpointing, evaluation,
saving, logging or progress bars; its sampler is sequential so its batches are ours. TRL's default optimiser is the
fused AdamW; `--trl-optim adamw_torch` (the default here) gives it the same `torch.optim.AdamW` as our loop.

Measurement (benchmarks/common.py has the rules): one process; each repetition runs our loop, then TRL (a, b, a,
b, ...); each side starts a repetition from a fresh copy of the base model with a new LoRA, optimiser and scheduler,
runs 1 + --steps optimiser steps on batches 0..steps, and discards step 0 (the warm-up). The figures are medians
over --repeats repetitions.

- Ours: each step is timed from before `lm_batch` (tokenising and padding the batch) to after `optimizer.zero_grad()`
  and `loss.item()`, the loop body of `train_sft`.
- TRL: a `TrainerCallback` records a timestamp at every `on_step_begin` and `on_step_end` (after a device sync).
  Step k lasts from the end of step k-1 to the end of step k: fetching and collating its batch, forward, backward,
  clipping, optimiser and scheduler step, and the Trainer's per-step bookkeeping. Building the trainer (dataset
  tokenisation, model wrapping) and `train()`'s start-up and wind-down are outside every timed interval, so nothing
  needs subtracting. `compute_seconds_per_step` times on_step_begin -> on_step_end only (batch preparation excluded);
  ours has the same split (after `lm_batch` -> end of step).

Results go to --out (default docs/performance/sft_loop_vs_trl.json) with the command line, machine, thread count
and library versions.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from datasets import Dataset, disable_progress_bars  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import PrinterCallback, TrainerCallback, get_linear_schedule_with_warmup  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from common import Summary, command_line, library_versions, machine, now, sync, utc_now, write_json  # noqa: E402
from metatuner.baselines.sft import sft_pairs  # noqa: E402
from metatuner.config import LoraSettings, TrainConfig  # noqa: E402
from metatuner.generation import lm_batch, lm_loss  # noqa: E402
from metatuner.models import load_model  # noqa: E402
from metatuner.runtime import resolve_precision  # noqa: E402
from metatuner.tasks import get_task  # noqa: E402
from metatuner.testing import tiny_model_and_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TASK = "rg:chain_sum"
DEFAULT_TASK_OPTIONS = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}


def parse_args(argv=None) -> argparse.Namespace:
    lora, train = LoraSettings(), TrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct",
                   help="a name metatuner.models.load_model reads, or 'tiny' (the in-memory test model)")
    p.add_argument("--dtype", default="float32", help="weights dtype for load_model (as train_sft's model.dtype)")
    p.add_argument("--task", default=DEFAULT_TASK, help="a metatuner task (rg:<name>, gsm8k, ...)")
    p.add_argument("--task-option", action="append", default=[], metavar="KEY=VALUE",
                   help=f"task option (repeatable); default for {DEFAULT_TASK}: "
                        + " ".join(f"{k}={v}" for k, v in DEFAULT_TASK_OPTIONS.items()))
    p.add_argument("--data-path", default=None, help="local train file for the task (e.g. gsm8k JSONL)")
    p.add_argument("--batch-size", type=int, default=train.batch_size)
    p.add_argument("--max-length", type=int, default=train.max_length)
    p.add_argument("--steps", type=int, default=5, help="timed optimiser steps per repetition (after 1 warm-up)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--mixed-precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="auto: what training picks on this machine (metatuner.runtime)")
    p.add_argument("--lr", type=float, default=train.lr)
    p.add_argument("--grad-clip", type=float, default=train.grad_clip)
    p.add_argument("--lora-r", type=int, default=lora.r)
    p.add_argument("--lora-alpha", type=float, default=lora.alpha)
    p.add_argument("--target-modules", default=",".join(lora.target_modules))
    p.add_argument("--trl-optim", default="adamw_torch",
                   help="TrainingArguments.optim for TRL: adamw_torch (= our torch.optim.AdamW) or adamw_torch_fused "
                        "(transformers' default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(REPO / "docs" / "performance" / "sft_loop_vs_trl.json"))
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 1:
        p.error("--steps, --repeats and --batch-size must be >= 1")
    return args


def task_options(args) -> dict:
    if not args.task_option:
        return dict(DEFAULT_TASK_OPTIONS) if args.task == DEFAULT_TASK else {}
    options = {}
    for item in args.task_option:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--task-option wants KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def lora_config(args) -> LoraConfig:
    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0,
                      target_modules=args.target_modules.split(","), task_type="CAUSAL_LM")


def load(args):
    if args.model == "tiny":
        model, tokenizer = tiny_model_and_tokenizer()
        model.requires_grad_(False)
        return model, tokenizer
    model, tokenizer = load_model(args.model, args.dtype, "cpu")
    return model, tokenizer


# ---------------------------------------------------------------- (a) our loop: the body of train_sft's loop


def run_ours(base, tokenizer, pairs, args, accelerator) -> list[dict]:
    """1 + steps optimiser steps on batches 0..steps; a dict per step (step 0 is the warm-up)."""
    torch.manual_seed(args.seed)
    model = get_peft_model(copy.deepcopy(base), lora_config(args))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, 0, args.steps + 1)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    records = []
    for step in range(args.steps + 1):
        rows = pairs[step * args.batch_size : (step + 1) * args.batch_size]
        sync(accelerator.device)
        start = now()
        batch = lm_batch(tokenizer, [p for p, _ in rows], [t for _, t in rows], args.max_length,
                         device=accelerator.device)
        batched = now()
        with accelerator.accumulate(model):
            loss = lm_loss(model, batch)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), args.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
        tokens = int((batch["labels"] != -100).sum())
        loss_value = loss.item()
        sync(accelerator.device)
        end = now()
        records.append({"seconds": end - start, "compute_seconds": end - batched, "tokens": tokens, "loss": loss_value})
    accelerator.free_memory()  # drop the accelerator's references so the copy can be freed
    return records


# ---------------------------------------------------------------- (b) TRL's SFTTrainer


class StepTimer(TrainerCallback):
    """Timestamps at every optimiser step's begin and end (after a device sync, so queued work is counted)."""

    def __init__(self, device):
        self.device, self.begin, self.end = device, [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin.append(now())

    def on_step_end(self, args, state, control, **kwargs):
        sync(self.device)
        self.end.append(now())


class CountingSFTTrainer(SFTTrainer):
    """SFTTrainer that keeps every micro-batch's target-token count and loss, as device tensors (no extra sync)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.bench_tokens, self.bench_losses = [], []

    def training_step(self, model, inputs, *a, **k):
        self.bench_tokens.append(inputs["labels"].ne(-100).sum())
        loss = super().training_step(model, inputs, *a, **k)
        self.bench_losses.append(loss)
        return loss


def trl_trainer(base, tokenizer, dataset, args, output_dir, timer, device) -> CountingSFTTrainer:
    config = SFTConfig(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        max_steps=args.steps + 1,
        learning_rate=args.lr,
        weight_decay=0.0,
        lr_scheduler_type="linear",
        warmup_steps=0,
        max_grad_norm=args.grad_clip,
        optim=args.trl_optim,
        bf16=args.mixed_precision == "bf16",
        fp16=False,
        activation_checkpointing=False,  # TRL turns (gradient/activation) checkpointing on by default
        max_length=args.max_length,
        packing=False,
        padding_free=False,
        completion_only_loss=True,
        shuffle_dataset=False,
        train_sampling_strategy="sequential",
        dataloader_num_workers=0,
        logging_strategy="no",
        eval_strategy="no",
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=args.seed,
        use_cpu=torch.device(device).type == "cpu",  # transformers wants it said for bf16 on CPU
    )
    trainer = CountingSFTTrainer(
        model=copy.deepcopy(base), args=config, train_dataset=dataset, processing_class=tokenizer,
        peft_config=lora_config(args), callbacks=[timer],
    )
    trainer.remove_callback(PrinterCallback)  # it only prints the end-of-training summary
    return trainer


def run_trl(base, tokenizer, dataset, args, device) -> tuple[list[dict], CountingSFTTrainer | None, dict]:
    timer = StepTimer(device)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = trl_trainer(base, tokenizer, dataset, args, tmp, timer, device)
        prepared = {"input_ids": trainer.train_dataset["input_ids"], "labels": trainer.train_dataset["labels"],
                    "mixed_precision": trainer.accelerator.mixed_precision}
        trainer.train()
    n = args.steps + 1
    if len(timer.end) != n or len(trainer.bench_tokens) != n:
        raise RuntimeError(f"TRL ran {len(timer.end)} steps / {len(trainer.bench_tokens)} micro-batches, expected {n}")
    records = []
    for k in range(n):
        previous_end = timer.end[k - 1] if k else timer.begin[0]
        records.append({
            "seconds": timer.end[k] - previous_end,
            "compute_seconds": timer.end[k] - timer.begin[k],
            "tokens": int(trainer.bench_tokens[k]),
            "loss": float(trainer.bench_losses[k]),
        })
    return records, trainer, prepared


# ---------------------------------------------------------------- checks and figures


def compare_tokenisation(tokenizer, pairs, max_length, prepared) -> dict:
    """Do TRL's prepared examples hold exactly the token ids and labels that lm_batch builds?"""
    batch = lm_batch(tokenizer, [p for p, _ in pairs], [t for _, t in pairs], max_length)
    ours_ids, ours_labels = [], []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
        keep = mask.bool()
        ours_ids.append(ids[keep].tolist())
        ours_labels.append(labels[keep].tolist())
    same_count = len(ours_ids) == len(prepared["input_ids"])
    id_mismatch = [i for i, (a, b) in enumerate(zip(ours_ids, prepared["input_ids"])) if a != list(b)]
    label_mismatch = [i for i, (a, b) in enumerate(zip(ours_labels, prepared["labels"])) if a != list(b)]
    return {
        "examples": len(ours_ids),
        "trl_examples": len(prepared["input_ids"]),
        "identical_input_ids": same_count and not id_mismatch,
        "identical_labels": same_count and not label_mismatch,
        "mismatched_examples": sorted(set(id_mismatch) | set(label_mismatch))[:20],
    }


def repetition_figures(records: list[dict], steps: int) -> dict:
    timed = records[1:]  # step 0 is the warm-up
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["tokens"] for r in timed)
    return {
        "target_tokens": tokens,
        "seconds": seconds,
        "target_tokens_per_s": tokens / seconds,
        "seconds_per_step": seconds / steps,
        "compute_seconds_per_step": sum(r["compute_seconds"] for r in timed) / steps,
        "warmup_loss": records[0]["loss"],
        "per_step_tokens": [r["tokens"] for r in timed],
    }


def side_summary(reps: list[dict]) -> dict:
    return {
        "target_tokens_per_s": Summary([r["target_tokens_per_s"] for r in reps]).as_dict(2),
        "seconds_per_step": Summary([r["seconds_per_step"] for r in reps]).as_dict(4),
        "compute_seconds_per_step": Summary([r["compute_seconds_per_step"] for r in reps]).as_dict(4),
        "target_tokens_per_repetition": [r["target_tokens"] for r in reps],
        "per_step_target_tokens": reps[0]["per_step_tokens"],
        "warmup_loss": [round(r["warmup_loss"], 5) for r in reps],
    }


def main(argv=None) -> dict:
    args = parse_args(argv)
    disable_progress_bars()
    options = task_options(args)
    precision = resolve_precision(args.mixed_precision, "cpu")
    args.mixed_precision = "bf16" if precision.mixed_precision == "bf16" else "fp32"  # both sides run this one
    print(f"precision: {args.mixed_precision} ({precision.reason})", flush=True)
    accelerator = Accelerator(mixed_precision=precision.mixed_precision)
    device = accelerator.device

    base, tokenizer = load(args)
    base.to(device)
    task = get_task(args.task, **options)
    needed = (args.steps + 1) * args.batch_size
    examples = task.load("train", path=args.data_path, limit=needed)
    if len(examples) < needed:
        raise SystemExit(f"{args.task} gave {len(examples)} examples; {needed} needed ((steps + 1) * batch size)")
    pairs = sft_pairs(task, examples, task.default_prompt, tokenizer)
    dataset = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])

    print(f"{args.model} on {device}, {args.task} {options}, batch {args.batch_size}, {args.steps} timed steps "
          f"x {args.repeats} repetitions, {args.mixed_precision}, torch threads {torch.get_num_threads()}", flush=True)
    ours_reps, trl_reps, tokenisation, trl_mixed_precision = [], [], None, None
    for rep in range(args.repeats):
        ours = repetition_figures(run_ours(base, tokenizer, pairs, args, accelerator), args.steps)
        gc.collect()
        trl_records, trainer, prepared = run_trl(base, tokenizer, dataset, args, device)
        trl = repetition_figures(trl_records, args.steps)
        if tokenisation is None:
            tokenisation = compare_tokenisation(tokenizer, pairs, args.max_length, prepared)
            trl_mixed_precision = prepared["mixed_precision"]
        del trainer, prepared
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        ours_reps.append(ours)
        trl_reps.append(trl)
        print(f"  rep {rep + 1}/{args.repeats}: ours {ours['target_tokens_per_s']:.1f} tok/s "
              f"{ours['seconds_per_step']:.3f} s/step | TRL {trl['target_tokens_per_s']:.1f} tok/s "
              f"{trl['seconds_per_step']:.3f} s/step", flush=True)

    same_tokens = all(o["per_step_tokens"] == t["per_step_tokens"] for o, t in zip(ours_reps, trl_reps))
    ours_s, trl_s = side_summary(ours_reps), side_summary(trl_reps)
    ratio = {
        key: round(ours_s[key]["median"] / trl_s[key]["median"], 3)
        for key in ("target_tokens_per_s", "seconds_per_step", "compute_seconds_per_step")
    }
    result = {
        "benchmark": "sft_loop_vs_trl",
        "date": utc_now(),
        "command": command_line(),
        "machine": machine(),
        "versions": library_versions("torch", "transformers", "trl", "peft", "accelerate", "datasets"),
        "settings": {
            "model": args.model, "dtype": args.dtype if args.model != "tiny" else "float32", "device": str(device),
            "task": args.task, "task_options": options, "data_path": args.data_path,
            "examples": len(pairs), "batch_size": args.batch_size, "max_length": args.max_length,
            "steps_per_repetition": args.steps, "warmup_steps_per_repetition": 1, "repeats": args.repeats,
            "mixed_precision": args.mixed_precision,
            "accelerate_mixed_precision": {"ours": accelerator.mixed_precision, "trl": trl_mixed_precision},
            "lr": args.lr, "grad_clip": args.grad_clip,
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0,
                     "target_modules": args.target_modules.split(",")},
            "optimizer": {"ours": "torch.optim.AdamW (defaults)", "trl": args.trl_optim},
            "order": "interleaved: ours, TRL, ours, TRL, ... (one repetition = one block of each)",
        },
        "timing": {
            "ours": "per step: before lm_batch -> after optimizer.zero_grad() and loss.item() (+ device sync)",
            "trl": "TrainerCallback timestamps: step k = on_step_end(k-1) -> on_step_end(k) (+ device sync); "
                   "trainer construction and train() start-up/wind-down fall outside every interval",
            "compute_seconds_per_step": "ours: after lm_batch -> end of step; TRL: on_step_begin -> on_step_end",
            "summary": "median over repetitions of (timed target tokens / timed seconds) and (timed seconds / steps)",
        },
        "tokens": {
            "target_tokens_per_repetition": {"ours": ours_reps[0]["target_tokens"],
                                             "trl": trl_reps[0]["target_tokens"]},
            "same_target_tokens_every_step": same_tokens,
            **(tokenisation or {}),
        },
        "ours": ours_s,
        "trl": trl_s,
        "ratio_ours_over_trl": ratio,
        "ratio_note": "target_tokens_per_s > 1 and seconds_per_step < 1 both mean our loop is faster",
    }
    path = write_json(args.out, result)

    print(f"target tokens per repetition: ours {ours_reps[0]['target_tokens']}, TRL {trl_reps[0]['target_tokens']} "
          f"(same every step: {same_tokens}; identical ids/labels: {tokenisation['identical_input_ids']}/"
          f"{tokenisation['identical_labels']})")
    print(f"{'':20}{'tokens/s':>12}{'s/step':>10}{'compute s/step':>16}{'warm-up loss':>14}")
    for name, s in (("ours (accelerate)", ours_s), ("TRL SFTTrainer", trl_s)):
        print(f"{name:20}{s['target_tokens_per_s']['median']:>12.1f}{s['seconds_per_step']['median']:>10.4f}"
              f"{s['compute_seconds_per_step']['median']:>16.4f}{s['warmup_loss'][0]:>14.4f}")
    print(f"{'ours / TRL':20}{ratio['target_tokens_per_s']:>12.3f}{ratio['seconds_per_step']:>10.3f}"
          f"{ratio['compute_seconds_per_step']:>16.3f}")
    print(f"wrote {path}")
    if not same_tokens or not (tokenisation["identical_input_ids"] and tokenisation["identical_labels"]):
        print("WARNING: the two sides did not train on identical tokens; see 'tokens' in the JSON", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()

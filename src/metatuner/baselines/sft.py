"""LoRA SFT baseline: fine-tune the actor on (p0, x) -> y with a static PEFT adapter.

    metatuner train --method sft --config configs/sft-gsm8k.yaml [key=value ...]

One GPU or CPU: the command above. Several GPUs: `accelerate launch -m metatuner.cli train --method sft ...`.
The run folder gets `config.yaml`, `train_metrics.json`, TensorBoard scalars under `tb/`, and `adapter/`, a
standard PEFT adapter (`metatuner eval --adapter RUN/adapter` or `PeftModel.from_pretrained`).

The loop is plain accelerate rather than TRL's SFTTrainer: both train the same LoRA on the same tokens; the loop
shares its batching (`generation.lm_batch`) with evaluation and the MetaTuner task loss, so the three see identical
token sequences, and it is faster: on the embedded SmolLM2-135M (CPU, bf16 autocast, batch 8, identical tokens)
it ran 1.39x the target tokens/s of TRL 1.16's SFTTrainer (`docs/performance/sft_loop_vs_trl.json`, measured by
`benchmarks/sft_loop_vs_trl.py`).
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..config import RunConfig, command_line, peak_rss_mb, to_yaml
from ..generation import chat_prompt, lm_batch, lm_loss
from ..models import load_model
from ..tasks import get_task


def resolve_mixed_precision(setting: str) -> str:
    """The config's mixed_precision as accelerate spells it."""
    if setting == "fp32":
        return "no"
    if setting != "auto":
        return setting
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16"  # CPU autocast to bf16 is about 1.4x faster than fp32 for LoRA training here


def sft_pairs(task, examples, prompt: str, tokenizer) -> list[tuple[str, str]]:
    """(chat prompt, target) pairs: the model sees p0 and x and learns to write y."""
    return [(chat_prompt(tokenizer, task.messages(prompt, ex)), ex.target) for ex in examples]


def train_sft(cfg: RunConfig) -> Path:
    """Train the LoRA SFT baseline described by `cfg`; returns the run folder."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    accelerator = Accelerator(
        mixed_precision=resolve_mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        log_with="tensorboard",
        project_dir=str(out),
        cpu=cfg.model.device == "cpu",
    )
    torch.manual_seed(cfg.seed)
    task = get_task(cfg.data.task, **cfg.data.task_options)
    examples = task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit)
    prompt = cfg.data.prompt or task.default_prompt

    model, tokenizer = load_model(cfg.model.actor or cfg.model.name, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()

    pairs = sft_pairs(task, examples, prompt, tokenizer)
    steps_per_epoch = -(-len(pairs) // (cfg.train.batch_size * cfg.train.grad_accum))
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total_steps), total_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    accelerator.init_trackers("tb")

    rng = random.Random(cfg.seed)
    step, seen, tokens, losses = 0, 0, 0, []
    start = time.perf_counter()
    bar = tqdm(total=total_steps, desc="sft", disable=not accelerator.is_main_process, unit="step")
    while step < total_steps:
        order = list(range(len(pairs)))
        rng.shuffle(order)
        # Each rank takes its own slice of every global batch.
        for first in range(0, len(order), cfg.train.batch_size * accelerator.num_processes):
            rows = order[first : first + cfg.train.batch_size * accelerator.num_processes]
            rows = rows[accelerator.process_index :: accelerator.num_processes]
            if not rows:
                continue
            batch = lm_batch(
                tokenizer, [pairs[i][0] for i in rows], [pairs[i][1] for i in rows],
                cfg.train.max_length, device=accelerator.device,
            )
            with accelerator.accumulate(model):
                loss = lm_loss(model, batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.grad_clip > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            seen += len(rows) * accelerator.num_processes
            tokens += int((batch["labels"] != -100).sum()) * accelerator.num_processes
            losses.append(loss.item())
            if accelerator.sync_gradients:
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
                if step % cfg.train.log_every == 0 or step == total_steps:
                    recent = losses[-cfg.train.log_every * cfg.train.grad_accum :]
                    accelerator.log({"train/loss": sum(recent) / len(recent),
                                     "train/lr": scheduler.get_last_lr()[0],
                                     "train/examples_seen": seen}, step=step)
                if step >= total_steps:
                    break
    bar.close()
    seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(out / "adapter")
        tokenizer.save_pretrained(out / "adapter")
        (out / "train_metrics.json").write_text(json.dumps({
            "method": "sft", "command": command_line(), "steps": step, "train_examples": seen, "unique_train_examples": len(pairs),
            "target_tokens": tokens, "train_seconds": round(seconds, 1), "peak_rss_mb": peak_rss_mb(),
            "target_tokens_per_s": round(tokens / seconds, 1), "first_loss": losses[0], "final_loss": losses[-1],
            "loss_curve": losses,
        }, indent=2) + "\n")
    accelerator.end_training()
    return out

"""LoRA SFT baseline: fine-tune the actor on (p0, x) -> y with a static PEFT adapter.

    metatuner train --method sft --config configs/sft-gsm8k.yaml [key=value ...]

One GPU or CPU: the command above. Several GPUs: `accelerate launch --config_file configs/accelerate/ddp.yaml
-m metatuner train --method sft ...` (or fsdp.yaml / deepspeed_zero2.yaml / deepspeed_zero3.yaml to shard the
frozen weights too; docs/scaling.md). Each process takes 1/N of every batch of `train.batch_size` examples and its
loss is weighted by its share of the batch's target tokens, so N processes train the same adapter as one.
The run folder gets `config.yaml`, `train_metrics.json`, TensorBoard scalars under `tb/`, and `adapter/`, a
standard PEFT adapter (`metatuner eval --adapter RUN/adapter` or `PeftModel.from_pretrained`). With
`train.save_every` it also gets resumable checkpoints (`checkpoint.py`; every N steps and at the end) and
`--resume auto|PATH` continues a stopped run exactly.

The loop is plain accelerate rather than TRL's SFTTrainer: both train the same LoRA on the same tokens; the loop
shares its batching (`generation.lm_batch`) with evaluation and the MetaTuner task loss, so the three see identical
token sequences, and it is faster: on the embedded SmolLM2-135M (CPU, batch 8, identical tokens) it ran 1.39x the
target tokens/s of TRL 1.16's SFTTrainer under bf16 autocast on a Xeon with AMX, and 1.63x in fp32 on an AVX2-only
AMD EPYC (`docs/performance/sft_loop_vs_trl.json` holds the latter, measured by `benchmarks/sft_loop_vs_trl.py`).
"""

from __future__ import annotations

import inspect
import random
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate.utils import DistributedType
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils.other import fsdp_auto_wrap_policy
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..batching import shuffled_batches
from ..checkpoint import CheckpointError, find_checkpoint, save_checkpoint
from ..config import RunConfig
from ..distributed import end_training, rank_rng_states, restore_rank_rng
from ..generation import base_model, lm_batch, task_chats
from ..memory_estimate import check_memory
from ..models import load_model
from ..tasks import check_lengths, token_counter
from ..trainer import (StepControl, find_resume, make_accelerator, open_run_folder, run_metrics, start_run,
                       write_metrics)


def sft_pairs(task, examples, prompt: str, tokenizer) -> list[tuple[str, str]]:
    """(chat prompt, target) pairs: the model sees p0 and x and learns to write y."""
    return list(zip(task_chats(tokenizer, task, [prompt] * len(examples), examples), [ex.target for ex in examples]))


def forward_lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL over the target tokens of an `lm_batch`, through the (possibly wrapped) model's own forward.

    DDP synchronises gradients, and FSDP and ZeRO-3 gather their shards, only when the wrapper's forward runs, so
    the loss must not call the inner decoder directly. `logits_to_keep` still limits the LM head to the columns
    that hold a target, which keeps most of the memory saving of scoring target positions only.
    """
    labels = batch["labels"][:, 1:]
    columns = (labels != -100).any(0).nonzero().squeeze(1)
    base = base_model(model)  # under the DDP / FSDP / DeepSpeed engine and PEFT
    if "logits_to_keep" in inspect.signature(type(base).forward).parameters:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       logits_to_keep=columns).logits
        labels = labels[:, columns]
    else:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def train_sft(cfg: RunConfig) -> Path:
    """Train the LoRA SFT baseline described by `cfg`; returns the run folder. Resumes from `train.resume`; a
    SIGINT or SIGTERM finishes the current step, saves a checkpoint and raises TrainingStopped."""
    out = open_run_folder(cfg)
    accelerator, precision = make_accelerator(cfg, out, gradient_accumulation_steps=cfg.train.grad_accum)
    run = start_run(cfg, out, accelerator.is_main_process, precision)
    examples = run.task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit)
    if cfg.train.check_memory:
        check_memory(cfg, accelerator.device, accelerator.num_processes, verbose=accelerator.is_main_process)
    model, tokenizer = _lora_model(cfg, accelerator)
    # Over-long examples stop the run or, with on_bad_row=skip, are left out (cut, they would lose their answer).
    examples = check_lengths(examples, token_counter(tokenizer), cfg.train.max_length, cfg.data.on_bad_row)
    pairs = sft_pairs(run.task, examples, run.p0, tokenizer)
    steps_per_epoch = -(-len(pairs) // (cfg.train.batch_size * cfg.train.grad_accum))
    total_steps = cfg.train.max_steps or steps_per_epoch * cfg.train.epochs
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=cfg.train.lr, weight_decay=cfg.train.weight_decay
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.train.warmup_ratio * total_steps), total_steps)
    # The scheduler stays unprepared: accelerate's wrapper steps it once per process per optimizer step (it assumes
    # each process reads its own batch), while here N processes share one batch. It steps with the optimizer below.
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is not None:  # DeepSpeed wants a per-process batch size, normally read from a prepared DataLoader
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = -(-cfg.train.batch_size // accelerator.num_processes)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.init_trackers("tb")
    if min(cfg.train.batch_size, len(pairs)) < accelerator.num_processes:
        raise ValueError(f"train.batch_size={cfg.train.batch_size} with {len(pairs)} training examples leaves some of "
                         f"the {accelerator.num_processes} processes without a row: raise train.batch_size or launch "
                         "fewer processes")
    loop = _SftLoop(cfg, accelerator, model, tokenizer, optimizer, scheduler, pairs, out)
    loop.resume(find_resume(cfg, out))
    bar = tqdm(total=total_steps, initial=loop.step, desc="sft", disable=not accelerator.is_main_process, unit="step")
    with StepControl(cfg.train.save_every, accelerator, save=loop.save_checkpoint) as control:
        while loop.step < total_steps:
            if loop.micro_step(total_steps):  # an optimiser step ended
                bar.update(1)
                bar.set_postfix(loss=f"{loop.losses[-1]:.3f}")
                control.after_step(loop.step, total_steps)  # periodic checkpoint; SIGINT/SIGTERM: save and stop
    bar.close()
    loop.finish(precision)
    end_training(accelerator)
    return out


def _lora_model(cfg: RunConfig, accelerator):
    """M with a fresh trainable LoRA (`lora.*`), on the CPU until accelerate places it."""
    model, tokenizer = load_model(cfg.model.actor or cfg.model.name, cfg.model.dtype, "cpu", cfg.model.trust_remote_code)
    if cfg.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad (the embeddings are frozen under LoRA).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
        target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    _wrap_lora_separately(accelerator, model)
    return model, tokenizer


class _SftLoop:
    """The SFT loop's state (data position, counters, loss per micro-batch) and its micro-step, checkpoint and end."""

    def __init__(self, cfg: RunConfig, accelerator, model, tokenizer, optimizer, scheduler, pairs, out: Path):
        self.cfg, self.accelerator, self.model, self.tokenizer = cfg, accelerator, model, tokenizer
        self.optimizer, self.scheduler, self.pairs, self.out = optimizer, scheduler, pairs, out
        # An epoch's short last batch is kept unless it would leave a process without a row.
        self.batches = shuffled_batches(len(pairs), cfg.train.batch_size, random.Random(cfg.seed),
                                        min_rows=accelerator.num_processes)
        self.step, self.seen, self.tokens, self.losses, self.start = 0, 0, 0, [], time.perf_counter()

    def resume(self, ckpt) -> None:
        cfg, accelerator = self.cfg, self.accelerator
        if (cfg.train.save_every or ckpt is not None) and accelerator.distributed_type in (DistributedType.FSDP,
                                                                                       DistributedType.DEEPSPEED):
            raise ValueError(f"train.save_every and --resume for the SFT baseline work under one process or DDP; "
                             f"{accelerator.distributed_type} shards the optimizer state across processes. Set "
                             "train.save_every=0 or launch with configs/accelerate/ddp.yaml.")
        if ckpt is None:
            return
        result = set_peft_model_state_dict(accelerator.unwrap_model(self.model), ckpt.tensors)
        if getattr(result, "unexpected_keys", None):
            raise CheckpointError(f"{ckpt.path}: weights do not fit this adapter: {result.unexpected_keys[:3]}")
        ckpt.restore(self.optimizer, self.scheduler)
        restore_rank_rng(ckpt.state.get("rank_rng"), accelerator, str(ckpt.path))
        self.step, self.seen, self.tokens = ckpt.step, ckpt.state["seen"], ckpt.state["tokens"]
        self.losses = ckpt.state["losses"]
        self.start -= ckpt.state["elapsed"]
        for _ in range(self.step * cfg.train.grad_accum):  # the data position: the batches already trained on
            next(self.batches)

    def micro_step(self, total_steps: int) -> bool:
        """One micro-batch's forward and backward (and the update at the end of an accumulation); True when an
        optimiser step ended."""
        cfg, accelerator, model = self.cfg, self.accelerator, self.model
        batch_rows = next(self.batches)
        rows = batch_rows[accelerator.process_index :: accelerator.num_processes]
        batch = lm_batch(self.tokenizer, [self.pairs[i][0] for i in rows], [self.pairs[i][1] for i in rows],
                         cfg.train.max_length, device=accelerator.device)
        with accelerator.accumulate(model):
            loss = forward_lm_loss(model, batch)
            # The loss is a mean over this rank's target tokens and DDP/FSDP/ZeRO average gradients over ranks;
            # weighting by this rank's share of the batch's tokens makes that average the gradient of the batch's
            # token mean, the same as one process computing the whole batch.
            local = (batch["labels"] != -100).sum().float()
            total, loss_sum = accelerator.reduce(torch.stack([local, loss.detach() * local]), "sum").tolist()
            accelerator.backward(loss * (local / total * accelerator.num_processes))
            if accelerator.sync_gradients and cfg.train.grad_clip > 0:
                accelerator.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            self.optimizer.step()
            if accelerator.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad()
        self.seen += len(batch_rows)
        self.tokens += int(total)
        self.losses.append(loss_sum / total)
        if not accelerator.sync_gradients:
            return False
        self.step += 1
        if self.step % cfg.train.log_every == 0 or self.step == total_steps:
            recent = self.losses[-cfg.train.log_every * cfg.train.grad_accum :]
            accelerator.log({"train/loss": sum(recent) / len(recent), "train/lr": self.scheduler.get_last_lr()[0],
                             "train/examples_seen": self.seen}, step=self.step)
        return True

    def save_checkpoint(self, step: int) -> Path | None:
        """A resumable checkpoint (collective: every rank sends its RNG states, the main one writes)."""
        accelerator = self.accelerator
        ranks = rank_rng_states(accelerator)
        path = None
        if accelerator.is_main_process:
            path = save_checkpoint(
                self.out, step, tensors=get_peft_model_state_dict(accelerator.unwrap_model(self.model)),
                optimizer=self.optimizer, scheduler=self.scheduler, keep=self.cfg.train.keep_checkpoints, state={
                    "seen": self.seen, "tokens": self.tokens, "losses": self.losses, "config": asdict(self.cfg),
                    "elapsed": time.perf_counter() - self.start, **({"rank_rng": ranks} if ranks else {})})
        accelerator.wait_for_everyone()
        return path or find_checkpoint(self.out, "auto")

    def finish(self, precision) -> None:
        """adapter/ and train_metrics.json (main process); every rank joins the gather of the weights."""
        accelerator, seconds = self.accelerator, time.perf_counter() - self.start
        accelerator.wait_for_everyone()
        # Every rank joins get_state_dict: under ZeRO-3 and FSDP it gathers the sharded weights. Saving from
        # unwrap_model(model) alone would write ZeRO-3's empty placeholders, an adapter of size-0 tensors.
        state = _full_state_dict(accelerator, self.model)
        if accelerator.is_main_process:
            accelerator.unwrap_model(self.model).save_pretrained(self.out / "adapter", state_dict=state)
            self.tokenizer.save_pretrained(self.out / "adapter")
            write_metrics(self.out, run_metrics(
                "sft", steps=self.step, train_examples=self.seen, unique_train_examples=len(self.pairs),
                target_tokens=self.tokens, train_seconds=round(seconds, 1),
                target_tokens_per_s=round(self.tokens / seconds, 1), first_loss=self.losses[0],
                final_loss=self.losses[-1], precision=precision.as_dict(), history={"train/loss": self.losses}),
                accelerator, step=self.step)
        accelerator.wait_for_everyone()  # callers (BetterTogether) read adapter/ next, on every process


def _wrap_lora_separately(accelerator, model) -> None:
    """FSDP (version 1) flattens each wrapped unit's parameters into one tensor, which must be all trainable or all
    frozen unless use_orig_params (which gives up LoRA's memory savings). PEFT's policy wraps every trainable LoRA
    leaf in its own unit and the decoder layers around them, as PEFT's FSDP guide does; FSDP2 shards per parameter
    and needs nothing."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1:
        plugin.auto_wrap_policy = fsdp_auto_wrap_policy(model)


def _full_state_dict(accelerator, model) -> dict:
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is not None:
        plugin.set_state_dict_type("FULL_STATE_DICT")  # whole tensors on the main process, not per-rank shards
    return accelerator.get_state_dict(model)

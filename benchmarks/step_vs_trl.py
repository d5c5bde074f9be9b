"""One MetaTuner task-loss step against one TRL SFTTrainer + PEFT LoRA step on the same actor, batch and tokens.

Run through the suite: `python benchmarks/perf.py --only metatuner_step_vs_trl_sft [--quick]`.

The MetaTuner step is the parameter branch of schedule J: the meta encoder (G's layers 0..k-1 with phi_s) reads
the rewrite request (p0, x), the hypernetwork turns h into every target's LoRA, M computes the task loss on
(p0, x) -> y with it, then backward (to phi_q and phi_s), clipping and AdamW. The actor's input is the same chat
and target that TRL trains on, and TRL's LoRA has the per-query LoRA's rank and targets. The whole J step (the
frozen prompt decoder writing p, rollouts and the SR loss on top) is timed beside it, with its phases, so the
cost of the prompt branch is visible too.

Each repetition: ours (1 warm-up + S timed steps), then TRL (the same), then the full J step (1 warm-up + 1 timed);
each side starts from a fresh copy of the base weights. Medians over repetitions of the per-repetition ratios:
`ratio` (task-loss step / TRL step) and `j_step_over_trl` (whole J step / TRL step, the `j_step_vs_trl_sft`
headline). Then, untimed, each step's matrix-product FLOPs (`j_step_flops_over_trl`): how much more the J step has
to compute than the TRL step, so that the time ratio splits into work and speed (FLOP/s) per side.
"""

from __future__ import annotations

import argparse
import copy
import gc

import torch
from datasets import Dataset, disable_progress_bars
from transformers import get_linear_schedule_with_warmup

import sft_loop_vs_trl as sft_bench
from bench_setup import Bench, PhaseFlops, PhaseTimer, count_flops, j_step_backward
from common import Summary, autocast, now
from metatuner.config import MetaTunerSettings
from metatuner.model import MetaTuner
from metatuner.rollouts import ExpertPromptStore

LR, GRAD_CLIP = 2e-4, 1.0


def _metatuner(base, tok, b: Bench) -> MetaTuner:
    return MetaTuner(copy.deepcopy(base), tok, MetaTunerSettings(target_modules=list(b.lora_targets), rank=b.lora_r))


def _optimizer(mt: MetaTuner, steps: int):
    params = mt.generator_parameters() + list(mt.hyper.parameters())
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    return params, optimizer, get_linear_schedule_with_warmup(optimizer, 0, steps)


def run_ours(base, tok, task, examples, b: Bench, steps: int) -> list[float]:
    """Seconds of each task-loss step (the first is the warm-up)."""
    torch.manual_seed(0)
    mt = _metatuner(base, tok, b)
    params, optimizer, scheduler = _optimizer(mt, steps + 1)
    p0 = task.default_prompt
    seconds = []
    for step in range(steps + 1):
        rows = examples[step * b.batch_size : (step + 1) * b.batch_size]
        start = now()
        requests = mt.rewrite_requests([p0] * len(rows), [ex.question for ex in rows])
        chats = [sft_pair[0] for sft_pair in _pairs(task, rows, tok)]
        with autocast(b.precision):
            with mt.role("writer"):
                h = mt.encode(requests)
            loss = mt.task_loss(chats, [ex.target for ex in rows], mt.hyper(h), b.max_length)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        seconds.append(now() - start)
    return seconds


def run_full_j(base, tok, task, examples, b: Bench, meter=PhaseTimer) -> tuple[float, PhaseTimer | PhaseFlops]:
    """One full J step (prompt writing, task loss, rollouts, SR loss, update) after one warm-up step: its seconds
    and its phases' meter (`PhaseTimer`: seconds per phase; `PhaseFlops`: FLOPs per phase)."""
    torch.manual_seed(0)
    mt = MetaTuner(copy.deepcopy(base), tok, MetaTunerSettings(
        target_modules=list(b.lora_targets), rank=b.lora_r, max_prompt_tokens=8 if b.quick else 48))
    params, optimizer, scheduler = _optimizer(mt, 2)
    store = ExpertPromptStore()
    for step in (1, 2):
        rows = examples[(step - 1) * b.batch_size : step * b.batch_size]
        timer = meter()
        start = now()
        with autocast(b.precision):
            j_step_backward(mt, task, rows, task.default_prompt, store, timer, b.max_length)
        with timer("backward"):
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        seconds = now() - start
    return seconds, timer


def _pairs(task, rows, tok):
    from metatuner.baselines.sft import sft_pairs

    return sft_pairs(task, rows, task.default_prompt, tok)


def trl_args(b: Bench, steps: int) -> argparse.Namespace:
    """The settings sft_loop_vs_trl's TRL trainer reads, matched to our step."""
    return argparse.Namespace(
        batch_size=b.batch_size, steps=steps, lr=LR, grad_clip=GRAD_CLIP, trl_optim="adamw_torch",
        mixed_precision=b.precision, max_length=b.max_length, seed=0, lora_r=b.lora_r, lora_alpha=float(b.lora_r),
        target_modules=",".join(b.lora_targets),
    )


def step_flops(base, tok, task, examples, dataset, b: Bench, steps: int) -> dict:
    """Matrix-product FLOPs of one step of each side, counted in runs of their own (the timed runs go without the
    counter): TRL's and our task-loss step as the mean over a run's steps, the J step's timed step by phase. What the
    J step must compute over what the TRL step computes is the floor of `j_step_over_trl` at equal FLOP/s."""
    with count_flops() as counter:
        _, trainer, _ = sft_bench.run_trl(base, tok, dataset, trl_args(b, steps), "cpu")
    trl = counter.get_total_flops() / (steps + 1)
    del trainer
    with count_flops() as counter:
        run_ours(base, tok, task, examples, b, steps)
    ours = counter.get_total_flops() / (steps + 1)
    _, meter = run_full_j(base, tok, task, examples, b, meter=PhaseFlops)
    j_step = sum(meter.flops.values())
    return {"trl_sft": trl, "metatuner_task_loss_step": ours, "j_step": j_step, "j_step_by_phase": meter.flops}


def metatuner_step_vs_trl_sft(b: Bench) -> dict:
    disable_progress_bars()
    steps = 1 if b.quick else 3
    repeats = b.repeats if b.quick else 3
    base, tok = b.load()
    task, examples = b.train_examples((steps + 1) * b.batch_size)
    pairs = _pairs(task, examples, tok)
    dataset = Dataset.from_list([{"prompt": p, "completion": c} for p, c in pairs])
    args = trl_args(b, steps)
    ours_s, trl_s, full_s, phases, tokenisation = [], [], [], [], None
    for _ in range(repeats):
        ours_s.append(Summary(run_ours(base, tok, task, examples, b, steps)[1:]).median)
        gc.collect()
        records, trainer, prepared = sft_bench.run_trl(base, tok, dataset, args, "cpu")
        trl_s.append(Summary([r["seconds"] for r in records[1:]]).median)
        if tokenisation is None:
            tokenisation = sft_bench.compare_tokenisation(tok, pairs, b.max_length, prepared)
        del trainer, prepared
        gc.collect()
        seconds, timer = run_full_j(base, tok, task, examples, b)
        full_s.append(seconds)
        phases.append(timer.seconds)
        gc.collect()
    flops = step_flops(base, tok, task, examples, dataset, b, steps)
    gflop = lambda n: round(n / 1e9, 2)  # noqa: E731
    ratio = round(Summary([a / b for a, b in zip(ours_s, trl_s)]).median, 4)  # per-repetition pairs
    j_ratio = round(Summary([j / t for j, t in zip(full_s, trl_s)]).median, 4)
    return {
        "ratio": ratio,
        "target": "<= 1.35",
        "what": "seconds per optimiser step: MetaTuner task-loss step (meta encoder k layers + hypernetwork + actor "
                "with per-query LoRA, backward, AdamW) / TRL SFTTrainer step with PEFT LoRA (same rank and targets)",
        "batch_size": b.batch_size, "timed_steps_per_repetition": steps, "repetitions": repeats,
        "precision": b.precision, "lora": {"r": b.lora_r, "targets": list(b.lora_targets)},
        "same_actor_tokens": tokenisation,
        "ours_seconds_per_step": Summary(ours_s).as_dict(), "trl_seconds_per_step": Summary(trl_s).as_dict(),
        "full_j_step_seconds": Summary(full_s).as_dict(),
        "j_step_over_trl": j_ratio,
        "j_step_what": "seconds of a whole MetaTuner-J step (write prompts, task loss, rollouts n=4 every step, SR "
                       "loss, update) / a TRL SFTTrainer step with PEFT LoRA on the same batch",
        "full_j_step_phases_seconds": {k: round(Summary([p.get(k, 0.0) for p in phases]).median, 3)
                                       for k in phases[0]},
        "full_j_step_settings": "n_rollouts 4, rollouts every step, likelihood reward, max_prompt_tokens "
                                + ("8" if b.quick else "48") + ", SR weight 1",
        "gflop_per_step": {k: gflop(v) for k, v in flops.items() if k != "j_step_by_phase"},
        "j_step_gflop_by_phase": {k: gflop(v) for k, v in flops["j_step_by_phase"].items()},
        "j_step_flops_over_trl": round(flops["j_step"] / flops["trl_sft"], 3),
        "gflop_per_s": {"trl_sft": gflop(flops["trl_sft"] / Summary(trl_s).median),
                        "metatuner_task_loss_step": gflop(flops["metatuner_task_loss_step"] / Summary(ours_s).median),
                        "j_step": gflop(flops["j_step"] / Summary(full_s).median)},
        "flops_what": "matrix-product FLOPs of one step (linear layers and LM head: forward, backward, checkpoint "
                      "recompute; attention not counted), torch's FlopCounterMode in untimed runs",
    }

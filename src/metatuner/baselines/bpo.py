"""BPO-like baseline: a trained rewriter of each query's prompt for a frozen M (after Cheng et al. 2023, "Black-Box
Prompt Optimization: Aligning Large Language Models without Model Training", arXiv 2311.04155).

    metatuner train --method bpo --config configs/sft-gsm8k.yaml bpo.actor_adapter=runs/sft-gsm8k/adapter --eval
    metatuner compare -c configs/compare-arithmetic.yaml --only bpo,bpo_zero_shot

BPO trains a sequence-to-sequence prompt optimiser on (original prompt, better prompt) pairs and puts it in front of
a model it never changes. Here:

1. **Pairs.** For every training query x, G samples `bpo.samples_per_query` rewrites of p0 at `bpo.temperature`
   from MetaTuner's rewrite request (`metatuner.rewrite_template`); each rewrite and p0 are scored through the
   frozen M (`bpo.reward`: the task's checker on M's answer, or the gold answer's likelihood). The best rewrite
   becomes x's pair (x, better prompt) only when it scores strictly above p0 (under `exact_match`, on the checker:
   a win on likelihood alone is not a better prompt); queries where nothing beats p0 give no pair. With
   `bpo.reject_answer_leaks` a rewrite that states the gold answer (`Task.states_answer`) is dropped before
   scoring.
2. **Training.** G's LoRA adapters (`metatuner.g_lora_r`, `g_lora_alpha`, `g_target_modules`, on G's base model)
   are fine-tuned on the pairs with the NLL of the better prompt given the request (MetaTuner's SR loss),
   `bpo.epochs` passes at `bpo.lr`, `train.batch_size` pairs per step.
3. **Use.** G writes one prompt per test query (greedy) and the frozen M answers under it.

M is the base model (`bpo.actor_adapter: null`) or a trained adapter kept frozen; `metatuner compare` runs both:
`bpo` with its SFT run's adapter and `bpo_zero_shot` with the base model. The run folder is a MetaTuner run folder
of the prompt branch alone (`config.yaml` with `metatuner.use_hyper: false`, `model/` with G's adapters and M's
frozen adapter), so `metatuner eval --run`, `infer --run` and `MetaTuner.from_pretrained` read it; beside it are
`pairs.jsonl` (every pair with its score and p0's), `train_metrics.json` (G's loss per step in
`history["train/sr_loss"]`) and TensorBoard scalars in `tb/`. It runs in one process, in the precision
`train.mixed_precision` resolves to.

**Sittings.** The pairs are collected a batch of `train.batch_size` queries at a time, each under its own seed, and
`pairs.progress.json` records every finished batch (`baselines.chunked_sampling`): `train.resume=auto` goes on
with the next batch and collects the pairs of an uninterrupted run. G's training on the pairs, a few minutes, starts
again in a resumed run; `train_seconds` counts the collection over every sitting.

Where ours differs from BPO: the paper builds its pairs from human preference data (a chosen and a rejected answer
per prompt) and has ChatGPT write the better prompt, then trains a separate 7B rewriter; here the better prompts
are G's own samples, judged by the task's checker through the frozen M that will answer them, and the rewriter is
G itself with LoRA adapters. One round of sampling, no iteration, as in BPO.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..batching import shuffled_batches
from ..config import RunConfig
from ..distributed import end_training
from ..tasks import check_lengths, token_counter
from ..tasks.base import Example, Task
from ..trainer import make_accelerator, open_run_folder, run_metrics, start_run, write_metrics
from .chunked_sampling import sample_in_chunks, sampled_with
from .prompt_writer import (build_prompt_writer, check_actor_adapter, checker_part, prompt_rewards,
                            prompt_writer_config)


def choose_better_prompt(p0_score, samples: list[str], scores: list) -> tuple[str, object] | None:
    """The best of `samples` (by `scores`, in the reward's order; the first of equals) and its score, when it beats
    p0 on the part that decides (`checker_part`); None when no sample does."""
    if not samples:
        return None
    best = max(range(len(samples)), key=lambda i: scores[i])
    if checker_part(scores[best]) > checker_part(p0_score):
        return samples[best], scores[best]
    return None


def rewrite_candidates(task: Task, example: Example, sampled: list[str], p0: str, reject_leaks: bool
                       ) -> tuple[list[str], int]:
    """The distinct non-empty rewrites other than p0, without those that state the gold answer when `reject_leaks`;
    and how many were dropped as leaks."""
    kept = [p for p in dict.fromkeys(sampled) if p and p != p0]
    if not reject_leaks:
        return kept, 0
    clean = [p for p in kept if not task.states_answer(p, example)]
    return clean, len(kept) - len(clean)


@torch.no_grad()
def better_prompt_pairs(mt, task: Task, rows: list[Example], p0: str, cfg: RunConfig, accelerator
                        ) -> tuple[list[dict], dict[str, int]]:
    """Sample, score and keep the (query, better prompt) pairs of a batch of training queries; with the counts the
    run reports."""
    s = cfg.bpo
    requests = mt.rewrite_requests([p0] * len(rows), [ex.question for ex in rows])
    with accelerator.autocast():
        sampled = mt.sample_prompts(requests, n=s.samples_per_query, temperature=s.temperature)
    pools, leaks = [], 0
    for ex, samples in zip(rows, sampled):
        kept, dropped = rewrite_candidates(task, ex, samples, p0, s.reject_answer_leaks)
        leaks += dropped
        pools.append([p0, *kept])
    owners = [ex for ex, pool in zip(rows, pools) for _ in pool]
    with accelerator.autocast():
        scores = prompt_rewards(mt, task, owners, [p for pool in pools for p in pool], s.reward, cfg.eval.batch_size)
    pairs, at = [], 0
    for ex, pool in zip(rows, pools):
        pool_scores, at = scores[at : at + len(pool)], at + len(pool)
        chosen = choose_better_prompt(pool_scores[0], pool[1:], pool_scores[1:])
        if chosen is not None:
            pairs.append({"id": ex.id, "question": ex.question, "prompt": chosen[0], "score": _jsonable(chosen[1]),
                          "p0_score": _jsonable(pool_scores[0]), "candidates": len(pool) - 1})
    return pairs, {"candidates_scored": len(owners), "answer_leaks": leaks,
                   "sampled": sum(len(samples) for samples in sampled)}


def _jsonable(score):
    return list(score) if isinstance(score, tuple) else score


def train_on_pairs(mt, pairs: list[dict], p0: str, cfg: RunConfig, accelerator) -> tuple[list[float], int]:
    """Fine-tune G's adapters on the pairs (the NLL of the better prompt given the request); the loss per step and
    the rows trained on."""
    params = mt.generator_parameters()
    optimizer = torch.optim.AdamW(params, lr=cfg.bpo.lr, weight_decay=cfg.train.weight_decay)
    batches = shuffled_batches(len(pairs), cfg.train.batch_size, random.Random(cfg.seed), min_rows=1)
    steps = -(-len(pairs) // cfg.train.batch_size) * cfg.bpo.epochs
    losses, seen = [], 0
    for _ in tqdm(range(steps), desc="bpo: train G", unit="step"):
        rows = [pairs[i] for i in next(batches)]
        seen += len(rows)
        requests = mt.rewrite_requests([p0] * len(rows), [r["question"] for r in rows])
        with accelerator.autocast():
            loss = mt.sr_loss(requests, [r["prompt"] for r in rows])
        loss.backward()
        if cfg.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        accelerator.log({"train/sr_loss": losses[-1]}, step=len(losses))
    mt.sync_frozen()  # G writes test prompts with the frozen copy of its prompt decoder: make it the trained one
    return losses, seen


def train_bpo(cfg: RunConfig) -> Path:
    """Collect (query, better prompt) pairs through the frozen M, then train G on them; returns the run folder."""
    check_actor_adapter(cfg.bpo.actor_adapter, "bpo.actor_adapter")
    cfg = prompt_writer_config(cfg)
    out = open_run_folder(cfg)
    accelerator, precision = make_accelerator(cfg, out)
    # config.yaml holds the prompt branch alone, so the run folder loads back with MetaTuner.from_pretrained
    run = start_run(cfg, out, accelerator.is_main_process, precision)
    accelerator.init_trackers("tb")
    task, p0 = run.task, run.p0
    start = time.perf_counter()
    mt = build_prompt_writer(cfg, str(accelerator.device), cfg.bpo.actor_adapter)
    mt.task, mt.p0 = task, p0
    examples = task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit)
    examples = check_lengths(examples, token_counter(mt.m_tok), cfg.train.max_length, cfg.data.on_bad_row)

    pairs, counts, rollout_seconds = sample_in_chunks(
        out, "pairs", examples, cfg.train.batch_size, cfg, sampled_with(cfg, "bpo", "metatuner", p0=p0),
        lambda rows: better_prompt_pairs(mt, task, rows, p0, cfg, accelerator), start)
    if not pairs:
        raise ValueError(f"no training query of {len(examples)} had a sampled prompt that beats p0 under M "
                         f"(bpo.reward={cfg.bpo.reward}): raise bpo.samples_per_query or bpo.temperature, or use "
                         "bpo.reward=likelihood")
    trained_from = time.perf_counter()
    losses, rows_trained = train_on_pairs(mt, pairs, p0, cfg, accelerator)
    mt.save(out / "model")
    write_metrics(out, run_metrics(
        "bpo", train_examples=len(examples) + rows_trained, unique_train_examples=len(examples), pairs=len(pairs),
        pair_share=round(len(pairs) / len(examples), 4), candidates_scored=counts["candidates_scored"],
        sampled_prompts=counts["sampled"], answer_leaks=counts["answer_leaks"], steps=len(losses),
        actor_adapter=cfg.bpo.actor_adapter, rollout_seconds=round(rollout_seconds, 1),
        train_seconds=round(rollout_seconds + time.perf_counter() - trained_from, 1), precision=precision.as_dict(),
        history={"train/sr_loss": losses}), accelerator, step=len(losses))
    end_training(accelerator)
    return out

"""RLPrompt-like baseline: one short task-level prompt written by a policy trained with REINFORCE on M's reward
(after Deng et al. 2022, "RLPrompt: Optimizing Discrete Text Prompts with Reinforcement Learning", arXiv 2205.12548).

    metatuner train --method rlprompt --config configs/sft-gsm8k.yaml train.max_steps=50 --eval
    metatuner compare -c configs/compare-arithmetic.yaml --only rlprompt

The policy is G with fresh LoRA adapters (`metatuner.g_lora_r`, `g_lora_alpha`, `g_target_modules`); its input is
one fixed request (`rlprompt.request_template`: p0 and `rlprompt.examples_in_request` training questions, drawn
once), so what it writes is a prompt for the whole task, not for a query. `rlprompt.dev_size` training items are
held out (never the test split); every step takes `train.batch_size` of the others:

1. the policy samples `rlprompt.samples_per_step` prompts (at most `rlprompt.max_prompt_tokens` tokens, at
   `rlprompt.temperature`);
2. the frozen M answers the step's questions under each prompt; a prompt's reward is its mean score over them
   (`rlprompt.reward`: the task's checker on M's answer, or the gold answer's likelihood);
3. REINFORCE: the rewards minus their mean (the baseline), divided by their standard deviation with
   `rlprompt.advantage=zscore`, weight each prompt's log-probability under the policy, and one AdamW step at
   `rlprompt.lr` follows (no step when all rewards tie).

`train.max_steps` steps, or `train.epochs` passes over the training items. Then the `rlprompt.finalists` prompts
with the best mean training reward, the policy's greedy prompt and p0 are scored on the dev set, and the best is
kept (p0 on ties, so the result is never below p0 on dev), as the OPRO-like search keeps its best. The run folder
gets `config.yaml`, `search.json` (p0, the best prompt and both dev scores, every sampled prompt with its step and
training reward, and the finalists' dev scores, in `baselines.opro`'s format), `best_prompt.txt`,
`train_metrics.json` and TensorBoard scalars of every step in `tb/`; evaluation runs the frozen M with
`best_prompt.txt`, as for the OPRO-like search. It runs in one process, in the precision `train.mixed_precision`
resolves to. With `train.save_every` a checkpoint every N steps (`checkpoints/step-N`: G's adapters, the optimizer,
the RNG states, the prompts tried so far and their rewards); `train.resume=auto` goes on from the newest as an
uninterrupted run would, and `train_seconds` counts every sitting.

Where ours differs from RLPrompt: the paper's policy is a frozen distilGPT-2 with a small trainable MLP that emits
a fixed number of prompt tokens (often ungrammatical), trained with soft Q-learning on shaped, per-input z-scored
rewards; here the policy is G with LoRA writing a natural-language prompt from a request, trained with REINFORCE
(log-probabilities of the decoded text, re-tokenised, with the end token), its rewards z-scored across the step's
samples, and the final prompt chosen on held-out training items.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..batching import full_batches
from ..checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from ..config import RunConfig
from ..distributed import end_training
from ..generation import lm_batch, sequence_logprobs
from ..trainer import make_accelerator, open_run_folder, run_metrics, start_run, write_metrics
from .opro import SearchResult, split_dev
from .prompt_writer import build_prompt_writer, checker_part, prompt_rewards, prompt_writer_config


def advantages(rewards: list[float], kind: str) -> list[float]:
    """REINFORCE's weights for one step's samples: the rewards minus their mean, over their standard deviation
    with `zscore`; all zero when the rewards tie."""
    mean = sum(rewards) / len(rewards)
    centred = [r - mean for r in rewards]
    if kind == "mean":
        return centred
    std = math.sqrt(sum(c * c for c in centred) / len(centred))
    return [c / std if std > 1e-8 else 0.0 for c in centred]


def reinforce_step(mt, request: str, prompts: list[str], weights: list[float], optimizer, grad_clip: float,
                   autocast) -> float:
    """One REINFORCE update of the policy (G's learner adapters): minimise -sum_k w_k log pi(prompt_k | request) / K.
    Returns the loss (0, and no update, when every weight is 0)."""
    if not any(weights):
        return 0.0
    with mt.role("learner"):
        batch = lm_batch(mt.g_tok, [request] * len(prompts), prompts, mt.settings.max_request_tokens,
                         device=mt.g.device)
        with autocast():
            logprobs, _ = sequence_logprobs(mt.g, batch)
        loss = -(torch.tensor(weights, device=logprobs.device) * logprobs.float()).mean()
        loss.backward()
    params = mt.generator_parameters()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


def mean_rewards(mt, task, examples, prompts: list[str], reward: str, batch_size: int, autocast) -> list[float]:
    """Each prompt's mean reward over `examples` under the frozen M (one batched scoring of every pair)."""
    with torch.no_grad(), autocast():
        scores = prompt_rewards(mt, task, [ex for _ in prompts for ex in examples],
                                [p for p in prompts for _ in examples], reward, batch_size)
    n = len(examples)
    return [sum(checker_part(s) for s in scores[k * n : (k + 1) * n]) / n for k in range(len(prompts))]


def train_rlprompt(cfg: RunConfig) -> Path:
    """Train the prompt policy with REINFORCE, choose the final prompt on the dev set; returns the run folder."""
    s = cfg.rlprompt
    cfg = prompt_writer_config(cfg, rewrite_template=s.request_template, max_prompt_tokens=s.max_prompt_tokens)
    out = open_run_folder(cfg)
    accelerator, precision = make_accelerator(cfg, out)
    run = start_run(cfg, out, accelerator.is_main_process, precision)
    accelerator.init_trackers("tb")
    task, p0 = run.task, run.p0
    start = time.perf_counter()
    examples = task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit)
    dev, pool = split_dev(examples, s.dev_size, cfg.seed)
    if not pool:
        raise ValueError(f"rlprompt.dev_size={s.dev_size} leaves none of the {len(examples)} training items to train "
                         "on: lower it or raise data.train_limit")
    rng = random.Random(cfg.seed)
    shown = rng.sample(pool, min(s.examples_in_request, len(pool)))
    mt = build_prompt_writer(cfg, str(accelerator.device))
    request = mt.rewrite_requests([p0], ["\n\n".join(ex.question for ex in shown)])[0]
    optimizer = torch.optim.AdamW(mt.generator_parameters(), lr=s.lr, weight_decay=cfg.train.weight_decay)
    batches = full_batches(len(pool), cfg.train.batch_size, rng)
    total_steps = cfg.train.max_steps or -(-len(pool) // cfg.train.batch_size) * cfg.train.epochs

    tried: dict[str, list[float]] = {}  # prompt -> its training rewards, in the order first sampled
    history, curves, scored = [], {"train/reward_mean": [], "train/reward_max": [], "train/policy_loss": []}, 0
    done, earlier = 0, 0.0
    resume_from = find_checkpoint(out, cfg.train.resume) if cfg.train.resume else None
    if resume_from is not None:
        ckpt = load_checkpoint(resume_from)
        mt.load_state(ckpt.tensors, ckpt.state["meta"], source=str(ckpt.path))
        for _ in range(ckpt.step):  # the batches the steps before took
            next(batches)
        tried, history, curves, scored = (ckpt.state[k] for k in ("tried", "history", "curves", "scored"))
        done, earlier = ckpt.step, ckpt.state["seconds"]
        ckpt.restore(optimizer)  # and the RNG states: the sampling goes on as in an uninterrupted run
    for step in tqdm(range(done + 1, total_steps + 1), initial=done, total=total_steps, desc="rlprompt", unit="step"):
        rows = [pool[i] for i in next(batches)]
        with torch.no_grad(), accelerator.autocast():
            prompts = mt.sample_prompts([request], n=s.samples_per_step, temperature=s.temperature)[0]
        rewards = mean_rewards(mt, task, rows, prompts, s.reward, cfg.eval.batch_size, accelerator.autocast)
        scored += len(rows) * len(prompts)
        loss = reinforce_step(mt, request, prompts, advantages(rewards, s.advantage), optimizer,
                              cfg.train.grad_clip, accelerator.autocast)
        for prompt, value in zip(prompts, rewards):
            tried.setdefault(prompt, []).append(value)
            history.append({"round": step, "source": "sample", "instruction": prompt, "score": value})
        for key, value in zip(curves, (sum(rewards) / len(rewards), max(rewards), loss)):
            curves[key].append(value)
        accelerator.log({key: values[-1] for key, values in curves.items()}, step=step)
        if cfg.train.save_every and step % cfg.train.save_every == 0 and step < total_steps:
            save_checkpoint(out, step, tensors=mt.trainable_state(), optimizer=optimizer,
                            keep=cfg.train.keep_checkpoints, state={
                                "meta": mt.meta(), "tried": tried, "history": history, "curves": curves,
                                "scored": scored, "seconds": earlier + time.perf_counter() - start})
    mt.sync_frozen()
    greedy = mt.write_prompts([request], with_grad=False).prompts[0]

    by_reward = sorted(tried, key=lambda p: -sum(tried[p]) / len(tried[p]))  # stable: earlier first among equals
    finalists = list(dict.fromkeys([p0, *by_reward[: s.finalists], greedy]))
    dev_scores = mean_rewards(mt, task, dev, finalists, s.reward, cfg.eval.batch_size, accelerator.autocast)
    scored += len(dev) * len(finalists)
    best = max(range(len(finalists)), key=lambda k: (dev_scores[k], -k))  # the first of equals: p0 on ties
    for k, prompt in enumerate(finalists):
        history.append({"round": total_steps + 1, "source": "p0" if k == 0 else "greedy" if prompt == greedy
                        else "finalist", "instruction": prompt, "score": dev_scores[k], "dev": True})
    seconds = earlier + time.perf_counter() - start
    result = SearchResult(scorer=s.reward, p0=p0, p0_score=dev_scores[0], best=finalists[best],
                          best_score=dev_scores[best], dev_ids=[ex.id for ex in dev], history=history,
                          instructions_scored=len(set(tried) | set(finalists)), examples_scored=scored,
                          seconds=seconds)
    result.write(out)
    write_metrics(out, run_metrics(
        "rlprompt", train_examples=scored, unique_train_examples=len(examples), steps=total_steps,
        train_seconds=round(seconds, 1), best_prompt=result.best, greedy_prompt=greedy, p0_dev_score=result.p0_score,
        best_dev_score=result.best_score, distinct_prompts_sampled=len(tried), precision=precision.as_dict(),
        history=curves), accelerator, step=total_steps)
    end_training(accelerator)
    return out

"""G as a trained prompt writer for a frozen M: what the BPO-like and RLPrompt-like baselines share.

    cfg = prompt_writer_config(cfg)                                   # G's prompt branch only, no parameter decoder
    mt = build_prompt_writer(cfg, device, actor_adapter="runs/sft/adapter")   # None: the base M
    rewards = prompt_rewards(mt, task, examples, prompts, "exact_match", batch_size=16)

G is the project's G: MetaTuner's model (`model.py`) with its prompt branch alone (`metatuner.use_hyper=false`), so
it has the same LoRA adapters (`metatuner.g_lora_r`, `g_lora_alpha`, `g_target_modules`), writes from the same
request (`metatuner.rewrite_template`) and samples and decodes as MetaTuner's rollouts do. M is frozen: the base
model, or a trained PEFT adapter loaded as M's static adapter (the SFT baseline's). A prompt is scored through M as
MetaTuner's rollouts score their candidates (`rollouts.candidate_scores`): the task's checker on M's greedy answer
with the gold answer's likelihood as a tie-break (`exact_match`), or that likelihood alone (`likelihood`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Sequence

from ..config import RunConfig
from ..generation import task_chats
from ..model import MetaTuner, build_metatuner
from ..rollouts import candidate_scores
from ..tasks.base import Example, Task


def prompt_writer_config(cfg: RunConfig, **settings) -> RunConfig:
    """`cfg` with G writing prompts only (no parameter decoder, no warm-up of M), `settings` over `metatuner.*`. A
    run folder whose config.yaml holds it loads back with `MetaTuner.from_pretrained`.

    Without a parameter decoder, where G is split does not matter: its LoRA adapters cover every layer either way
    (`shared` below k, `prompt` from k on, trained together), so k is set to 1, which every G of two or more layers
    allows."""
    return replace(cfg, metatuner=replace(cfg.metatuner, use_hyper=False, use_prompt=True, share=True, share_depth=1,
                                          g_finetune="lora", warmup_actor_steps=0, warmup_actor_adapter=None,
                                          **settings))


def build_prompt_writer(cfg: RunConfig, device: str, actor_adapter: str | None = None) -> MetaTuner:
    """G with fresh prompt-writing LoRA adapters, and M frozen with `actor_adapter` (a PEFT adapter) or without."""
    mt = build_metatuner(cfg, device)
    if actor_adapter:
        mt.load_actor_adapter(actor_adapter)  # frozen: only G's adapters are trainable
    return mt


def check_actor_adapter(path: str | None, key: str) -> None:
    """Fail before any model loads when the config names an adapter folder that holds none."""
    if path and not (Path(path) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"{key}: no PEFT adapter (adapter_config.json) in {path}")


def prompt_rewards(mt: MetaTuner, task: Task, examples: Sequence[Example], prompts: Sequence[str], reward: str,
                   batch_size: int) -> list:
    """M's score for each (prompt, example) pair: (checker, likelihood) tuples with `exact_match`, floats with
    `likelihood`; compare them as they are (tuples in that order), or by `checker_part`."""
    chats = task_chats(mt.m_tok, task, prompts, examples)
    return candidate_scores(mt, task, list(examples), chats, None, reward, batch_size)


def checker_part(score) -> float:
    """The part of a `prompt_rewards` score that decides: the checker's under exact_match, else the likelihood."""
    return float(score[0]) if isinstance(score, tuple) else float(score)

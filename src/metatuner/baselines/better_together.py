"""BetterTogether-like baseline (Soylu et al. 2024, "Fine-Tuning and Prompt Optimization: Two Great Steps that
Work Better Together"): instruction search, then LoRA SFT under the found instruction, then a second search.

    metatuner train --config configs/better_together-arithmetic.yaml --eval     # embedded SmolLM2-135M, CPU
    metatuner train --method better_together --config configs/sft-gsm8k.yaml --eval

The three phases share the run folder and the training budget:
1. the OPRO-like search of `baselines.opro` (settings under `search.*`) from p0, with the base actor;
2. LoRA SFT (`baselines.sft.train_sft`, settings under `train.*` and `lora.*`) on (found instruction, x) -> y;
3. a second search with the SFT adapter on the actor, starting from the first search's instruction and p0, since
   the fine-tuned actor may now prefer different wording. G proposes with its base weights: when G and M share a
   checkpoint the adapter is switched off for G's turn, so the adapter never writes instructions.

The run folder gets `config.yaml`, `adapter/` (a PEFT adapter), TensorBoard scalars under `tb/` (the SFT's
`train/...` by step, each search's rounds as `search_before_sft/train/...` and `search_after_sft/train/...`),
`best_prompt.txt` (the second search's result), `search.json` (`before_sft` and `after_sft`, each in
`baselines.opro`'s format) and `train_metrics.json` (the phases' seconds and examples summed, each phase's own
numbers under `phases`, and their histories under `history` as `<phase>/<key>`, e.g. `sft/train/loss` and
`search_after_sft/train/best_score`). `--eval` evaluates the actor with the adapter and the found instruction.
Under `accelerate launch` each phase runs data parallel: the searches score their dev sets in N shards (see
`baselines.opro`) and the SFT trains on N shards of every batch; only the main process writes.
"""

from __future__ import annotations

import gc
import json
from dataclasses import replace
from pathlib import Path

import torch
from accelerate import PartialState
from peft import PeftModel

from ..config import RunConfig, to_yaml
from ..models import load_generator_and_actor
from ..trainer import open_run_folder, run_metrics, start_run, start_tracker, write_metrics
from .opro import search_device, search_instructions, search_metrics, search_settings_kwargs
from .sft import train_sft


def train_better_together(cfg: RunConfig) -> Path:
    """Search, SFT under the found instruction, search again; returns the run folder."""
    out = open_run_folder(cfg)
    # PartialState, not Accelerator: it sets up the processes without fixing a mixed precision, which the SFT
    # phase (or a later method in `metatuner compare`) chooses when it makes its own Accelerator.
    state = PartialState(cpu=cfg.model.device == "cpu")
    run = start_run(cfg, out, state.is_main_process)
    task, p0 = run.task, run.p0
    examples = task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit)
    tracker = start_tracker(out)
    kwargs = {**search_settings_kwargs(cfg), "accelerator": state, "tracker": tracker}

    generator, actor, g_tok, m_tok = _load(cfg, state)
    first = search_instructions(actor, m_tok, task, examples, [p0], cfg.search, generator=generator,
                                g_tokenizer=g_tok, desc="search 1/2", tag_prefix="search_before_sft/", **kwargs)
    del generator, actor
    gc.collect()  # the SFT phase loads its own copy of the actor
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    # The same SFT as the baseline, only with the found instruction in place of p0; it writes adapter/, tb/ and
    # its own train_metrics.json into the run folder (the latter is folded into ours below).
    train_sft(replace(cfg, output_dir=str(out), data=replace(cfg.data, prompt=first.best)))
    sft_metrics = json.loads((out / "train_metrics.json").read_text())

    generator, actor, g_tok, m_tok = _load(cfg, state)
    shared = generator is actor
    actor = PeftModel.from_pretrained(actor, out / "adapter").eval()
    second = search_instructions(
        actor, m_tok, task, examples, [first.best, p0], cfg.search,
        generator=actor if shared else generator, g_tokenizer=g_tok,
        generator_context=actor.disable_adapter if shared else None, desc="search 2/2",
        tag_prefix="search_after_sft/", **kwargs)
    if not state.is_main_process:
        state.wait_for_everyone()
        return out

    (out / "config.yaml").write_text(to_yaml(cfg))  # the run's own config, not the SFT phase's copy
    (out / "search.json").write_text(json.dumps(
        {"before_sft": first.to_dict(), "after_sft": second.to_dict()}, indent=2, ensure_ascii=False) + "\n")
    (out / "best_prompt.txt").write_text(second.best + "\n")
    phases = {"search_before_sft": search_metrics(first, len(first.dev_ids)), "sft": sft_metrics,
              "search_after_sft": search_metrics(second, len(second.dev_ids))}
    write_metrics(out, run_metrics(
        "better_together", train_seconds=round(sum(p["train_seconds"] for p in phases.values()), 1),
        train_examples=sum(p["train_examples"] for p in phases.values()), unique_train_examples=len(examples),
        history={f"{name}/{k}": v for name, phase in phases.items() for k, v in phase["history"].items()},
        best_prompt=second.best, sft_prompt=first.best, phases=phases), tracker)
    tracker.finish()
    state.wait_for_everyone()
    return out


def _load(cfg: RunConfig, state):
    return load_generator_and_actor(cfg.model.name, cfg.model.actor, cfg.model.dtype, search_device(cfg, state),
                                    cfg.model.trust_remote_code)

"""Evaluation: answer every item, check it with the task's own checker, and write a run folder.

    result = evaluate(model, tokenizer, task, examples, prompts=task.default_prompt)
    result.write("runs/eval-gsm8k")      # metrics.json + samples.jsonl

`prompts` is one instruction for every item (zero-shot, SFT, task-level search) or one per item (MetaTuner's
query-specific prompts). Multiple-choice tasks are scored either by ranking the options' likelihoods or by parsing
a generated letter; in both cases the chosen output goes through `task.score`, so there is one checker.
From the shell: `metatuner eval --model M --task T [--data-path P] [--limit N] [--prompt P0]`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .generation import BatchContext, generate, score_choices, task_chats
from .stats import paired_bootstrap  # noqa: F401 (re-exported: its home before stats.py)
from .tasks.base import Example, Task


@dataclass
class EvalResult:
    metrics: dict
    samples: list[dict] = field(default_factory=list)

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n")
        with open(out / "samples.jsonl", "w") as f:
            for s in self.samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")
        return out


def evaluate(
    model,
    tokenizer,
    task: Task,
    examples: Sequence[Example],
    prompts: str | Sequence[str] | None = None,
    *,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    mc_mode: str = "likelihood",
    batch_context: BatchContext | None = None,
    progress: bool = True,
) -> EvalResult:
    """Score `model` on `examples`; `prompts` is one instruction for all or one per example (default: p0)."""
    if not examples:
        raise ValueError(f"no examples to evaluate for task {task.name}")
    if prompts is None or isinstance(prompts, str):
        prompts = [task.default_prompt if prompts is None else prompts] * len(examples)
    if len(prompts) != len(examples):
        raise ValueError(f"{len(prompts)} prompts for {len(examples)} examples")
    chats = task_chats(tokenizer, task, prompts, examples)
    start = time.perf_counter()
    generated_tokens = 0
    if mc_mode == "likelihood" and task.choice_targets(examples[0]) is not None:
        outputs = _rank_choices(model, tokenizer, task, examples, chats, batch_size, batch_context, progress)
    else:
        gen = generate(
            model, tokenizer, chats,
            max_new_tokens=max_new_tokens or task.max_new_tokens,
            stop_strings=task.stop_strings, batch_size=batch_size,
            batch_context=batch_context, progress=progress, desc=f"eval {task.name}",
        )
        outputs, generated_tokens = gen.texts, sum(gen.new_tokens)
    seconds = time.perf_counter() - start

    samples, totals = [], {m: 0.0 for m in task.metrics}
    for ex, prompt, output in zip(examples, prompts, outputs):
        scores = task.score(output, ex)
        for m in task.metrics:
            totals[m] += scores[m]
        samples.append({
            "id": ex.id, "input": ex.question, "prompt": prompt, "output": output,
            "extracted": task.extract(output), "answer": ex.answer, "scores": scores,
            "correct": bool(scores[task.primary_metric] >= 1.0),
        })
    n = len(examples)
    metrics = {m: totals[m] / n for m in task.metrics}
    metrics.update({
        "task": task.name, "n_eval": n, "seconds": round(seconds, 2),
        "mode": "likelihood" if generated_tokens == 0 and task.choice_targets(examples[0]) else "generate",
        "generated_tokens": generated_tokens,
        "tokens_per_s": round(generated_tokens / seconds, 2) if generated_tokens else None,
        "examples_per_s": round(n / seconds, 3),
    })
    return EvalResult(metrics, samples)


def _rank_choices(model, tokenizer, task, examples, chats, batch_size, batch_context, progress) -> list[str]:
    """The option with the highest mean token log-likelihood, for every example.

    The options of an example share its prompt's KV cache (`score_choices`), so a 4-way question costs one
    prompt forward plus four short option forwards rather than four full ones.
    """
    options = [task.choice_targets(ex) for ex in examples]
    scores = score_choices(model, tokenizer, chats, options, batch_size=batch_size, batch_context=batch_context,
                           progress=progress)
    best = []
    for targets, option_scores in zip(options, scores):
        means = option_means(option_scores)
        best.append(targets[max(range(len(targets)), key=means.__getitem__)])  # first of equals, as before
    return best


def option_means(option_scores: list[tuple[float, int]]) -> list[float]:
    """Mean token log-likelihood of each option from `score_choices`' (sum, count): the rule options are ranked by."""
    return [logprob / max(count, 1) for logprob, count in option_scores]

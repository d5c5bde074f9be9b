"""What an untrained generator G writes when asked to rewrite p0 for a question: the starting point of the prompt
branch, before any rollout or SR step. Greedy, on the first test questions of a task, for each model and template.

    python benchmarks/rewrite_probe.py --out docs/results/rewrite-probe.json            # SmolLM2-135M only
    python benchmarks/rewrite_probe.py --model embedded:smollm2-135m-instruct \
        --model embedded:qwen2.5-coder-0.5b-instruct --out docs/results/rewrite-probe.json

For each written prompt it records whether it states the question's gold answer (the task's checker scores the
prompt itself as correct) and whether it is an answer at all ("The answer is ..."), next to the question.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from metatuner.config import DEFAULT_REWRITE_TEMPLATE
from metatuner.generation import chat_prompt, generate
from metatuner.models import load_model
from metatuner.runtime import command_line, cpu_bf16
from metatuner.tasks import get_task

# A one-shot template: the same request with one worked rewrite that names the numbers and steps without solving.
ONE_SHOT_TEMPLATE = (
    "Rewrite the instruction so that it fits the question: name the numbers and the steps, but do not solve it. "
    "Reply with the rewritten instruction only.\n\n"
    "Example\nInstruction: {instruction}\nQuestion: What is 12 + 7 - 3?\n"
    "Rewritten: First add 12 and 7, then subtract 3 from that sum. End with 'The answer is N.'\n\n"
    "Instruction: {instruction}\nQuestion: {question}\nRewritten:"
)
TEMPLATES = {"default": DEFAULT_REWRITE_TEMPLATE, "one_shot": ONE_SHOT_TEMPLATE}
_ANSWER_RE = re.compile(r"^\s*The (final )?answer is\b", re.IGNORECASE)


def probe(model_name: str, task, examples, max_new_tokens: int) -> dict:
    model, tokenizer = load_model(model_name, "bfloat16" if cpu_bf16().native else "float32", "cpu")
    result = {}
    for name, template in TEMPLATES.items():
        requests = [chat_prompt(tokenizer, [{"role": "user", "content": template.format(
            instruction=task.default_prompt, question=ex.question)}]) for ex in examples]
        with torch.no_grad():
            written = generate(model, tokenizer, requests, max_new_tokens=max_new_tokens).texts
        rows = [{"id": ex.id, "question": ex.question, "answer": ex.answer, "written": text.strip(),
                 "states_gold_answer": task.states_answer(text, ex), "is_an_answer": bool(_ANSWER_RE.match(text))}
                for ex, text in zip(examples, written)]
        result[name] = {"answers": sum(r["is_an_answer"] for r in rows),
                        "states_gold_answer": sum(r["states_gold_answer"] for r in rows), "rows": rows}
        print(f"{model_name} / {name}: {result[name]['answers']} of {len(rows)} are answers, "
              f"{result[name]['states_gold_answer']} state the gold answer")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="G to probe (repeatable; default: the embedded SmolLM2)")
    p.add_argument("--items", type=int, default=8, help="first N test questions")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--out", required=True)
    args = p.parse_args()
    task_options = dict(size=400, test_size=1000, min_terms=2, max_terms=3, min_digits=1, max_digits=2)
    task = get_task("rg:chain_sum", **task_options)  # the arithmetic comparison's test split
    examples = task.load("test")[: args.items]
    models = args.model or ["embedded:smollm2-135m-instruct"]
    results = {"command": command_line(), "task": "rg:chain_sum", "task_options": task_options,
               "templates": TEMPLATES, "p0": task.default_prompt, "decoding": "greedy",
               "cpu": cpu_bf16().describe(),
               "models": {m: probe(m, task, examples, args.max_new_tokens) for m in models}}
    Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

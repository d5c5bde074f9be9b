"""What an untrained generator G writes when asked to rewrite p0 for a question: the starting point of the prompt
branch, before any rollout or SR step. Greedy, on the first test questions of a task, for each model and template.

    python benchmarks/rewrite_probe.py --out docs/results/rewrite-probe.json            # SmolLM2-135M only
    python benchmarks/rewrite_probe.py --model embedded:smollm2-135m-instruct \
        --model embedded:qwen2.5-coder-0.5b-instruct --out docs/results/rewrite-probe.json
    python benchmarks/rewrite_probe.py --model embedded:qwen2.5-coder-0.5b-instruct --template one_shot \
        --items 200 --max-new-tokens 40 --answer-with runs/levers-arithmetic/sft/adapter --out probe.json

For each written prompt it records whether it states the question's gold answer (`Task.states_answer`) and whether
it is an answer at all ("The answer is ..."), next to the question. With `--answer-with ADAPTER`, M (the SmolLM2
actor with that PEFT adapter, frozen) also answers every question under its written prompt and under p0: M's
accuracy under each, the paired interval of the difference, and the same on the questions whose prompt does not
state the gold answer, which is what the written wording itself is worth to M with no training of G at all.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from metatuner.config import DEFAULT_REWRITE_TEMPLATE
from metatuner.evaluate import evaluate
from metatuner.generation import chat_prompt, generate
from metatuner.models import load_model
from metatuner.prompt_answers import answers_in_prompts
from metatuner.runtime import command_line, cpu_bf16
from metatuner.stats import paired_bootstrap
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


def dtype() -> str:
    return "bfloat16" if cpu_bf16().native else "float32"


def probe(model_name: str, task, examples, max_new_tokens: int, templates: list[str]) -> dict:
    model, tokenizer = load_model(model_name, dtype(), "cpu")
    result = {}
    for name in templates:
        template = TEMPLATES[name]
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


def answer_under(actor: str, adapter: str, task, examples, probed: dict) -> dict:
    """M's accuracy under each written prompt and under p0, on the same questions, with the paired intervals."""
    from peft import PeftModel

    model, tokenizer = load_model(actor, dtype(), "cpu")
    model = PeftModel.from_pretrained(model, adapter).eval()
    under_p0 = evaluate(model, tokenizer, task, examples, None, batch_size=32, progress=False).samples
    out = {"actor": actor, "adapter": adapter, "p0_accuracy": _mean(s["correct"] for s in under_p0)}
    for model_name, by_template in probed.items():
        for name, written in by_template.items():
            rows = written["rows"]
            samples = evaluate(model, tokenizer, task, examples, [r["written"] for r in rows], batch_size=32,
                               progress=False).samples
            for row, sample in zip(rows, samples):
                row["m_output"], row["m_correct"] = sample["output"], sample["correct"]
            clean = [i for i, r in enumerate(rows) if not r["states_gold_answer"]]
            written["m_under_written"] = _compare([s["correct"] for s in samples], [s["correct"] for s in under_p0])
            written["m_under_written_without_gold"] = _compare([samples[i]["correct"] for i in clean],
                                                               [under_p0[i]["correct"] for i in clean])
            written["answers_in_prompts"] = answers_in_prompts(samples)
            print(f"{model_name} / {name}: M {written['m_under_written']}; "
                  f"without the {len(rows) - len(clean)} that state the gold answer {written['m_under_written_without_gold']}")
    return out


def _mean(values) -> float:
    values = [float(v) for v in values]
    return round(sum(values) / len(values), 4) if values else float("nan")


def _compare(written: list[bool], p0: list[bool]) -> dict:
    """Accuracy under the written prompts and under p0 on the same questions, and the 95% interval of the difference."""
    if not written:
        return {"items": 0}
    low, high = paired_bootstrap([float(x) for x in written], [float(x) for x in p0])
    return {"items": len(written), "accuracy": _mean(written), "p0_accuracy": _mean(p0),
            "written_minus_p0": [round(low, 4), round(high, 4)]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", help="G to probe (repeatable; default: the embedded SmolLM2)")
    p.add_argument("--items", type=int, default=8, help="first N test questions")
    p.add_argument("--max-new-tokens", type=int, default=30)
    p.add_argument("--template", action="append", choices=list(TEMPLATES),
                   help="rewrite request(s) to probe (repeatable; default: all)")
    p.add_argument("--answer-with", metavar="ADAPTER",
                   help="a PEFT adapter of the actor: M answers under every written prompt and under p0")
    p.add_argument("--actor", default="embedded:smollm2-135m-instruct", help="M's base model for --answer-with")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    task_options = dict(size=400, test_size=1000, min_terms=2, max_terms=3, min_digits=1, max_digits=2)
    task = get_task("rg:chain_sum", **task_options)  # the arithmetic comparison's test split
    examples = task.load("test")[: args.items]
    models = args.model or ["embedded:smollm2-135m-instruct"]
    templates = args.template or list(TEMPLATES)
    results = {"command": command_line(), "task": "rg:chain_sum", "task_options": task_options,
               "templates": {name: TEMPLATES[name] for name in templates}, "p0": task.default_prompt,
               "decoding": "greedy", "cpu": cpu_bf16().describe(),
               "models": {m: probe(m, task, examples, args.max_new_tokens, templates) for m in models}}
    if args.answer_with:
        results["answering"] = answer_under(args.actor, args.answer_with, task, examples, results["models"])
    Path(args.out).write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()

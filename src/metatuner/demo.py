"""`make demo`: MetaTuner end to end on the embedded SmolLM2-135M-Instruct, offline, on a laptop CPU.

    python -m metatuner.demo [--config configs/demo-arithmetic.yaml] [key=value ...]

It trains LoRA SFT (the baseline, and MetaTuner's warm-up of M), then MetaTuner-J on a small slice of a
reasoning-gym arithmetic task, evaluates zero-shot, SFT and MetaTuner-J on the same held-out items, and prints a
table and three prompts that G wrote. Everything lands in runs/demo/.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

from peft import PeftModel

from .baselines.sft import train_sft
from .config import load_config
from .evaluate import evaluate
from .model import MetaTuner
from .models import load_model
from .runtime import command_line, resolve_precision
from .tasks import get_task
from .train import train_metatuner

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo-arithmetic.yaml"


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    config = DEFAULT_CONFIG
    if argv[:1] == ["--config"]:
        config, argv = Path(argv[1]), argv[2:]
    cfg = load_config(config, argv)
    precision = resolve_precision(cfg.train.mixed_precision, cfg.model.device)
    precision.announce()  # before minutes of work
    root = Path(cfg.output_dir)
    task = get_task(cfg.data.task, **cfg.data.task_kwargs())
    test = task.load(cfg.data.eval_split, path=cfg.data.eval_path, limit=cfg.data.eval_limit)
    rows, started = [], time.perf_counter()

    print(f"[1/4] zero-shot on {len(test)} held-out items of {task.name}")
    model, tokenizer = load_model(cfg.model.name, device=cfg.model.device)
    rows.append(_row("zero-shot", evaluate(model, tokenizer, task, test, cfg.data.prompt,
                                           batch_size=cfg.eval.batch_size, mc_mode=cfg.eval.mc_mode), 0))

    print(f"[2/4] LoRA SFT on {cfg.data.train_limit} training items")
    sft_cfg = replace(cfg, method="sft", output_dir=str(root / "sft"))
    sft_dir = train_sft(sft_cfg)
    sft_seconds = json.loads((sft_dir / "train_metrics.json").read_text())["train_seconds"]

    sft_model = PeftModel.from_pretrained(load_model(cfg.model.name, device=cfg.model.device)[0], sft_dir / "adapter")
    rows.append(_row("LoRA SFT", evaluate(sft_model.eval(), tokenizer, task, test, cfg.data.prompt,
                                          batch_size=cfg.eval.batch_size, mc_mode=cfg.eval.mc_mode), sft_seconds))

    print("[3/4] MetaTuner-J (warm-up: the SFT adapter for M, one rejection-sampling round for G)")
    mt_cfg = replace(cfg, method="metatuner", output_dir=str(root / "metatuner_j"),
                     metatuner=replace(cfg.metatuner, warmup_actor_adapter=str(sft_dir / "adapter")))
    mt_dir = train_metatuner(mt_cfg)
    mt_seconds = json.loads((mt_dir / "train_metrics.json").read_text())["train_seconds"]

    print("[4/4] evaluating MetaTuner-J")
    mt = MetaTuner.from_pretrained(mt_dir, device=cfg.model.device)
    result = mt.evaluate(test, batch_size=cfg.eval.batch_size, mc_mode=cfg.eval.mc_mode)
    result.write(mt_dir / "eval")
    rows.append(_row("MetaTuner-J", result, sft_seconds + mt_seconds))

    metric = task.primary_metric
    print(f"\n{task.name}, {len(test)} held-out items, embedded SmolLM2-135M-Instruct, CPU\n")
    print(f"| method | {metric} | train s (incl. warm-up) | eval s |")
    print("|---|---|---|---|")
    for name, score, train_s, eval_s in rows:
        print(f"| {name} | {score:.3f} | {train_s:.0f} | {eval_s:.0f} |")
    print("\nPrompts MetaTuner wrote for three test questions:")
    for sample in result.samples[:3]:
        print(f"- Q: {sample['input']}\n  prompt: {sample['prompt']!r}\n  answer: {sample['output']!r}"
              f" ({'correct' if sample['correct'] else 'wrong'}, gold {sample['answer']})")
    summary = {"task": task.name, "n_eval": len(test), "rows": rows, "seconds": round(time.perf_counter() - started),
               "precision": precision.as_dict(),
               "command": command_line()}
    (root / "demo.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwhole demo: {summary['seconds']} s; results in {root}/")


def _row(name, result, train_seconds):
    metric = next(iter(result.metrics))
    return name, result.metrics[metric], train_seconds, result.metrics["seconds"]


if __name__ == "__main__":
    main()

"""One training run in its own process, for peak memory (peak RSS is per process) and the scaling table.

    python benchmarks/train_worker.py --mode metatuner --model embedded:smollm2-135m-instruct --batch-size 8
    python benchmarks/train_worker.py --mode sft --model embedded:smollm2-135m-instruct --batch-size 8

Prints one JSON line: seconds of every step (the first is a warm-up), RSS after loading the model, and the peak
RSS of the process. metatuner: a schedule-J step (`bench_setup.j_step_backward`: prompt writing, task loss and its
backward, rollouts every step, SR loss and its backward; then AdamW); sft: the LoRA SFT step of `metatuner.baselines.sft` (PEFT LoRA with the project's
default SFT settings, backward, AdamW), on the same batches. Both under bf16 autocast unless --precision fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common  # noqa: E402
from bench_setup import TRAIN_TASK  # noqa: E402
from common import autocast, now  # noqa: E402

from metatuner.runtime import peak_rss_mb, rss_mb  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["metatuner", "sft"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    p.add_argument("--n-rollouts", type=int, default=4)
    p.add_argument("--share-depth", type=float, default=0.25)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-prompt-tokens", type=int, default=48)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--no-sr-checkpoint", action="store_true",
                   help="metatuner: keep the SR loss's whole graph (MetaTuner.checkpoint_sr off; its A/B)")
    p.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=["cpu", "wall"], default="wall", help="see benchmarks/common.py CLOCK")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.CLOCK = args.clock
    from metatuner.config import RunConfig
    from metatuner.tasks import get_task

    cfg = RunConfig()
    cfg.model.name, cfg.model.device = args.model, "cpu"
    cfg.data.task, cfg.data.task_options = TRAIN_TASK[0], dict(TRAIN_TASK[1])
    cfg.train.batch_size, cfg.train.max_length = args.batch_size, args.max_length
    s = cfg.metatuner
    s.n_rollouts, s.share_depth, s.rank, s.max_prompt_tokens = args.n_rollouts, args.share_depth, args.rank, \
        args.max_prompt_tokens
    task = get_task(cfg.data.task, **cfg.data.task_kwargs())
    examples = task.load("train", limit=(args.steps + 1) * args.batch_size)
    p0 = task.default_prompt
    torch.manual_seed(0)
    step_fn, loaded = (_metatuner_step if args.mode == "metatuner" else _sft_step)(cfg, task, p0, args.no_sr_checkpoint)
    after_load = rss_mb()
    seconds, phases = [], {}
    for step in range(1, args.steps + 2):
        rows = examples[(step - 1) * args.batch_size : step * args.batch_size]
        start = now()
        step_phases = step_fn(rows, step, args.precision)
        seconds.append(now() - start)
        phases = step_phases
    result = {"mode": args.mode, "step_seconds": [round(x, 4) for x in seconds], "rss_after_load_mb": after_load,
              "peak_rss_mb": peak_rss_mb(), "last_step_phases": phases, "settings": vars(args), **loaded}
    print(json.dumps(result))
    return result


def _metatuner_step(cfg, task, p0, no_sr_checkpoint=False):
    from bench_setup import PhaseTimer, j_step_backward
    from metatuner.model import MetaTuner
    from metatuner.models import load_model
    from metatuner.rollouts import ExpertPromptStore

    model, tok = load_model(cfg.model.name, cfg.model.dtype, "cpu")
    mt = MetaTuner(model, tok, cfg.metatuner)  # G = M: one set of base weights, as the default configs
    mt.checkpoint_sr = not no_sr_checkpoint
    params = mt.generator_parameters() + list(mt.hyper.parameters())
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)
    store = ExpertPromptStore()

    def step(rows, index, precision):
        timer = PhaseTimer()
        with autocast(precision):  # as metatuner.train: forward under autocast, backward outside
            j_step_backward(mt, task, rows, p0, store, timer, cfg.train.max_length)
        with timer("backward"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return {k: round(v, 3) for k, v in timer.seconds.items()}

    return step, {"trainable_parameters": sum(p.numel() for p in params)}


def _sft_step(cfg, task, p0, no_sr_checkpoint=False):
    from peft import LoraConfig, get_peft_model

    from metatuner.baselines.sft import sft_pairs
    from metatuner.generation import lm_batch, lm_loss
    from metatuner.models import load_model

    model, tok = load_model(cfg.model.name, cfg.model.dtype, "cpu")
    model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=0.0,
                                             target_modules=list(cfg.lora.target_modules), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=2e-4, weight_decay=0.0)

    def step(rows, index, precision):
        pairs = sft_pairs(task, rows, p0, tok)
        batch = lm_batch(tok, [p for p, _ in pairs], [t for _, t in pairs], cfg.train.max_length)
        with autocast(precision):
            loss = lm_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        return {}

    return step, {"trainable_parameters": sum(p.numel() for p in params)}


if __name__ == "__main__":
    main()

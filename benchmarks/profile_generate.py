"""Where batched decoding spends its CPU time: `metatuner.generation.generate` under torch.profiler, top operators.

Run from the repository root with the project's environment:

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_generate.py                  # SmolLM2-135M, batch 16
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/profile_generate.py --precision bf16 --max-new-tokens 64

It prints the CPU seconds, new tokens per CPU second and the operators that took the most CPU time; the precision
defaults to what training's `auto` picks on this CPU (bf16 autocast only where bf16 is native).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from metatuner.generation import chat_prompt, generate
from metatuner.models import load_model
from metatuner.runtime import cpu_bf16, resolve_precision


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--batch", type=int, default=16, help="prompts, all decoded in one batch")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto")
    p.add_argument("--rows", type=int, default=12, help="operators to print")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    precision = "bf16" if resolve_precision(args.precision, "cpu").mixed_precision == "bf16" else "fp32"
    model, tok = load_model(args.model, "float32", "cpu")
    chats = [chat_prompt(tok, [{"role": "user", "content": f"What is {i} + {7 * i}? Explain briefly."}])
             for i in range(args.batch)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        generate(model, tok, chats[:2], max_new_tokens=4, batch_size=2)  # warm-up outside the profile
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.process_time()
            out = generate(model, tok, chats, max_new_tokens=args.max_new_tokens, batch_size=args.batch)
            seconds = time.process_time() - start
    new = sum(out.new_tokens)
    print(f"{cpu_bf16().describe()}; {precision}; batch {args.batch}: {seconds:.2f} CPU s, {new} new tokens, "
          f"{new / seconds:.1f} new tokens per CPU second")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))


if __name__ == "__main__":
    main()

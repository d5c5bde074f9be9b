"""fp32 against bf16 autocast for one LoRA training step, on this CPU: the measurement behind `auto` (runtime.py).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/precision.py                       # this CPU as it is
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/precision.py                                    # as a CPU without native bf16

A randomly initialised model of SmolLM2-135M's shape (30 layers, width 576) with PEFT LoRA r=16 on all seven
linear types, batch 8 x 64 tokens: forward with the LM loss, backward, both precisions in turns, CPU-time clock.
Writes docs/performance/precision-<capability>.json with the CPU, the precision `auto` picks and the seconds.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from common import Summary, command_line, interleaved, machine, utc_now, write_json  # noqa: E402
from metatuner.runtime import cpu_bf16, resolve_precision  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--out", default=None, help="default: docs/performance/precision-<capability>.json")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)), LoraConfig(
        r=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    ids = torch.randint(0, SMOLLM2_135M["vocab_size"], (args.batch, args.tokens))

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    seconds = interleaved({"fp32": lambda: step(False), "bf16": lambda: step(True)}, repeats=args.repeats)
    fp32, bf16 = Summary(seconds["fp32"]).median, Summary(seconds["bf16"]).median
    auto = resolve_precision("auto", "cpu")
    cpu = cpu_bf16()
    result = {
        "what": "LoRA forward+backward of a SmolLM2-135M-shaped model, batch "
                f"{args.batch} x {args.tokens} tokens, r=16 on all linear types; seconds per step (CPU time)",
        "date": utc_now(), "command": command_line(), "machine": machine(),
        "cpu": {**asdict(cpu), "native": cpu.native},
        "auto_picks": "bf16" if auto.mixed_precision == "bf16" else "fp32", "auto_reason": auto.reason,
        "seconds": {k: Summary(v).as_dict() for k, v in seconds.items()},
        "bf16_over_fp32_seconds": round(bf16 / fp32, 3),
    }
    out = Path(args.out or REPO / "docs" / "performance" / f"precision-{cpu.capability.lower()}.json")
    write_json(out, result)
    print(f"{cpu.describe()}: fp32 {fp32:.2f} s, bf16 autocast {bf16:.2f} s per step "
          f"(bf16 / fp32 = {bf16 / fp32:.2f}); auto picks {result['auto_picks']}; wrote {out}")
    return result


if __name__ == "__main__":
    main()

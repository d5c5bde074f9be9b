"""MetaTuner's hot paths side by side with PEFT, TRL, transformers and llama.cpp; writes docs/performance.{json,md}.

Run from the repository root with the project's environment (`make bench`, `make bench-quick`, or directly):

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/perf.py                 # SmolLM2-135M (embedded), ~40 min on 2 cores
    .venv/bin/python benchmarks/perf.py --quick --out-json /tmp/p.json --out-md /tmp/p.md   # tiny model, ~1 min
    .venv/bin/python benchmarks/perf.py --only scoring_vs_forward --only generation_speedup  # update two entries
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/perf.py --threads 1 --only serve_batching_speedup \
        --only serve_p95_latency_s            # the server's figures alone (a MetaTuner run: --serve-run, ~5 min)

The headline figures (docs/performance.json, top level):
  hyperlora_vs_peft           fwd+bwd of M with per-query generated LoRA / PEFT static LoRA        target <= 1.10
  metatuner_step_vs_trl_sft   MetaTuner task-loss step / TRL SFTTrainer + PEFT LoRA step           target <= 1.35
  j_step_vs_trl_sft           whole MetaTuner-J step (prompts, task loss, rollouts, SR) / TRL step target <= 3.0
  scoring_vs_forward          likelihood scoring tokens/s / plain forward tokens/s                 target >= 0.80
  generation_speedup          batched evaluation generation tokens/s / HF generate at batch 1      target >= 8
  generation_vs_llama_cpp     the same / llama.cpp at batch 1 on the shipped GGUF (llama-cpp-python) target >= 2
  memory_vs_sft               peak RSS of MetaTuner training / LoRA SFT (separate processes)        target <= 1.2
  eval_examples_per_s         multiple-choice evaluation throughput (CosmosQA, likelihood ranking)
  eval_vs_lm_eval             GSM8K examples/s: `metatuner eval` / `lm_eval --model hf` (lm_eval)  target >= 2
  serve_batching_speedup      `metatuner serve`: new tokens/s with 16 concurrent clients / 1 client    target >= 4
  serve_p95_latency_s         `metatuner serve`: p95 latency of 32 concurrent clients (benchmarks/serve_load.py)
plus `speedups` (A/B of hot-path changes) and `scaling` (J step time and peak RSS against n, k, r, batch).

Every ratio comes from one process (memory: alternating processes), both sides interleaved, medians of several
repetitions; the machine, thread count and load go into the JSON. Where a ratio's target is far off, each side's
matrix-product FLOPs are counted too, in one more untimed run, so that the ratio splits into work and speed. Each
figure is written over an existing --out-json as soon as it is measured, so the entries a run does not reach
(--only, --skip, a crash) are kept. docs/performance/notes.md, when present, is appended to the Markdown as the
closing note.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from metatuner.runtime import resolve_precision  # noqa: E402

import common  # noqa: E402
from bench_setup import REPO, Bench  # noqa: E402
from common import command_line, library_versions, load_summary, machine, utc_now, write_json  # noqa: E402

HEADLINE = {  # name -> (the benchmark that measures it, key in its result, target as (op, value) or None)
    "hyperlora_vs_peft": ("hyperlora_vs_peft", "ratio", ("<=", 1.10)),
    "metatuner_step_vs_trl_sft": ("metatuner_step_vs_trl_sft", "ratio", ("<=", 1.35)),
    "j_step_vs_trl_sft": ("metatuner_step_vs_trl_sft", "j_step_over_trl", ("<=", 3.0)),
    "scoring_vs_forward": ("scoring_vs_forward", "ratio", (">=", 0.80)),
    "generation_speedup": ("generation_speedup", "ratio", (">=", 8.0)),
    "generation_vs_llama_cpp": ("generation_speedup", "ours_over_llama_cpp", (">=", 2.0)),
    "memory_vs_sft": ("memory_vs_sft", "ratio", ("<=", 1.2)),
    "eval_examples_per_s": ("eval_examples_per_s", "examples_per_s", None),
    "eval_vs_lm_eval": ("eval_vs_lm_eval", "ratio", (">=", 2.0)),
    "serve_batching_speedup": ("serve_batching_speedup", "ratio", (">=", 4.0)),
    "serve_p95_latency_s": ("serve_p95_latency_s", "p95_latency_s", None),
}
# A figure measured inside another benchmark's result: the key of its description there, and what to say when a
# result from before the figure existed has none.
WHAT_KEY = {"j_step_vs_trl_sft": ("j_step_what", "seconds of a whole MetaTuner-J step / a TRL SFTTrainer step"),
            "generation_vs_llama_cpp": ("llama_cpp_what", "new tokens/s: ours (batch 16) / llama.cpp (batch 1)")}
SERVE = ("serve_batching_speedup", "serve_p95_latency_s")  # need a MetaTuner run (--serve-run)
ORDER = ["speedups", "hyperlora_vs_peft", "scoring_vs_forward", "eval_examples_per_s", "generation_speedup",
         "eval_vs_lm_eval", "metatuner_step_vs_trl_sft", "memory_vs_sft", "scaling", *SERVE]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the tiny in-memory test model, fewer repetitions (~1 min)")
    p.add_argument("--model", default=None, help="model name or directory (default: embedded SmolLM2-135M; tiny with --quick)")
    p.add_argument("--only", action="append", choices=ORDER, help="run only these (repeatable)")
    p.add_argument("--skip", action="append", choices=ORDER, default=[], help="leave these out (repeatable)")
    p.add_argument("--repeats", type=int, default=None, help="repetitions per figure (default 5; 2 with --quick)")
    p.add_argument("--precision", choices=["auto", "bf16", "fp32"], default="auto",
                   help="autocast of the training benchmarks; auto: what training picks here (bf16 only on a CPU with "
                        "native bf16, metatuner.runtime)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    p.add_argument("--lm-eval-batch-size", type=int, default=None,
                   help="eval_vs_lm_eval: lm_eval's batch size (default: the same as ours, 16; lm_eval's own default "
                        "is 1)")
    p.add_argument("--clock", choices=["cpu", "wall"], default="cpu",
                   help="cpu: this process's CPU seconds (steady on a shared machine; use with --threads 1); "
                        "wall: elapsed seconds (an idle machine)")
    p.add_argument("--serve-run", default=None, help="the MetaTuner run the server benchmarks serve (default: "
                   "runs/demo/metatuner_j, what `make demo` trains, when it exists; without one they are skipped)")
    p.add_argument("--out-json", default=str(REPO / "docs" / "performance.json"))
    p.add_argument("--out-md", default=str(REPO / "docs" / "performance.md"))
    return p.parse_args(argv)


def run(name: str, bench: Bench, plot_dir: Path):
    import eval_vs_lm_eval
    import hot_paths
    import memory_scaling
    import serve_load
    import step_vs_trl

    if name == "scaling":
        return memory_scaling.scaling(bench, plot_dir)
    module = {"metatuner_step_vs_trl_sft": step_vs_trl, "memory_vs_sft": memory_scaling,
              "eval_vs_lm_eval": eval_vs_lm_eval, **{n: serve_load for n in SERVE}}.get(name, hot_paths)
    return getattr(module, name)(bench)


def met(value, target) -> bool | None:
    if target is None or value is None:
        return None
    op, bound = target
    return value <= bound if op == "<=" else value >= bound


def _write(data, details, commands, bench, load_before, out_json: Path, out_md: Path) -> None:
    for name, (source, key, _) in HEADLINE.items():
        if source in details:
            data[name] = details[source].get(key)  # None: not measured here (the details say why)
    data.update({
        "targets": {n: (f"{t[0]} {t[1]}" if t else None) for n, (_, _, t) in HEADLINE.items()},
        "met": {n: met(data.get(n), t) for n, (_, _, t) in HEADLINE.items()},
        "date": utc_now(),
        "command": command_line(),
        "commands": commands,
        "machine": machine(),
        "load": {"before": load_before, "after": load_summary()},
        "versions": library_versions("torch", "transformers", "peft", "trl", "accelerate", "llama_cpp_python"),
        "settings": {**bench.settings(), "clock": common.CLOCK},
        "details": details,
    })
    write_json(out_json, data)
    out_md.write_text(render_markdown(data, out_md))


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common.CLOCK = args.clock
    from datasets import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    precision = resolve_precision(args.precision, "cpu")
    bench = Bench.for_mode(args.quick, args.model, repeats=args.repeats, lm_eval_batch_size=args.lm_eval_batch_size,
                           precision="bf16" if precision.mixed_precision == "bf16" else "fp32")
    names = [n for n in ORDER if (not args.only or n in args.only) and n not in args.skip]
    default_run = REPO / "runs" / "demo" / "metatuner_j"
    # the demo's run is SmolLM2-sized: --quick serves only a run it is given
    bench.serve_run = args.serve_run or (str(default_run.relative_to(REPO)) if default_run.is_dir() and not args.quick
                                         else None)
    if bench.serve_run is None and any(n in SERVE for n in names):
        print("no MetaTuner run to serve (make demo, or --serve-run RUN): skipping " + ", ".join(SERVE), flush=True)
        names = [n for n in names if n not in SERVE]
    out_json = Path(args.out_json)
    # Figures are written one by one over the published ones, so a run that stops part way (a crash, a signal)
    # leaves every other figure as it was; each keeps its own command, CPU and load.
    data = json.loads(out_json.read_text()) if out_json.is_file() else {}
    details, commands = data.get("details", {}), data.get("commands", {})
    _attribute_whole_run_machine(data, details)
    plot_dir = Path(args.out_md).parent / "performance"
    load_before = load_summary()
    print(f"model {bench.model}, torch threads {torch.get_num_threads()}, clock {args.clock}, precision {bench.precision} "
          f"({precision.reason}), "
          f"repeats {bench.repeats}; running {', '.join(names)}", flush=True)
    for name in names:
        start = time.perf_counter()
        result = run(name, bench, plot_dir)
        result["seconds_to_measure"] = round(time.perf_counter() - start, 1)
        result["load_after"] = load_summary().get("loadavg")
        # Each figure keeps the CPU it ran on and its training precision: --only reruns may come from another machine.
        result["cpu"] = {"model": common.machine()["cpu_model"], **common.machine()["cpu_bf16"]}
        result["training_precision"] = {"setting": args.precision, "ran": bench.precision, "reason": precision.reason}
        details[name] = result
        commands[name] = command_line()
        shown = ", ".join(f"{n} {result.get(key)}" for n, (source, key, _) in HEADLINE.items() if source == name)
        print(f"  {name}: {shown}  ({result['seconds_to_measure']} s)", flush=True)
        for figure, why in result.get("notes", {}).items():
            print(f"  {figure}: {why}", flush=True)
        # Written after every benchmark, so a long run that stops early keeps what it measured.
        _write(data, details, commands, bench, load_before, out_json, Path(args.out_md))
    print(f"wrote {out_json} and {args.out_md}")
    return data


def _attribute_whole_run_machine(data: dict, details: dict) -> None:
    """Figures from before each kept its own CPU were all measured by the run the file's top-level `machine` and
    `settings` describe: give them that CPU and precision before this run's machine replaces it."""
    machine_info, settings = data.get("machine", {}), data.get("settings", {})
    if "cpu_bf16" not in machine_info:
        return
    for result in details.values():
        if isinstance(result, dict) and "cpu" not in result:
            result["cpu"] = {"model": machine_info.get("cpu_model"), **machine_info["cpu_bf16"]}
            result["training_precision"] = {"setting": "recorded for the whole run", "ran": settings.get("precision"),
                                            "reason": f"the run of {data.get('date', 'an earlier date')}"}


# ---------------------------------------------------------------------------------------------------------------
def _cpu_bf16(info: dict | None) -> str:
    if not info:
        return "not recorded (measured before the field existed)"
    units = [n for n, k in (("AVX512-BF16", "avx512_bf16"), ("AMX", "amx")) if info.get(k)]
    return (f"capability {info.get('capability')}, bf16 hardware {', '.join(units) or 'none'}, "
            f"{'native' if info.get('native') else 'emulated'} (training precision auto picks "
            f"{'bf16' if info.get('native') else 'fp32'})")


def _fmt(value, digits=3):
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render_markdown(data: dict, md_path: Path) -> str:
    d = data.get("details", {})
    m = data.get("machine", {})
    lines = [
        "# Performance",
        "",
        "MetaTuner's hot paths measured side by side with the library a user would otherwise use. Each ratio comes "
        "from one run: both sides in one process (memory: alternating processes), interleaved, medians of several "
        "repetitions. Written by `benchmarks/perf.py`; regenerate with `make bench` (or `make bench-quick` for the "
        "tiny model).",
        "",
        f"- Date: {data.get('date')}; model: `{data.get('settings', {}).get('model')}`; command: `{data.get('command')}` "
        "(figures from other runs carry their own command below)",
        f"- Machine: {m.get('cpu_model')}, {m.get('usable_cpus')} usable CPUs, torch {m.get('torch')}, "
        f"torch threads {m.get('torch_threads')} (interop {m.get('torch_interop_threads')}), "
        f"thread variables {m.get('env_threads') or 'unset'}; CPU bf16: {_cpu_bf16(m.get('cpu_bf16'))}",
        f"- Load average before / after: {data.get('load', {}).get('before', {}).get('loadavg')} / "
        f"{data.get('load', {}).get('after', {}).get('loadavg')} (the CPU is shared; absolute figures move with "
        "load, ratios much less since both sides run in turns)",
        "",
        "| figure | value | target | met | what |",
        "|---|---|---|---|---|",
    ]
    for name, (source, key, target) in HEADLINE.items():
        if source not in d:
            continue
        ok = data.get("met", {}).get(name)
        what_key, fallback = WHAT_KEY.get(name, ("what", ""))
        what = d[source].get(what_key, fallback)
        if data.get(name) is None:  # a benchmark that could not measure a figure says why in its "notes"
            what = f"{what} ({d[source].get('notes', {}).get(name, 'not measured')})"
        lines.append(f"| `{name}` | {_fmt(data.get(name))} | {data['targets'][name] or '-'} | "
                     f"{'yes' if ok else ('-' if ok is None else '**no**')} | {what} |")
    commands = {n: c for n, c in data.get("commands", {}).items() if n in d}
    if len(set(commands.values())) == 1:
        lines += ["", f"Every figure above: `{next(iter(commands.values()))}`.", ""]
    elif commands:
        lines += ["", "Commands behind the figures:", ""] + [f"- {n}: `{c}`" for n, c in commands.items()] + [""]
    lines += ["CPU behind each figure (training precision follows it: bf16 only where bf16 is native):", ""]
    lines += [f"- {n}: {', '.join(filter(None, [(x.get('cpu') or {}).get('model'), _cpu_bf16(x.get('cpu'))]))}"
              for n, x in d.items()] + [""]
    lines += _details_md(d)
    lines += _scaling_md(d.get("scaling"), md_path)
    notes = md_path.parent / "performance" / "notes.md"
    if notes.is_file():
        lines += ["", notes.read_text().strip(), ""]
    return "\n".join(lines).rstrip() + "\n"


def _generation_work_md(w: dict) -> str:
    rates = w["gflop_per_s"]
    square = next(k for k in rates if k.startswith("square_"))
    return (f" Work in fp32: ours {w['gflop']['ours']} GFLOP at {rates['ours']} GFLOP/s, transformers at batch 1 "
            f"{w['gflop']['hf_batch1']} GFLOP at {rates['hf_batch1']} GFLOP/s; the matrix products take "
            f"{w['ours_matmul_share']:.0%} of our CPU time and run there at {rates['ours_matmuls_alone']} GFLOP/s, "
            f"one thread's {square.split('_')[1]}x{square.split('_')[1]} product at {rates[square]} GFLOP/s; with "
            f"every other cost gone the fp32 ratio would be at most {w['fp32_ratio_ceiling']}x ({w['what']}).")


def _details_md(d: dict) -> list[str]:
    out = ["## Details", ""]
    if "hyperlora_vs_peft" in d:
        x = d["hyperlora_vs_peft"]
        out.append(f"- **hyperlora_vs_peft**: {x['ours_seconds']['median']:.4g} s vs PEFT {x['peft_seconds']['median']:.4g} s "
                   f"per forward+backward; batch {x['batch_size']}, {x['tokens_per_batch']} tokens, r={x['rank']}, "
                   f"targets {', '.join(x['targets'])}, {x['precision']}.")
    if "metatuner_step_vs_trl_sft" in d:
        x = d["metatuner_step_vs_trl_sft"]
        out.append(f"- **metatuner_step_vs_trl_sft**: {x['ours_seconds_per_step']['median']:.4g} s vs TRL "
                   f"{x['trl_seconds_per_step']['median']:.4g} s per step (batch {x['batch_size']}, {x['precision']}; "
                   f"identical actor tokens: {(x.get('same_actor_tokens') or {}).get('identical_labels')}). "
                   f"The whole J step (prompt writing, rollouts, SR loss: {x['full_j_step_settings']}) takes "
                   f"{x['full_j_step_seconds']['median']:.4g} s = "
                   f"{x.get('j_step_over_trl', x.get('full_j_step_over_trl'))}x the TRL step (median of the "
                   f"repetitions' ratios); its phases (medians): {x['full_j_step_phases_seconds']}."
                   + (f" Work: the J step computes {x['j_step_flops_over_trl']}x the TRL step's matrix-product FLOPs "
                      f"(GFLOP per step {x['gflop_per_step']}; the J step's by phase {x['j_step_gflop_by_phase']}), "
                      f"at GFLOP/s {x['gflop_per_s']} ({x['flops_what']})." if "j_step_flops_over_trl" in x else ""))
    if "scoring_vs_forward" in d:
        x = d["scoring_vs_forward"]
        out.append(f"- **scoring_vs_forward**: {x['ours_tokens_per_s']['median']:.4g} tokens/s scoring "
                   f"{x['rows']} rows ({x['queries']} queries x {x['candidates_per_query']} candidates, per-query LoRA) "
                   f"vs {x['forward_tokens_per_s']['median']:.4g} tokens/s for the plain forward with logits and "
                   f"{x['decoder_only_tokens_per_s']['median']:.4g} for the decoder body alone "
                   f"(ratio {x['ratio_vs_decoder_only']} against that floor); {x['precision']}.")
    if "generation_speedup" in d:
        x = d["generation_speedup"]
        llama = x.get("llama_cpp_batch1_tokens_per_s")
        out.append(f"- **generation_speedup**: ours {x['ours_tokens_per_s']['median']:.4g} tokens/s, transformers "
                   f"generate at batch 1 {x['hf_batch1_tokens_per_s']['median']:.4g} tokens/s, llama.cpp at batch 1 "
                   + (f"{llama['median']:.4g} tokens/s ({x['llama_cpp_gguf']}, ours/llama.cpp = "
                      f"{x['ours_over_llama_cpp']})" if llama else "not measured")
                   + f". {x['what']}. Both in fp32: {x.get('ratio_both_fp32')}x. All settings (tokens/s): "
                   + ", ".join(f"{k} {v['median']:.4g}" for k, v in x.get("tokens_per_s_by_setting", {}).items())
                   + f". With MetaTuner's per-query LoRA (fp32): {x['with_per_query_lora_tokens_per_s']['median']:.4g} "
                   f"tokens/s." + (_generation_work_md(x["work"]) if "work" in x else ""))
    if "memory_vs_sft" in d:
        x = d["memory_vs_sft"]
        out.append(f"- **memory_vs_sft**: peak RSS {x['metatuner_peak_rss_mb']['median']:.0f} MiB (MetaTuner) vs "
                   f"{x['sft_peak_rss_mb']['median']:.0f} MiB (LoRA SFT); after loading the model "
                   f"{x['rss_after_model_load_mb']['metatuner']['median']:.0f} / {x['rss_after_model_load_mb']['sft']['median']:.0f} MiB, "
                   f"so training adds {x['training_increment_mb']['metatuner']['median']:.0f} / "
                   f"{x['training_increment_mb']['sft']['median']:.0f} MiB. {x['metatuner_step']}. Commands: "
                   + "; ".join(f"`{c}`" for c in x["commands"].values()) + "."
                   + (f" Without the SR loss's checkpointing (`--no-sr-checkpoint`): peak RSS "
                      f"{x['without_sr_checkpointing']['peak_rss_mb']:.0f} MiB." if "without_sr_checkpointing" in x
                      else ""))
    if "eval_examples_per_s" in d:
        x = d["eval_examples_per_s"]
        out.append(f"- **eval_examples_per_s**: {x['examples_per_s']} examples/s ({x['what']}; data {x['data']}); "
                   f"the former flat scorer: {x['flat_rows_examples_per_s']['median']} examples/s.")
    if "eval_vs_lm_eval" in d and d["eval_vs_lm_eval"].get("ratio") is not None:
        x = d["eval_vs_lm_eval"]
        acc = x["accuracy"]
        out.append(f"- **eval_vs_lm_eval**: {x['ours_examples_per_s']['median']:.4g} examples/s (`metatuner eval`) vs "
                   f"{x['lm_eval_examples_per_s']['median']:.4g} (lm_eval {x.get('lm_eval_version')}, hf); {x['what']}. "
                   f"Accuracy strict / flexible: ours {acc['ours']['strict']:.4g} / {acc['ours']['flexible']:.4g}, "
                   f"lm_eval {acc['lm_eval']['strict']:.4g} / {acc['lm_eval']['flexible']:.4g} (correct items "
                   f"{x['correct_items']['ours']} vs {x['correct_items']['lm_eval']}); lm_eval saw our inputs: "
                   f"{x['same_inputs']}; identical outputs {x['same_outputs']} of {x['examples']}. Commands: `"
                   f"{x['commands']['ours']}`; `{x['commands']['lm_eval']}`."
                   + (f" Work: lm_eval computes {x['work']['lm_eval_flops_over_ours']}x our matrix-product FLOPs "
                      f"(GFLOP {x['work']['gflop']}) at GFLOP/s {x['work']['gflop_per_s']} ({x['work']['what']})."
                      if "work" in x else ""))
    from serve_load import describe

    out += [f"- **{name}**: {describe(name, d[name])}" for name in SERVE if name in d]
    if "speedups" in d or "generation_speedup" in d or "eval_examples_per_s" in d or "memory_vs_sft" in d:
        out += ["", "## Speed-ups kept (A/B in the same run; > 1 means the kept way is faster)", "",
                "| change | speed-up | measured as |", "|---|---|---|"]
        for key, x in d.get("speedups", {}).items():
            if isinstance(x, dict) and "speedup" in x:
                out.append(f"| {key.replace('_', ' ')} | {x['speedup']}x | {x['what']} |")
        if "eval_examples_per_s" in d:
            out.append(f"| options share their prompt's KV cache | {d['eval_examples_per_s']['shared_prefix_speedup']}x | "
                       "multiple-choice evaluation examples/s: shared prefix / every option as a full row |")
        if "without_sr_checkpointing" in d.get("memory_vs_sft", {}):
            x = d["memory_vs_sft"]
            without, kept = x["without_sr_checkpointing"]["peak_rss_mb"], x["metatuner_peak_rss_mb"]["median"]
            out.append(f"| SR loss checkpoints G's layers (memory) | {without / kept:.3g}x less peak RSS | peak RSS "
                       f"of the J-step process: whole SR graph {without:.0f} MiB / checkpointed {kept:.0f} MiB |")
        if "generation_speedup" in d:
            out.append(f"| per-query LoRA factors reused while the live rows are unchanged | "
                       f"{d['generation_speedup']['lora_factor_reuse_speedup']}x | generation tokens/s with per-query "
                       "LoRA: factors made once per live-row set / hypernetwork run at every token |")
    return out + [""]


def _scaling_md(x: dict | None, md_path: Path) -> list[str]:
    if not x:
        return []
    out = ["## Scaling: one knob at a time", "",
           f"Full J step (write prompts with at most {x['max_prompt_tokens']} tokens, task loss, rollouts every step, "
           f"SR loss, update) from the base {x['base']}; {x['what']}. One process per setting, e.g. "
           f"`{x['command_example']}`.", "",
           "| knob | value | step seconds | peak RSS MiB | phases (s) |", "|---|---|---|---|---|"]
    for r in x["rows"]:
        phases = ", ".join(f"{k} {v}" for k, v in r["phases"].items())
        out.append(f"| {r['knob']} | {r['value']} | {r['step_seconds']} | {r['peak_rss_mb']:.0f} | {phases} |")
    if x.get("plot"):
        plot = Path(x["plot"]) if Path(x["plot"]).is_absolute() else REPO / x["plot"]  # recorded relative to the repo
        out += ["", f"![scaling]({os.path.relpath(plot, md_path.resolve().parent)})"]
    return out + [""]


if __name__ == "__main__":
    main()

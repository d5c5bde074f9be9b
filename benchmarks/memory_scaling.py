"""Peak memory of MetaTuner training against LoRA SFT, and how a MetaTuner step grows with n, k, r and batch size.

Run through the suite: `python benchmarks/perf.py --only memory_vs_sft` or `--only scaling` (add --quick for the
tiny model). Every run is a fresh `benchmarks/train_worker.py` process, since peak RSS is a per-process figure;
the two sides of memory_vs_sft alternate (metatuner, sft, metatuner, sft, ...).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import common
from bench_setup import Bench
from common import Summary

WORKER = Path(__file__).resolve().parent / "train_worker.py"


def run_worker(b: Bench, mode: str, **options) -> dict:
    cmd = [sys.executable, str(WORKER), "--mode", mode, "--model", b.model, "--precision", b.precision,
           "--threads", str(b.threads), "--clock", common.CLOCK]
    if b.quick:
        options.setdefault("max_prompt_tokens", 8)
    options.setdefault("steps", 1)  # one warm-up and one timed step: peak memory is reached in the first
    options.setdefault("batch_size", b.batch_size)
    for key, value in options.items():
        cmd += [f"--{key.replace('_', '-')}"] + ([str(value)] if value != "" else [])
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["command"] = "python " + " ".join(cmd[1:]).replace(str(WORKER.parent.parent) + "/", "")
    return result


def memory_vs_sft(b: Bench) -> dict:
    repeats = 1 if b.quick else 2
    runs = {"metatuner": [], "sft": []}
    for _ in range(repeats):
        for mode in runs:
            runs[mode].append(run_worker(b, mode))
    # The A/B of the SR loss's checkpointing (MetaTuner.checkpoint_sr): one more MetaTuner process without it.
    whole_sr_graph = run_worker(b, "metatuner", no_sr_checkpoint="")
    peak = {m: [r["peak_rss_mb"] for r in rs] for m, rs in runs.items()}
    loaded = {m: [r["rss_after_load_mb"] for r in rs] for m, rs in runs.items()}
    extra = {m: [p - l for p, l in zip(peak[m], loaded[m])] for m in runs}
    return {
        "ratio": round(Summary(peak["metatuner"]).median / Summary(peak["sft"]).median, 4),
        "target": "<= 1.2",
        "what": "peak RSS of a process running MetaTuner J training steps / one running LoRA SFT steps, same batches",
        "batch_size": b.batch_size, "precision": b.precision, "processes_per_side": repeats,
        "metatuner_peak_rss_mb": Summary(peak["metatuner"]).as_dict(1),
        "sft_peak_rss_mb": Summary(peak["sft"]).as_dict(1),
        "rss_after_model_load_mb": {m: Summary(v).as_dict(1) for m, v in loaded.items()},
        "training_increment_mb": {m: Summary(v).as_dict(1) for m, v in extra.items()},
        "step_seconds": {m: [r["step_seconds"] for r in rs] for m, rs in runs.items()},
        "trainable_parameters": {m: rs[0]["trainable_parameters"] for m, rs in runs.items()},
        "commands": {m: rs[0]["command"] for m, rs in runs.items()},
        "without_sr_checkpointing": {"peak_rss_mb": whole_sr_graph["peak_rss_mb"],
                                     "step_seconds": whole_sr_graph["step_seconds"],
                                     "command": whole_sr_graph["command"]},
        "metatuner_step": "bench_setup.j_step_backward (write prompts, task loss and its backward, rollouts "
                          "n=4 every step, SR loss (G's layers checkpointed) and its backward) + AdamW; SFT: PEFT LoRA r=16 on all 7 linear types (the SFT baseline's "
                          "defaults) + backward + AdamW",
    }


BASE = {"n_rollouts": 4, "share_depth": 0.25, "rank": 8, "batch_size": 4}
GRID = {"n_rollouts": [1, 4, 8], "share_depth": [0.25, 0.5, 0.75], "rank": [4, 8, 32], "batch_size": [2, 4, 8]}
QUICK_GRID = {"n_rollouts": [1, 4], "rank": [8, 32]}


def scaling(b: Bench, out_dir: Path | None = None) -> dict:
    """Full J step time and peak RSS as one knob moves from the base setting (the others stay at BASE)."""
    grid = QUICK_GRID if b.quick else GRID
    prompt_tokens = 8 if b.quick else 16
    seen: dict[tuple, dict] = {}
    rows = []
    for knob, values in grid.items():
        for value in values:
            setting = {**BASE, knob: value}
            key = tuple(sorted(setting.items()))
            if key not in seen:
                seen[key] = run_worker(b, "metatuner", max_prompt_tokens=prompt_tokens, **setting)
            r = seen[key]
            timed = r["step_seconds"][1:]
            rows.append({"knob": knob, "value": value, **setting,
                         "step_seconds": round(Summary(timed).median, 3), "peak_rss_mb": r["peak_rss_mb"],
                         "phases": r["last_step_phases"]})
    result = {"base": BASE, "max_prompt_tokens": prompt_tokens, "rows": rows,
              "command_example": next(iter(seen.values()))["command"],
              "what": "median seconds of the timed J steps (after one warm-up) and the process's peak RSS"}
    if out_dir is not None:
        result["plot"] = _plot(rows, grid, out_dir)
    return result


def _plot(rows, grid, out_dir: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(2, len(grid), figsize=(3.2 * len(grid), 5.5), squeeze=False)
    for col, knob in enumerate(grid):
        pts = [r for r in rows if r["knob"] == knob]
        xs = [r["value"] for r in pts]
        axes[0][col].plot(xs, [r["step_seconds"] for r in pts], "o-")
        axes[1][col].plot(xs, [r["peak_rss_mb"] for r in pts], "s-", color="tab:orange")
        axes[1][col].set_xlabel(knob)
        axes[0][col].set_ylim(bottom=0)
        axes[1][col].set_ylim(bottom=0)
    axes[0][0].set_ylabel("J step seconds")
    axes[1][0].set_ylabel("peak RSS (MiB)")
    fig.suptitle("MetaTuner J step: one knob at a time from " + ", ".join(f"{k}={v}" for k, v in BASE.items()),
                 fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "scaling.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return str(path)

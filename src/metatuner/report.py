"""Results tables: collect finished runs into docs/results/<task>.json and a Markdown table.

    python -m metatuner.report --task gsm8k --out docs/results \\
        --method zero_shot=runs/gsm8k-zero_shot \\
        --method sft=runs/gsm8k-sft,runs/sft-gsm8k

Each `--method NAME=EVAL_DIR[,TRAIN_DIR]` names an evaluation folder (metrics.json + samples.jsonl, written by
`metatuner eval`) and optionally the training run behind it (train_metrics.json). The exact commands come from
those files. When `metatuner_j` is among the methods, every other method gets `ci_vs_metatuner_j`: the 95%
paired-bootstrap interval of MetaTuner-J's primary score minus its own, over the items both evaluated.
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

from .prompt_answers import answers_in_prompts
from .stats import paired_bootstrap

NOT_SCORES = {"eval_seconds", "train_seconds", "peak_rss_mb"}  # the non-score floats of a results entry


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SystemExit(f"cannot read {path}: {err}")


def read_samples(samples: Path) -> list[dict]:
    """Per-item outputs: samples.jsonl, or its published .jsonl.gz copy. A line that is not JSON is a ValueError
    naming the file and line."""
    rows = []
    with (gzip.open(samples, "rt") if samples.suffix == ".gz" else open(samples)) as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{samples}, line {number}: not JSON ({err})") from None
    return rows


def per_item_scores(samples: Path, metric: str) -> dict[str, float]:
    """id -> `metric` from per-item outputs (samples.jsonl, or its published .jsonl.gz copy)."""
    return {s["id"]: float(s["scores"][metric]) for s in read_samples(samples)}


def add_answers_in_prompts(diagnostics: dict | None, samples: Path) -> None:
    """Give a MetaTuner row's diagnostics `answers_in_prompts` from its per-item outputs, where it has none (rows
    evaluated before the diagnostic existed)."""
    if isinstance(diagnostics, dict) and "answers_in_prompts" not in diagnostics:
        diagnostics["answers_in_prompts"] = answers_in_prompts(read_samples(samples))


def collect(task: str, methods: dict[str, tuple[Path, Path | None]], notes: dict | None = None) -> dict:
    results: dict = {"task": task, "methods": {}, **(notes or {})}
    items: dict[str, dict[str, float]] = {}
    for name, (eval_dir, train_dir) in methods.items():
        metrics = _read_json(eval_dir / "metrics.json")
        metric_names = [k for k, v in metrics.items() if isinstance(v, float) and k not in (
            "seconds", "tokens_per_s", "examples_per_s", "prompt_seconds")]
        entry = {m: round(metrics[m], 4) for m in metric_names}
        entry.update({"n_eval": metrics["n_eval"], "eval_seconds": metrics["seconds"],
                      "eval_command": metrics.get("command")})
        if train_dir is not None:
            train = _read_json(train_dir / "train_metrics.json")
            entry.update({"train_examples": train["train_examples"], "train_seconds": train["train_seconds"],
                          "train_command": train.get("command")})
            if "peak_rss_mb" in train:
                entry["peak_rss_mb"] = train["peak_rss_mb"]
            if "precision" in train:  # what the row trained in, and the CPU capability that decided it
                entry["precision"] = train["precision"]
            if "diagnostics" in metrics and "diagnostics" in train:  # what D2 held at the end of training
                metrics["diagnostics"].update({k: v for k, v in train["diagnostics"].items() if k.startswith("d2_")})
        else:
            entry.update({"train_examples": 0, "train_seconds": 0})
        if "diagnostics" in metrics:  # MetaTuner runs: written prompts and per-query LoRA on the evaluated items
            entry["diagnostics"] = metrics["diagnostics"]
            add_answers_in_prompts(entry["diagnostics"], eval_dir / "samples.jsonl")
        # One command when training and evaluation ran as one (`metatuner compare`).
        entry["command"] = " && ".join(dict.fromkeys(c for c in (entry.get("train_command"), entry["eval_command"]) if c))
        results["methods"][name] = entry
        items[name] = per_item_scores(eval_dir / "samples.jsonl", metric_names[0])
    add_intervals(results, items)
    return results


def add_intervals(results: dict, items: dict[str, dict[str, float]]) -> None:
    """Give every method but MetaTuner-J `ci_vs_metatuner_j` from its per-item scores (`items`: method -> id ->
    primary score), over the items both evaluated."""
    if "metatuner_j" not in items:
        return
    ref = items["metatuner_j"]
    for name, scores in items.items():
        if name == "metatuner_j":
            continue
        shared = sorted(set(ref) & set(scores))
        low, high = paired_bootstrap([ref[i] for i in shared], [scores[i] for i in shared])
        results["methods"][name]["ci_vs_metatuner_j"] = [round(low, 4), round(high, 4)]


def primary_metric(entry: dict) -> str:
    """The first score in a results entry: the one the intervals and plots use."""
    return next(k for k, v in entry.items() if isinstance(v, float) and k not in NOT_SCORES)


def markdown(results: dict) -> str:
    methods = results["methods"]
    first = next(iter(methods.values()))
    metrics = [k for k, v in first.items() if isinstance(v, float) and k not in NOT_SCORES]
    head = ["method", *metrics, "n_eval", "train examples", "train s", "eval s"]
    with_ci = any("ci_vs_metatuner_j" in m for m in methods.values())
    with_diagnostics = any("diagnostics" in m for m in methods.values())
    if with_ci:
        head.append("MetaTuner-J minus this, 95% CI")
    if with_diagnostics:
        head += list(DIAGNOSTIC_COLUMNS)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        row = [name, *(f"{m[k]:.4f}" for k in metrics), str(m["n_eval"]), str(m["train_examples"]),
               f"{m['train_seconds']:.0f}", f"{m['eval_seconds']:.0f}"]
        if with_ci:
            ci = m.get("ci_vs_metatuner_j")
            row.append(f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "")
        if with_diagnostics:
            row += diagnostic_cells(m.get("diagnostics"))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# column -> (path in a MetaTuner entry's diagnostics, format)
DIAGNOSTIC_COLUMNS = {
    "written = p0": (("p0_share",), "{:.3f}"),
    "distinct prompts": (("distinct_prompts",), "{:.0f}"),
    "edit distance to p0": (("edit_distance_to_p0",), "{:.3f}"),
    "D2 from samples": (("d2_from_samples",), "{:.3f}"),
    "LoRA cosine distance": (("lora_diversity", "mean_pairwise_cosine_distance"), "{:.4f}"),
    "LoRA between-query variance": (("lora_diversity", "between_query_variance_share"), "{:.4f}"),
    "LoRA norm (static)": (("lora_diversity", "mean_frobenius_norm"), "{:.3g}"),
    "prompt states gold": (("answers_in_prompts", "prompt_states_gold"), "{:.3f}"),
    "M takes the prompt's answer": (("answers_in_prompts", "answer_from_prompt"), "{:.3f}"),
    "M takes a wrong one": (("answers_in_prompts", "wrong_answer_from_prompt"), "{:.3f}"),
}


def diagnostic_cells(diagnostics: dict | None) -> list[str]:
    cells = []
    for path, fmt in DIAGNOSTIC_COLUMNS.values():
        value = diagnostics
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        cells.append(fmt.format(value) if isinstance(value, (int, float)) else "")
    norm = list(DIAGNOSTIC_COLUMNS).index("LoRA norm (static)")
    if diagnostics and cells[norm] and isinstance(diagnostics.get("lora_diversity"), dict):
        static = diagnostics["lora_diversity"].get("static_adapter_frobenius_norm")
        cells[norm] += f" ({static:.3g})" if isinstance(static, (int, float)) else ""
    return cells


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", required=True)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--method", action="append", required=True, help="NAME=EVAL_DIR[,TRAIN_DIR]")
    parser.add_argument("--note", action="append", default=[], help="KEY=VALUE recorded at the top level")
    args = parser.parse_args(argv)
    methods = {}
    for spec in args.method:
        name, _, dirs = spec.partition("=")
        parts = dirs.split(",")
        methods[name] = (Path(parts[0]), Path(parts[1]) if len(parts) > 1 else None)
    notes = dict(n.split("=", 1) for n in args.note)
    results = collect(args.task, methods, notes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.task}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{args.task}.md").write_text(f"# {args.task}\n\n" + markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()

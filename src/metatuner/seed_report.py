"""The results of a comparison run with several seeds (`seeds:` in a compare config): one row per method with its
score under each seed, their mean, and MetaTuner-J minus it as a 95% paired-bootstrap interval over the pooled
(seed, item) pairs: seed s of a method is paired with seed s of MetaTuner-J, item by item.

    results = seed_results(name, {"sft": {0: (eval_dir, train_dir), 1: ...}, "metatuner_j": {...}}, notes)
    results = seed_results(name, runs, notes, kept=published_seed_rows(published, samples_dir))  # seeds run elsewhere
    seed_markdown(results)

`metatuner compare` calls these; the per-seed run folders are `<runs_dir>/seed-<s>/<method>/`.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from .report import (DIAGNOSTIC_COLUMNS, add_answers_in_prompts, add_intervals, collect, diagnostic_cells,
                     per_item_scores, primary_metric)


def seed_results(name: str, runs: dict[str, dict[int, tuple[Path, Path | None]]], notes: dict,
                 kept: dict[str, dict[int, tuple[dict, Path]]] | None = None) -> dict:
    """`runs`: method -> seed -> (evaluation folder, training folder or None). `kept`: method -> seed -> (row, per-item
    outputs) for seeds with no run folder here, as published (`published_seed_rows`); a run folder wins over it."""
    results: dict = {"task": name, "methods": {}, **notes}
    items: dict[str, dict[str, float]] = {}
    kept = kept or {}
    for method in [*runs, *(m for m in kept if m not in runs)]:
        by_seed = runs.get(method, {})
        collected = collect(name, {str(s): by_seed[s] for s in by_seed})["methods"] if by_seed else {}
        sources = {**kept.get(method, {}),  # seed -> (row, per-item outputs); a run folder here wins
                   **{s: (collected[str(s)], by_seed[s][0] / "samples.jsonl") for s in by_seed}}
        seeds = sorted(sources)
        per_seed = [sources[s][0] for s in seeds]
        metric = primary_metric(per_seed[0])
        sizes = {row["n_eval"] for row in per_seed}
        if len(sizes) != 1:
            raise ValueError(f"{method}: its seeds were evaluated on different numbers of items ({sorted(sizes)})")
        scores = [row[metric] for row in per_seed]
        entry = {"metric": metric, "scores": scores, "mean": round(mean(scores), 4), "n_eval": sizes.pop(),
                 "seeds": seeds, "command": per_seed[0]["command"],
                 "train_seconds": [row["train_seconds"] for row in per_seed],
                 "eval_seconds": [row["eval_seconds"] for row in per_seed]}
        if all("diagnostics" in row for row in per_seed):
            entry["diagnostics"] = mean_diagnostics([row["diagnostics"] for row in per_seed])
            entry["diagnostics_per_seed"] = [row["diagnostics"] for row in per_seed]
        results["methods"][method] = entry
        items[method] = {f"{s}:{item}": score for s in seeds
                         for item, score in per_item_scores(sources[s][1], metric).items()}
    add_intervals(results, items)
    return results


def published_seed_rows(published: dict, samples: Path) -> dict[str, dict[int, tuple[dict, Path]]]:
    """Each (method, seed) of published seeded results whose per-item outputs are in `samples`, as a per-seed row
    (its score, n_eval, command, seconds and diagnostics) and the path of those outputs: what `seed_results` needs
    to report a seed whose run folder is on another machine or gone."""
    kept: dict[str, dict[int, tuple[dict, Path]]] = {}
    for method, entry in published.get("methods", {}).items():
        for i, seed in enumerate(entry["seeds"]):
            outputs = samples / f"{method}-seed{seed}.jsonl.gz"
            if not outputs.is_file():
                continue
            row = {entry["metric"]: float(entry["scores"][i]), "n_eval": entry["n_eval"], "command": entry["command"],
                   "train_seconds": entry["train_seconds"][i], "eval_seconds": entry["eval_seconds"][i]}
            if "diagnostics_per_seed" in entry:
                row["diagnostics"] = entry["diagnostics_per_seed"][i]
                add_answers_in_prompts(row["diagnostics"], outputs)
            kept.setdefault(method, {})[seed] = (row, outputs)
    return kept


def mean_diagnostics(per_seed: list[dict]) -> dict:
    """The mean over seeds of every number in the diagnostics (nested dicts alike; None where a seed has none)."""
    out = {}
    for key, value in per_seed[0].items():
        values = [d.get(key) for d in per_seed]
        if isinstance(value, dict):
            out[key] = mean_diagnostics(values) if all(isinstance(v, dict) for v in values) else None
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = round(mean(values), 6)
        else:
            out[key] = None
    return out


def seed_markdown(results: dict) -> str:
    methods = results["methods"]
    head = ["method", "scores (per seed)", "mean", "n_eval per seed", "MetaTuner-J minus this, 95% CI",
            *DIAGNOSTIC_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        ci = m.get("ci_vs_metatuner_j")
        lines.append("| " + " | ".join([
            name, ", ".join(f"{s:.3f}" for s in m["scores"]), f"{m['mean']:.4f}", str(m["n_eval"]),
            f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "", *diagnostic_cells(m.get("diagnostics"))]) + " |")
    note = "Diagnostics are means over the seeds." if any("diagnostics" in m for m in methods.values()) else ""
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")

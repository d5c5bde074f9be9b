"""Two evaluations of the same items, compared item by item: each side's mean, the 95% paired-bootstrap interval of
A minus B, and how many items only one side got right.

    metatuner paired --a runs/compare-arithmetic/grpo/eval --b runs/epyc-sft-check/sft/eval
    metatuner paired --a docs/results/samples/arithmetic-seeds/metatuner_j-seed0.jsonl.gz \\
                     --a docs/results/samples/arithmetic-seeds/metatuner_j-seed1.jsonl.gz \\
                     --b docs/results/samples/arithmetic/grpo.jsonl.gz

Each side is one or more per-item outputs of `metatuner eval` (an eval folder's samples.jsonl, or a published
.jsonl.gz copy): several files are one method's seeds. As many files on both sides pair seed s with seed s; several
against one pair each with that one. The interval resamples the pooled (pair, item) differences, as the seeds table
does, over the items every file scored. No torch: it reads files with `report.read_samples`.
"""

from __future__ import annotations

from pathlib import Path

from .report import read_samples
from .stats import paired_bootstrap


def samples_path(path: Path) -> Path:
    """An eval folder stands for its samples.jsonl."""
    return path / "samples.jsonl" if path.is_dir() else path


def read_item_scores(path: Path, metric: str | None) -> tuple[dict[str, float], str]:
    """id -> score under `metric` (default: the first of the file's per-item scores), and the metric used."""
    path = samples_path(path)
    try:
        rows = read_samples(path)
    except OSError as err:
        raise ValueError(f"cannot read {path}: {err}") from None
    scores: dict[str, float] = {}
    for number, row in enumerate(rows, 1):
        try:
            metric = metric or next(iter(row["scores"]))
            scores[str(row["id"])] = float(row["scores"][metric])
        except (KeyError, TypeError, ValueError, StopIteration) as err:
            what = f"missing key {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {err}"
            raise ValueError(f"{path}, line {number}: not a per-item output of `metatuner eval` ({what})") from None
    if not scores:
        raise ValueError(f"{path}: no per-item outputs")
    return scores, metric


def _pairs(n_a: int, n_b: int) -> list[tuple[int, int]]:
    if n_a == n_b:
        return [(s, s) for s in range(n_a)]
    if n_b == 1:
        return [(s, 0) for s in range(n_a)]
    if n_a == 1:
        return [(0, s) for s in range(n_b)]
    raise ValueError(f"{n_a} files against {n_b}: give as many on both sides (seed s against seed s), or one on a side")


def compare_paired(a: list[Path], b: list[Path], metric: str | None = None) -> dict:
    """The comparison as a JSON-ready dict (see the module docstring)."""
    if not a or not b:
        raise ValueError("give at least one file on each side (--a and --b)")
    pairs = _pairs(len(a), len(b))
    a_scores, b_scores = [], []
    for path in [*a, *b]:
        scores, metric = read_item_scores(path, metric)
        (a_scores if len(a_scores) < len(a) else b_scores).append(scores)
    items = sorted(set.intersection(*(set(s) for s in a_scores + b_scores)))
    if not items:
        raise ValueError("the files share no item ids: they are not evaluations of the same items")
    left = [a_scores[i][item] for i, _ in pairs for item in items]
    right = [b_scores[j][item] for _, j in pairs for item in items]
    low, high = paired_bootstrap(left, right)

    def side(paths, per_file):
        means = [sum(s[item] for item in items) / len(items) for s in per_file]
        return {"files": [str(samples_path(p)) for p in paths], "means": [round(m, 4) for m in means],
                "mean": round(sum(means) / len(means), 4)}

    return {"metric": metric, "items": len(items), "file_pairs": len(pairs),
            "a": side(a, a_scores), "b": side(b, b_scores),
            "a_minus_b": round((sum(left) - sum(right)) / len(left), 4), "ci95": [round(low, 4), round(high, 4)],
            "a_higher": sum(x > y for x, y in zip(left, right)), "b_higher": sum(y > x for x, y in zip(left, right))}

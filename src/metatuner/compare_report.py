"""The report side of `metatuner compare`: its config, each method's run config, and the results written from the
run folders. Light (no torch), so `compare --report-only` rewrites the results without loading the training and
evaluation machinery, which `compare.py` imports to run the methods.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from .config import ConfigError, RunConfig, load_config, omegaconf_message
from .report import add_answers_in_prompts, add_intervals, collect, markdown, per_item_scores, primary_metric
from .seed_report import published_seed_rows, seed_markdown, seed_results

# Methods whose result is one task-level instruction (best_prompt.txt), with BetterTogether's adapter.
SEARCH_METHODS = ("opro", "better_together", "rlprompt")
# Methods that are not MetaTuner variants: each is its own kind of run, named by its method name, except those in
# KINDS (`bpo_zero_shot` is a BPO run whose M is the base model).
BASELINES = ("zero_shot", "sft", "dpo", "grpo", "bpo", "bpo_zero_shot", *SEARCH_METHODS)
KINDS = {"bpo_zero_shot": "bpo"}
# The key through which a baseline starts from the SFT run's adapter (its start, or its frozen M); the others do not.
SFT_ADAPTER_KEYS = {"dpo": "dpo.init_adapter", "grpo": "grpo.init_adapter", "bpo": "bpo.actor_adapter"}
LOSS_PANEL = "task / SFT loss"


def method_kind(name: str) -> str:
    """What kind of run a comparison's method is: a baseline's own kind, else `metatuner` (a variant)."""
    return KINDS.get(name, name) if name in BASELINES else "metatuner"


def starts_from_sft(name: str) -> bool:
    """MetaTuner variants, DPO, GRPO and BPO (its frozen M) start from the SFT baseline's adapter (zero-shot, the
    searches, RLPrompt and `bpo_zero_shot` do not)."""
    return method_kind(name) == "metatuner" or name in SFT_ADAPTER_KEYS


@dataclass
class CompareConfig:
    name: str = field(default="comparison", metadata={"help": "Results file stem: <results_dir>/<name>.json."})
    results_dir: str = field(default="docs/results", metadata={"help": "Where the JSON, Markdown and plot go."})
    runs_dir: str = field(default="runs/compare", metadata={"help": "One run folder per method under this."})
    base: dict[str, Any] = field(default_factory=dict, metadata={"help": "The run config shared by all methods."})
    methods: dict[str, Any] = field(default_factory=dict, metadata={"help": "method name -> config overrides."})
    notes: dict[str, Any] = field(default_factory=dict, metadata={"help": "Recorded at the top of the results."})
    eval_sample: Optional[int] = field(default=None, metadata={
        "help": "Evaluate every method on a seeded random sample of this many test items (None: the whole split)."})
    eval_sample_seed: int = field(default=0, metadata={"help": "Seed of the `eval_sample` draw."})
    seeds: list[int] = field(default_factory=list, metadata={
        "help": "Run every method once per seed, each seed's runs in <runs_dir>/seed-<s>/ (its MetaTuner variants "
                "starting from that seed's SFT adapter), and report per-seed scores, their mean and MetaTuner-J "
                "minus each method over the pooled (seed, item) pairs. Empty: one run with base.seed."})
    full_test_methods: list[str] = field(default_factory=list, metadata={
        "help": "Methods also evaluated on the whole test split when `eval_sample` is set (<name>-full.json)."})


def load_compare_config(path: str | Path, overrides: list[str] | None = None) -> CompareConfig:
    """The comparison config at `path`, with `key=value` overrides applied to its `base` run config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison config not found: {path}")
    bad = [o for o in overrides or [] if "=" not in o]
    if bad:
        raise ConfigError(f"overrides must look like key=value, got: {' '.join(bad)}")
    try:
        layers = [OmegaConf.structured(CompareConfig), OmegaConf.load(path)]
        if overrides:
            layers.append(OmegaConf.create({"base": OmegaConf.to_container(OmegaConf.from_dotlist(overrides))}))
        cfg: CompareConfig = OmegaConf.to_object(OmegaConf.merge(*layers))
    except Exception as err:  # OmegaConf's errors: the key path and the first line, not its internals
        key = getattr(err, "full_key", None)
        raise ConfigError(f"invalid comparison config {path}: " + (f"key `{key}`: " if key else "")
                          + omegaconf_message(err)) from None
    if not cfg.methods:
        raise ConfigError(f"{path}: `methods` is empty")
    if cfg.eval_sample is not None and cfg.eval_sample < 1:
        raise ConfigError(f"{path}: `eval_sample` must be at least 1 or null")
    if cfg.seeds and (cfg.full_test_methods or len(set(cfg.seeds)) != len(cfg.seeds)):
        raise ConfigError(f"{path}: `seeds` must be distinct and cannot be combined with `full_test_methods`")
    unknown = sorted(set(cfg.full_test_methods) - set(cfg.methods))
    if unknown:
        raise ConfigError(f"{path}: `full_test_methods` names methods not in `methods`: {', '.join(unknown)}")
    for name in cfg.methods:  # fail before any model loads, naming the method
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or ".." in name:
            # The name becomes a folder under runs_dir: it must not climb out of it.
            raise ConfigError(f"{path}: method name {name!r} must be letters, digits, '_', '-' or '.'")
        method_config(cfg, name)
    return cfg


def for_seed(cfg: CompareConfig, seed: int) -> CompareConfig:
    """The comparison as run under one of its `seeds`: its own run folders and base seed."""
    return replace(cfg, runs_dir=str(Path(cfg.runs_dir) / f"seed-{seed}"), base={**cfg.base, "seed": seed}, seeds=[])


def _dotlist(overrides: dict[str, Any] | None) -> list[str]:
    # OmegaConf parses each dotlist value as YAML, and JSON is YAML: dicts, lists and None (`null`) keep their type,
    # and a string stays the same string even where it has colons, newlines or reads as a number or `true`.
    return [f"{k}={json.dumps(v) if isinstance(v, (dict, list, str)) or v is None else v}"
            for k, v in (overrides or {}).items()]


def method_config(cfg: CompareConfig, name: str) -> RunConfig:
    base = OmegaConf.create(cfg.base)
    kind = method_kind(name)
    overrides = [f"method={'sft' if kind == 'zero_shot' else kind}", f"output_dir={Path(cfg.runs_dir) / name}"]
    sft_adapter = Path(cfg.runs_dir) / "sft" / "adapter"
    if kind == "metatuner" and "sft" in cfg.methods:
        # MetaTuner's warm-up of M is the SFT baseline's adapter: the same run, not a second one.
        overrides.append(f"metatuner.warmup_actor_adapter={sft_adapter}")
    if name in SFT_ADAPTER_KEYS and "sft" in cfg.methods:
        # DPO and GRPO start from (and are anchored to) the SFT policy; BPO's frozen M is the SFT model.
        overrides.append(f"{SFT_ADAPTER_KEYS[name]}={sft_adapter}")
    # A private file per call: comparisons of one config may run as several processes (`--only`) at once.
    fd, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".yaml")
    os.close(fd)
    tmp = Path(tmp)
    OmegaConf.save(base, tmp)
    try:
        return load_config(tmp, overrides + _dotlist(cfg.methods[name]))
    except ConfigError as err:
        raise ConfigError(f"method `{name}`: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def write_results(cfg: CompareConfig, config_path: str | Path) -> dict:
    """Write the results of every finished method of the comparison (`compare --report-only`: nothing runs)."""
    names = list(cfg.methods)
    # Command-line overrides are not top-level notes: each row records the command that produced it, and one
    # comparison's rows may come from several commands.
    notes = {"config": str(config_path), **cfg.notes}
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.seeds:
        return _report_seeds(cfg, names, notes, out)
    results = _report(cfg, names, "eval", cfg.name, notes, out)
    if cfg.eval_sample is not None and cfg.full_test_methods:
        _report(cfg, cfg.full_test_methods, "eval-full", f"{cfg.name}-full", notes, out)
    return results


def _report(cfg: CompareConfig, names: list[str], eval_folder: str, stem: str, notes: dict, out: Path) -> dict:
    """Collect the finished methods' evaluations in `eval_folder` into <stem>.json, .md and .png. A method with no
    run folder here keeps its row from <stem>.json as published, so a comparison can span machines whose run
    folders are gone (delete a row, or the file, to drop it)."""
    runs = Path(cfg.runs_dir)
    finished = {n: (runs / n / eval_folder, runs / n if (runs / n / "train_metrics.json").is_file() else None)
                for n in names if (runs / n / eval_folder / "metrics.json").is_file()}
    results = collect(cfg.name, finished, notes)
    if finished:
        with open(next(iter(finished.values()))[0] / "samples.jsonl") as f:
            results["eval_ids"] = [json.loads(line)["id"] for line in f]
        sampled = cfg.eval_sample is not None and eval_folder == "eval"
        results["eval_items"] = f"{len(results['eval_ids'])} test items" + (
            f", a seeded sample (eval_sample_seed {cfg.eval_sample_seed})" if sampled else "")
    samples = out / "samples" / stem  # per-item outputs beside the table, so its intervals can be recomputed
    samples.mkdir(parents=True, exist_ok=True)
    for name, (eval_dir, train_dir) in finished.items():
        _gzip_copy(eval_dir / "samples.jsonl", samples / f"{name}.jsonl.gz")
        if train_dir is not None and eval_folder == "eval":  # kept too, so the plot outlives the run folder
            curves = training_curves(json.loads((train_dir / "train_metrics.json").read_text()))
            (samples / f"{name}.curves.json").write_text(json.dumps(curves) + "\n")
    kept = _published_rows(out / f"{stem}.json", samples, [n for n in names if n not in finished], results)
    if kept:
        print(f"[compare] {stem}: kept the published rows of {', '.join(kept)} (no run folder under {runs})")
        rows = {**results["methods"], **kept}
        results["methods"] = {n: rows[n] for n in names if n in rows}  # the config's order
        add_intervals(results, {n: per_item_scores(samples / f"{n}.jsonl.gz", primary_metric(row))
                                for n, row in rows.items()})
    _add_warmup_budget(results, runs)
    if not results["methods"]:
        return results
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(f"# {stem}\n\n" + markdown(results))
    plot_scores(results, out / f"{stem}.png")
    if eval_folder == "eval":
        _plot_saved_curves(results, samples, out / f"{stem}-training.png")
    print(markdown(results))
    return results


def _report_seeds(cfg: CompareConfig, names: list[str], notes: dict, out: Path) -> dict:
    """<name>.json and .md of a comparison with `seeds`, from the seeds' finished runs, with every run's per-item
    outputs under <results_dir>/samples/<name>/<method>-seed<s>.jsonl.gz. A (method, seed) with no run folder here
    keeps its published row, as in `_report`, so seeds can run on different machines or sittings."""
    runs: dict[str, dict[int, tuple[Path, Path | None]]] = {}
    for name in names:
        for seed in cfg.seeds:
            folder = Path(for_seed(cfg, seed).runs_dir) / name
            if (folder / "eval" / "metrics.json").is_file():
                train = folder if (folder / "train_metrics.json").is_file() else None
                runs.setdefault(name, {})[seed] = (folder / "eval", train)
    samples = out / "samples" / cfg.name
    samples.mkdir(parents=True, exist_ok=True)
    for name, by_seed in runs.items():
        for seed, (eval_dir, _) in by_seed.items():
            _gzip_copy(eval_dir / "samples.jsonl", samples / f"{name}-seed{seed}.jsonl.gz")
    published = _read_results(out / f"{cfg.name}.json")
    kept = {name: {seed: row for seed, row in by_seed.items() if seed in cfg.seeds and seed not in runs.get(name, {})}
            for name, by_seed in published_seed_rows(published, samples).items() if name in names}
    kept = {name: by_seed for name, by_seed in kept.items() if by_seed}
    if kept:
        print(f"[compare] {cfg.name}: kept the published rows of " + ", ".join(
            f"{name} (seed {', '.join(map(str, sorted(by_seed)))})" for name, by_seed in kept.items()))
    if not runs and not kept:
        return {}
    results = seed_results(cfg.name, runs, {**notes, "seeds": cfg.seeds}, kept=kept)
    results["methods"] = {n: results["methods"][n] for n in names if n in results["methods"]}  # the config's order
    (out / f"{cfg.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{cfg.name}.md").write_text(f"# {cfg.name}\n\n" + seed_markdown(results))
    print(seed_markdown(results))
    return results


def _read_results(path: Path) -> dict:
    """Published results at `path` ({} when there are none), or a clear error naming the file."""
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); fix or delete it to rewrite the results") from None


def _gzip_copy(source: Path, target: Path) -> None:
    with open(source, "rb") as src, open(target, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as dst:  # mtime=0: same bytes for the same samples
            shutil.copyfileobj(src, dst)


def _plot_saved_curves(results: dict, samples: Path, path: Path) -> None:
    """Plot the curves saved beside the per-item outputs; a published plot is left as it is while some trained row
    has none saved (rows published before curves were kept), rather than redrawn without it."""
    curves = {n: samples / f"{n}.curves.json" for n, row in results["methods"].items() if row.get("train_examples")}
    missing = [n for n, file in curves.items() if not file.is_file()]
    if missing and path.is_file():
        print(f"[compare] {path} left as it is: no saved training curves for {', '.join(missing)}")
        return
    plot_training_curves({n: json.loads(file.read_text()) for n, file in curves.items() if file.is_file()}, path)


def _published_rows(path: Path, samples: Path, names: list[str], results: dict) -> dict[str, dict]:
    """The rows of `names` in the published results at `path` whose per-item outputs are in `samples`; none when
    those results were scored on other items than the finished runs (`results["eval_ids"]`, set here when none
    finished)."""
    if not path.is_file() or not names:
        return {}
    published = _read_results(path)
    ids = published.get("eval_ids")
    if "eval_ids" in results and ids != results["eval_ids"]:
        print(f"[compare] {path} was scored on other items than these runs: its rows are not kept")
        return {}
    kept = {n: {k: v for k, v in published["methods"][n].items() if k != "ci_vs_metatuner_j"}
            for n in names if n in published.get("methods", {}) and (samples / f"{n}.jsonl.gz").is_file()}
    for n, row in kept.items():
        add_answers_in_prompts(row.get("diagnostics"), samples / f"{n}.jsonl.gz")
    if kept and ids is not None and "eval_ids" not in results:  # nothing ran here: the published items
        results["eval_ids"] = ids
    return kept


def _started_from_sft(name: str, runs: Path) -> bool:
    """Whether the run of `name` started from the SFT run's adapter, as its run folder's config.yaml says (a MetaTuner
    variant whose overrides set `metatuner.warmup_actor_adapter: null` trains its own warm-up of M instead). A
    published row kept without a run folder was counted when it was first reported: nothing to add."""
    config = runs / name / "config.yaml"
    if not config.is_file():
        return False
    if name in BASELINES and name not in SFT_ADAPTER_KEYS:
        return False
    key = SFT_ADAPTER_KEYS.get(name, "metatuner.warmup_actor_adapter")
    adapter = OmegaConf.select(OmegaConf.load(config), key)
    if not adapter:
        return False
    # The SFT run's adapter, matched by its last two parts: config.yaml keeps the path it ran with, which is no longer
    # this folder's once the runs folder has moved.
    return Path(adapter).parts[-2:] == ("sft", "adapter")


def _add_warmup_budget(results: dict, runs: Path) -> None:
    """Runs that started from the SFT run's adapter (MetaTuner variants, DPO, GRPO and BPO, unless their overrides
    say otherwise): count that run's examples and seconds in their budget (once: a published row kept as it is has
    them already)."""
    sft_run = runs / "sft" / "train_metrics.json"
    sft = json.loads(sft_run.read_text()) if sft_run.is_file() else results["methods"].get("sft")
    if not sft:
        return
    for name, entry in results["methods"].items():
        if "warmup_train_examples" not in entry and _started_from_sft(name, runs):
            entry["warmup_train_examples"] = sft["train_examples"]
            entry["train_examples"] += sft["train_examples"]
            entry["train_seconds"] = round(entry["train_seconds"] + sft["train_seconds"], 1)


def plot_scores(results: dict, path: Path) -> None:
    """Bar chart of each method's primary score, labelled with its paired-bootstrap interval against MetaTuner-J."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    metric = primary_metric(next(iter(methods.values())))
    names = list(methods)
    scores = [methods[n][metric] for n in names]
    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(names)), 3.5))
    ax.bar(names, scores, color=["tab:red" if n == "metatuner_j" else "tab:blue" for n in names])
    for i, n in enumerate(names):
        ci = methods[n].get("ci_vs_metatuner_j")
        if ci:  # the 95% interval of MetaTuner-J's score minus this method's, on the same items
            ax.annotate(f"J-this\n[{ci[0]:+.3f}, {ci[1]:+.3f}]", (i, scores[i]), ha="center", va="bottom", fontsize=7)
    ax.set_ylabel(metric)
    ax.set_title(f"{results['task']}: {metric}")
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def training_curves(train_metrics: dict) -> dict[str, list[float]]:
    """A run's curves by panel: M's loss (SFT's loss, MetaTuner's task loss) and the SR loss, one value per step."""
    curves = {}
    history = train_metrics.get("history", {})
    if isinstance(train_metrics.get("loss_curve"), list):
        curves[LOSS_PANEL] = train_metrics["loss_curve"]
    if isinstance(history, dict):
        if history.get("train/loss"):  # SFT, DPO
            curves[LOSS_PANEL] = history["train/loss"]
        if history.get("train/task_loss"):
            curves[LOSS_PANEL] = history["train/task_loss"]
        if history.get("train/sr_loss"):
            curves["SR loss"] = history["train/sr_loss"]
    return curves


def plot_training_curves(curves: dict[str, dict[str, list[float]]], path: Path) -> None:
    """Training curves (method -> panel -> values, from `training_curves`) against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict[str, dict[str, list[float]]] = {}
    for name, by_panel in curves.items():
        for title, values in by_panel.items():
            panels.setdefault(title, {})[name] = values
    if not panels:
        return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, lines) in zip(axes[0], sorted(panels.items(), key=lambda kv: kv[0] != LOSS_PANEL)):
        for name, values in lines.items():
            ax.plot(range(1, len(values) + 1), values, label=name, linewidth=1)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

"""`metatuner compare`: every method through the same data, budget, seed and evaluation, then one results table.

    metatuner compare --config configs/compare-arithmetic.yaml            # runs what is missing, then reports
    metatuner compare --config configs/compare-arithmetic.yaml --only sft,metatuner_j

The config has a `base` run config shared by all methods and a `methods` map from a method name to its overrides
(`key: value` in the run config's dotted form). A method's kind comes from its name: `zero_shot`, `sft`, `opro`,
`better_together`, and everything else is MetaTuner with the given overrides (`metatuner_j`, `metatuner_i`,
`prompt_only`, `params_only`, `no_share`). A method whose `eval/metrics.json` exists is skipped, so a long
comparison can span several sittings. Results go to `<results_dir>/<name>.json` and `.md`, with per-sample JSONL
in each run folder and a plot of the scores with their 95% paired-bootstrap intervals.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from .config import ConfigError, RunConfig, load_config
from .report import NOT_SCORES, collect, markdown

SEARCH_METHODS = ("opro", "better_together")


@dataclass
class CompareConfig:
    name: str = field(default="comparison", metadata={"help": "Results file stem: <results_dir>/<name>.json."})
    results_dir: str = field(default="docs/results", metadata={"help": "Where the JSON, Markdown and plot go."})
    runs_dir: str = field(default="runs/compare", metadata={"help": "One run folder per method under this."})
    base: dict[str, Any] = field(default_factory=dict, metadata={"help": "The run config shared by all methods."})
    methods: dict[str, Any] = field(default_factory=dict, metadata={"help": "method name -> config overrides."})
    notes: dict[str, Any] = field(default_factory=dict, metadata={"help": "Recorded at the top of the results."})


def load_compare_config(path: str | Path) -> CompareConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison config not found: {path}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(CompareConfig), OmegaConf.load(path))
        cfg: CompareConfig = OmegaConf.to_object(merged)
    except Exception as err:  # OmegaConf's errors carry the key path in their message
        raise ConfigError(f"invalid comparison config {path}: {err}") from None
    if not cfg.methods:
        raise ConfigError(f"{path}: `methods` is empty")
    for name in cfg.methods:  # fail before any model loads, naming the method
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", name) or ".." in name:
            # The name becomes a folder under runs_dir: it must not climb out of it.
            raise ConfigError(f"{path}: method name {name!r} must be letters, digits, '_', '-' or '.'")
        method_config(cfg, name)
    return cfg


def _dotlist(overrides: dict[str, Any] | None) -> list[str]:
    return [f"{k}={json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in (overrides or {}).items()]


def method_config(cfg: CompareConfig, name: str) -> RunConfig:
    base = OmegaConf.create(cfg.base)
    kind = name if name in ("zero_shot", "sft", *SEARCH_METHODS) else "metatuner"
    overrides = [f"method={'sft' if kind == 'zero_shot' else kind}", f"output_dir={Path(cfg.runs_dir) / name}"]
    if kind == "metatuner" and "sft" in cfg.methods:
        # MetaTuner's warm-up of M is the SFT baseline's adapter: the same run, not a second one.
        overrides.append(f"metatuner.warmup_actor_adapter={Path(cfg.runs_dir) / 'sft' / 'adapter'}")
    tmp = Path(cfg.runs_dir) / f".{name}.base.yaml"
    tmp.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(base, tmp)
    try:
        return load_config(tmp, overrides + _dotlist(cfg.methods[name]))
    except ConfigError as err:
        raise ConfigError(f"method `{name}`: {err}") from None
    finally:
        tmp.unlink(missing_ok=True)


def run_method(cfg: CompareConfig, name: str) -> Path:
    """Train (if the method trains) and evaluate one method; returns its run folder."""
    from .evaluate import evaluate
    from .models import load_model
    from .tasks import get_task

    run_cfg = method_config(cfg, name)
    out = Path(run_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task = get_task(run_cfg.data.task, **run_cfg.data.task_options)
    test = task.load(run_cfg.data.eval_split, path=run_cfg.data.eval_path, limit=run_cfg.data.eval_limit)
    kwargs = dict(batch_size=run_cfg.eval.batch_size, max_new_tokens=run_cfg.eval.max_new_tokens,
                  mc_mode=run_cfg.eval.mc_mode)
    if name == "zero_shot" or name == "sft" or name in SEARCH_METHODS:
        prompt, adapter = run_cfg.data.prompt, None
        if name == "sft":
            from .baselines.sft import train_sft

            if not (out / "adapter" / "adapter_config.json").is_file():
                train_sft(run_cfg)
            adapter = out / "adapter"
        elif name in SEARCH_METHODS:
            prompt, adapter = _train_search(run_cfg, name, out)
        model, tokenizer = load_model(run_cfg.model.actor or run_cfg.model.name, run_cfg.model.dtype,
                                      run_cfg.model.device)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter).eval()
        result = evaluate(model, tokenizer, task, test, prompt, **kwargs)
    else:
        from .metatuner import MetaTuner
        from .train import train_metatuner

        if not (out / "model" / "metatuner.json").is_file():
            train_metatuner(run_cfg)
        mt = MetaTuner.from_pretrained(out, device=run_cfg.model.device)
        result = mt.evaluate(test, **kwargs)
    result.metrics["method"] = name
    result.write(out / "eval")
    return out


def _train_search(run_cfg: RunConfig, name: str, out: Path):
    """OPRO-like search or BetterTogether; returns the found instruction and the adapter (BetterTogether)."""
    if name == "opro":
        from .baselines.opro import train_opro as train
    else:
        from .baselines.better_together import train_better_together as train
    if not (out / "best_prompt.txt").is_file():
        train(run_cfg)
    adapter = out / "adapter" if (out / "adapter" / "adapter_config.json").is_file() else None
    return (out / "best_prompt.txt").read_text().strip(), adapter


def compare(config_path: str | Path, only: list[str] | None = None) -> dict:
    cfg = load_compare_config(config_path)
    names = list(cfg.methods)
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ConfigError(f"--only names methods not in the config: {', '.join(unknown)}")
    # SFT first: MetaTuner variants start from its adapter.
    order = sorted(names, key=lambda n: (n != "sft", names.index(n)))
    for name in order:
        if only and name not in only:
            continue
        out = Path(cfg.runs_dir) / name
        if (out / "eval" / "metrics.json").is_file():
            print(f"[compare] {name}: finished earlier, skipping ({out})")
            continue
        started = time.perf_counter()
        print(f"[compare] {name}: running")
        run_method(cfg, name)
        print(f"[compare] {name}: done in {time.perf_counter() - started:.0f} s")
    finished = {n: (Path(cfg.runs_dir) / n / "eval",
                    Path(cfg.runs_dir) / n if (Path(cfg.runs_dir) / n / "train_metrics.json").is_file() else None)
                for n in names if (Path(cfg.runs_dir) / n / "eval" / "metrics.json").is_file()}
    results = collect(cfg.name, finished, {"config": str(config_path), **cfg.notes})
    _add_warmup_budget(results, cfg)
    out = Path(cfg.results_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{cfg.name}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{cfg.name}.md").write_text(f"# {cfg.name}\n\n" + markdown(results))
    plot_scores(results, out / f"{cfg.name}.png")
    print(markdown(results))
    return results


def _add_warmup_budget(results: dict, cfg: CompareConfig) -> None:
    """MetaTuner variants start from the SFT adapter: count its examples and seconds in their budget."""
    sft = results["methods"].get("sft")
    if not sft:
        return
    for name, entry in results["methods"].items():
        if name not in ("zero_shot", "sft", *SEARCH_METHODS) and "train_examples" in entry:
            entry["warmup_train_examples"] = sft["train_examples"]
            entry["train_examples"] += sft["train_examples"]
            entry["train_seconds"] = round(entry["train_seconds"] + sft["train_seconds"], 1)


def plot_scores(results: dict, path: Path) -> None:
    """Bar chart of each method's primary score, labelled with its paired-bootstrap interval against MetaTuner-J."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = results["methods"]
    metric = next(k for k, v in next(iter(methods.values())).items() if isinstance(v, float) and k not in NOT_SCORES)
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

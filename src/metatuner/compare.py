"""`metatuner compare`: every method through the same data, budget, seed and evaluation, then one results table.

    metatuner compare --config configs/compare-arithmetic.yaml            # runs what is missing, then reports
    metatuner compare --config configs/compare-arithmetic.yaml --only sft,metatuner_j
    metatuner compare --config configs/compare-gsm8k.yaml model.device=cuda eval.batch_size=128   # overrides

The config has a `base` run config shared by all methods and a `methods` map from a method name to its overrides
(`key: value` in the run config's dotted form). A method's kind comes from its name: `zero_shot`, `sft`, `opro`,
`better_together`, `dpo`, `grpo`, `bpo` (frozen SFT M), `bpo_zero_shot` (frozen base M), `rlprompt`, and
everything else is MetaTuner with the given overrides (`metatuner_j`, `metatuner_i`, `prompt_only`, `params_only`,
`no_share`). A method whose `eval/metrics.json` exists is skipped, so a long
comparison can span several sittings; a method that starts from the SFT adapter trains it first when it is
missing. `key=value` overrides after the config apply to `base`, so to every method.

Every method is evaluated on the same items: the whole test split, or a seeded sample of `eval_sample` items whose
ids are listed in the results. Methods named in `full_test_methods` are also evaluated on the whole split
(`<results_dir>/<name>-full.json`). Results go to `<results_dir>/<name>.json` and `.md`, with a plot of the scores
with their 95% paired-bootstrap intervals, a plot of the training curves, and every method's per-item outputs
(gzipped JSONL) and training curves under `<results_dir>/samples/<name>/`. A method listed in the config whose run
folder is not on this machine keeps its row from the published `<name>.json` (with its intervals recomputed from
the per-item outputs), so a comparison can span machines; rows scored on other items are dropped, with a message.

With `seeds: [0, 1, 2]` every method runs once per seed (in `<runs_dir>/seed-<s>/`), and the results give each
method's per-seed scores, their mean, and MetaTuner-J minus it over the pooled (seed, item) pairs
(`seed_report.py`).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from peft import PeftModel

from .baselines.better_together import train_better_together
from .baselines.bpo import train_bpo
from .baselines.dpo import train_dpo
from .baselines.grpo import train_grpo
from .baselines.opro import train_opro
from .baselines.rlprompt import train_rlprompt
from .baselines.sft import train_sft
from .compare_report import (  # noqa: F401 (load_compare_config, method_config: used from here by the CLI and tests)
    BASELINES,
    SEARCH_METHODS,
    CompareConfig,
    for_seed,
    load_compare_config,
    method_config,
    method_kind,
    starts_from_sft,
    write_results,
)

ADAPTER_TRAINERS = {"sft": train_sft, "dpo": train_dpo, "grpo": train_grpo}  # each writes <run>/adapter/
SEARCH_TRAINERS = {"opro": train_opro, "better_together": train_better_together, "rlprompt": train_rlprompt}
from .config import ConfigError, RunConfig
from .evaluate import evaluate
from .model import MetaTuner
from .models import load_model
from .runtime import command_line, reset_peak_rss
from .tasks import get_task
from .train import train_metatuner


def eval_items(cfg: CompareConfig, run_cfg: RunConfig, task, full: bool = False):
    """The test items every method is scored on: the whole split, or the config's seeded sample of it."""
    test = task.load(run_cfg.data.eval_split, path=run_cfg.data.eval_path, limit=run_cfg.data.eval_limit)
    if full or cfg.eval_sample is None or cfg.eval_sample >= len(test):
        return test
    chosen = set(random.Random(cfg.eval_sample_seed).sample(range(len(test)), cfg.eval_sample))
    return [ex for i, ex in enumerate(test) if i in chosen]  # in the split's order


def run_method(cfg: CompareConfig, name: str, full: bool = False) -> Path:
    """Train (if the method trains and has not yet) and evaluate one method; returns its run folder.
    `full` evaluates on the whole test split into `eval-full/` instead of the comparison's items into `eval/`."""
    run_cfg = method_config(cfg, name)
    out = Path(run_cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if starts_from_sft(name):
        _ensure_sft_adapter(cfg, name)
    task = get_task(run_cfg.data.task, **run_cfg.data.task_kwargs())
    test = eval_items(cfg, run_cfg, task, full)
    kwargs = dict(batch_size=run_cfg.eval.batch_size, max_new_tokens=run_cfg.eval.max_new_tokens,
                  mc_mode=run_cfg.eval.mc_mode)
    if name in BASELINES and method_kind(name) != "bpo":
        prompt, adapter = run_cfg.data.prompt, None
        if name in ADAPTER_TRAINERS:
            if not _trained(out, out / "adapter" / "adapter_config.json"):
                ADAPTER_TRAINERS[name](run_cfg)
            adapter = out / "adapter"
        elif name in SEARCH_METHODS:
            prompt, adapter = _train_search(run_cfg, name, out)
        model, tokenizer = load_model(run_cfg.model.actor or run_cfg.model.name, run_cfg.model.dtype,
                                      run_cfg.model.device)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter).eval()
        result = evaluate(model, tokenizer, task, test, prompt, **kwargs)
    else:  # MetaTuner variants, and BPO, whose run folder is one of MetaTuner's prompt branch alone
        if not _trained(out, out / "model" / "metatuner.json"):
            (train_bpo if method_kind(name) == "bpo" else train_metatuner)(run_cfg)
        mt = MetaTuner.from_pretrained(out, device=run_cfg.model.device)
        result = mt.evaluate(test, **kwargs)
    result.metrics.update(method=name, command=command_line())
    result.write(out / ("eval-full" if full else "eval"))
    return out


def _trained(out: Path, model_file: Path) -> bool:
    """A run is trained once its model is saved, unless it was stopped before writing train_metrics.json (the model
    is saved first): then, if it has checkpoints, it is trained again, which resumes from the last one and only
    writes what is missing. A model put there by hand, with no checkpoints, is used as it is."""
    stopped = not (out / "train_metrics.json").is_file() and (out / "checkpoints").is_dir()
    return model_file.is_file() and not stopped


def _ensure_sft_adapter(cfg: CompareConfig, name: str) -> None:
    """Train the SFT run that `name` starts from when its adapter is not here (e.g. `--only metatuner_j` on a machine
    without the run folders); evaluating SFT is left to the `sft` method."""
    sft_cfg = method_config(cfg, "sft") if "sft" in cfg.methods else None
    if sft_cfg is None or (Path(sft_cfg.output_dir) / "adapter" / "adapter_config.json").is_file():
        return
    print(f"[compare] {name} starts from the SFT adapter, which is not in {sft_cfg.output_dir}: training it first")
    train_sft(sft_cfg)


def _train_search(run_cfg: RunConfig, name: str, out: Path):
    """OPRO-like search, BetterTogether or RLPrompt; returns the found instruction and the adapter (BetterTogether)."""
    if not (out / "best_prompt.txt").is_file():
        SEARCH_TRAINERS[name](run_cfg)
    adapter = out / "adapter" if (out / "adapter" / "adapter_config.json").is_file() else None
    return (out / "best_prompt.txt").read_text().strip(), adapter


def compare(config_path: str | Path, only: list[str] | None = None, overrides: list[str] | None = None,
            report_only: bool = False, only_seeds: list[int] | None = None) -> dict:
    """Run the methods that have not finished (all, or those in `only`; under every seed, or those in
    `only_seeds`), then write the results of every finished one. `report_only` runs nothing: it rewrites the results
    from the run folders as they are."""
    cfg = load_compare_config(config_path, overrides)
    names = list(cfg.methods)
    unknown = sorted(set(only or []) - set(names))
    if unknown:
        raise ConfigError(f"--only names methods not in the config: {', '.join(unknown)}")
    stray = sorted(set(only_seeds or []) - set(cfg.seeds))
    if stray:
        raise ConfigError(f"--seeds names seeds not in the config's `seeds` ({cfg.seeds}): {stray}")
    # SFT first: MetaTuner variants start from its adapter.
    order = sorted(names, key=lambda n: (n != "sft", names.index(n)))
    evals = [(name, False) for name in order]
    if cfg.eval_sample is not None:
        evals += [(name, True) for name in order if name in cfg.full_test_methods]
    # With seeds, each method runs under every seed before the next method starts.
    runs_of = [(name, full, for_seed(cfg, seed) if cfg.seeds else cfg, seed)
               for name, full in evals for seed in (cfg.seeds or [None])]
    for name, full, run_cfg, seed in runs_of:
        if report_only or (only and name not in only) or (only_seeds and seed not in only_seeds):
            continue
        label = f"{name} (whole test split)" if full else name
        label += f", seed {seed}" if seed is not None else ""
        runs = Path(run_cfg.runs_dir)
        if (runs / name / ("eval-full" if full else "eval") / "metrics.json").is_file():
            print(f"[compare] {label}: finished earlier, skipping ({runs / name})")
            continue
        started = time.perf_counter()
        print(f"[compare] {label}: running")
        reset_peak_rss()  # each method's peak_rss_mb its own, not the largest of those run before it here
        run_method(run_cfg, name, full)
        print(f"[compare] {label}: done in {time.perf_counter() - started:.0f} s")

    return write_results(cfg, config_path)

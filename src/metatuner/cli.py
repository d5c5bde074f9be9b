"""The `metatuner` command.

    metatuner eval --model embedded:smollm2-135m-instruct --task gsm8k --data-path data/gsm8k/test.jsonl --limit 50
    metatuner train --config configs/sft-gsm8k.yaml train.max_steps=20          # LoRA SFT baseline
    metatuner eval --adapter runs/sft-gsm8k/adapter --task gsm8k --limit 50
    metatuner train --config configs/opro-arithmetic.yaml --eval                # OPRO-like instruction search
    metatuner train --config configs/better_together-arithmetic.yaml --eval     # search, SFT, search again
    metatuner train --method dpo --config configs/sft-gsm8k.yaml dpo.init_adapter=runs/sft-gsm8k/adapter --eval
    metatuner train --config configs/smollm2-gsm8k.yaml                         # MetaTuner
    metatuner eval --run runs/metatuner-gsm8k --limit 50
    metatuner infer --run runs/metatuner-gsm8k "A robe takes 2 bolts of blue fiber and half that much white fiber..."
    metatuner export --run runs/metatuner-gsm8k --query "..." --out adapters/query-1
    metatuner serve --run runs/metatuner-gsm8k --max-batch 16                   # OpenAI-compatible API on :8000
    metatuner compare --config configs/compare-arithmetic.yaml                 # every baseline and ablation
    metatuner paired --a runs/compare-arithmetic/grpo/eval --b runs/compare-arithmetic/sft/eval  # A minus B, 95%
    metatuner tasks

Each command imports what it runs (training, the model, torch) inside its function, after its arguments and
config are checked: `metatuner --help` and every argument or config error answer in well under a second
(tests/test_cli_usability.py checks that torch is not loaded by then).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import List, Optional

import typer

from .config import EMBEDDED_DEFAULT_MODEL, ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _stopped(err: Exception, hint: str) -> None:
    """A training run that stopped on purpose (a signal, or losses that kept going non-finite): say how to go on."""
    typer.secho(f"{err} {hint}", fg=typer.colors.YELLOW, err=True)
    raise typer.Exit(err.exit_code)


@app.command("tasks")
def tasks_cmd() -> None:
    """List the registered tasks and their default instruction."""
    from .tasks import get_task, list_tasks, reasoning_gym_names

    for name in list_tasks(include_reasoning_gym=False):
        try:
            prompt = get_task(name).default_prompt
        except (TypeError, ValueError) as err:  # a task that needs options (custom) is still listed
            prompt = f"(needs options: {err})"
        typer.echo(f"{name:14s} {prompt}")
    names = reasoning_gym_names()
    typer.echo(f"{'rg:<name>':14s} any of {len(names)} reasoning-gym generators: {', '.join(names)}")


@app.command("train")
def train_cmd(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML run config."),
    method: Optional[str] = typer.Option(None, help="Overrides the config's `method`."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides, e.g. train.lr=1e-4"),
    eval_after: bool = typer.Option(False, "--eval/--no-eval", help="Evaluate the result on the eval split."),
    resume: Optional[str] = typer.Option(None, help="auto (newest checkpoint in output_dir) or a checkpoint path."),
    on_bad_row: Optional[str] = typer.Option(None, help="error (default: stop at the first bad data row, naming "
                                             "file, line and field) or skip (drop bad rows and report them)."),
    task_option: Optional[List[str]] = typer.Option(None, help="Task option key=value (repeatable), over the "
                                                    "config's data.task_options."),
) -> None:
    """Train a method described by a YAML config (see configs/)."""
    overrides = list(overrides or [])
    for key, value in _task_options(task_option).items():
        overrides.append(f"data.task_options.{key}={json.dumps(value) if not isinstance(value, str) else value}")
    if resume:
        overrides.append(f"train.resume={resume}")
    if method:
        overrides.append(f"method={method}")
    if on_bad_row:
        overrides.append(f"data.on_bad_row={on_bad_row}")
    try:
        cfg = load_config(config, overrides)
        _check_models(cfg)
        _check_train_lengths(cfg)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:  # DataError is a ValueError
        _fail(str(err))
    if cfg.method in ("metatuner", "bpo"):  # BPO's run folder is one of MetaTuner's prompt branch alone
        from .baselines.bpo import train_bpo
        from .train import train_metatuner
        from .trainer import TrainingStopped

        try:
            out = (train_metatuner if cfg.method == "metatuner" else train_bpo)(cfg)
        except TrainingStopped as err:
            _stopped(err, "Continue with --resume auto.")
        typer.echo(f"trained: {out}")
        if eval_after:
            _evaluate_run_folder(out, cfg.data.eval_path, cfg.data.eval_split, cfg.data.eval_limit, out / "eval",
                                 cfg.eval.batch_size, cfg.eval.max_new_tokens, cfg.eval.mc_mode, cfg.model.device)
        return
    if cfg.method in ("opro", "better_together", "rlprompt"):
        if cfg.method == "opro":
            from .baselines.opro import train_opro as train_search
        elif cfg.method == "rlprompt":
            from .baselines.rlprompt import train_rlprompt as train_search
        else:
            from .baselines.better_together import train_better_together as train_search

        out = train_search(cfg)
        best = (out / "best_prompt.txt").read_text().strip()
        typer.echo(f"trained: {out}\nbest instruction: {best}")
        if eval_after:
            adapter = str(out / "adapter") if cfg.method == "better_together" else None
            _evaluate_model(
                model=cfg.model.actor or cfg.model.name, adapter=adapter, task_name=cfg.data.task,
                data_path=cfg.data.eval_path, split=cfg.data.eval_split, limit=cfg.data.eval_limit, prompt=best,
                out=out / "eval", batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
                mc_mode=cfg.eval.mc_mode, dtype=cfg.model.dtype, device=cfg.model.device,
                task_options=cfg.data.task_kwargs(),
            )
        return
    if cfg.method == "dpo":
        from .baselines.dpo import train_dpo as train_adapter
    elif cfg.method == "grpo":
        from .baselines.grpo import train_grpo as train_adapter
    else:
        from .baselines.sft import train_sft as train_adapter

    out = train_adapter(cfg)
    typer.echo(f"trained: {out}")
    if eval_after:
        _evaluate_model(
            model=cfg.model.actor or cfg.model.name, adapter=str(out / "adapter"), task_name=cfg.data.task,
            data_path=cfg.data.eval_path, split=cfg.data.eval_split, limit=cfg.data.eval_limit, prompt=cfg.data.prompt,
            out=out / "eval", batch_size=cfg.eval.batch_size, max_new_tokens=cfg.eval.max_new_tokens,
            mc_mode=cfg.eval.mc_mode, dtype=cfg.model.dtype, device=cfg.model.device,
            task_options=cfg.data.task_kwargs(),
        )


def _check_models(cfg) -> None:
    """The settings that depend on the models' architecture, from their config.json, before any weights load."""
    from .models import check_model_settings

    check_model_settings(cfg)


def _check_train_lengths(cfg) -> None:
    """Training examples whose question and target alone exceed train.max_length would be cut short: stop on the
    first one (naming file and line) before any weights load. With on_bad_row=skip the trainer leaves them out and
    reports them itself, so there is nothing to do here."""
    if cfg.data.on_bad_row == "skip":
        return
    from .models import load_tokenizer
    from .tasks import check_lengths, get_task, token_counter

    task = get_task(cfg.data.task, **cfg.data.task_kwargs())
    examples = task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit)
    tokenizer = load_tokenizer(cfg.model.actor or cfg.model.name, cfg.model.trust_remote_code)
    check_lengths(examples, token_counter(tokenizer), cfg.train.max_length, "error")


def _fit_context(examples, model, tokenizer, max_new_tokens: int, on_bad_row: str | None):
    """Evaluation items whose question leaves no room for the answer in the model's context window fail (naming
    file, line and field), or with on_bad_row=skip are dropped and reported."""
    from .tasks import check_lengths, token_counter

    context = getattr(model.config, "max_position_embeddings", None)
    if not context:
        return examples
    try:
        return check_lengths(examples, token_counter(tokenizer), context - max_new_tokens, on_bad_row or "error",
                             fields=("question",))
    except ValueError as err:
        _fail(str(err))


@app.command("eval")
def eval_cmd(
    model: Optional[str] = typer.Option(None, help=f"Hub id, local directory or embedded:<name> (default: "
                                        f"{EMBEDDED_DEFAULT_MODEL}); a --run has its own."),
    task: Optional[str] = typer.Option(None, help="Task name (see `metatuner tasks`); with --run, another task "
                                       "than the run's own."),
    run: Optional[Path] = typer.Option(None, help="A MetaTuner run folder: evaluate its prompts and LoRA."),
    data_path: Optional[str] = typer.Option(None, help="Local JSONL/CSV instead of the hub."),
    split: str = typer.Option("test", help="Split to evaluate."),
    limit: Optional[int] = typer.Option(None, help="Evaluate the first N items only."),
    prompt: Optional[str] = typer.Option(None, help="Instruction p0 (default: the task's; with --run, the run's)."),
    adapter: Optional[str] = typer.Option(None, help="A PEFT adapter directory to apply (e.g. from SFT)."),
    out: Optional[Path] = typer.Option(None, help="Run folder for metrics.json and samples.jsonl."),
    batch_size: int = typer.Option(16, help="Generation batch size."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Generation limit (default: the task's)."),
    mc_mode: str = typer.Option("likelihood", help="Multiple choice: likelihood or generate."),
    dtype: str = typer.Option("float32", help="float32, bfloat16, float16 or auto."),
    device: str = typer.Option("auto", help="cpu, cuda, mps or auto."),
    task_option: Optional[List[str]] = typer.Option(None, help="Task option key=value (repeatable); with --run, "
                                                    "applied over the run's own options."),
    on_bad_row: Optional[str] = typer.Option(None, help="error (stop at the first bad data row, naming file, line "
                                             "and field) or skip (drop bad rows and report them)."),
    without_prompts: bool = typer.Option(False, "--without-prompts", help="With --run: M answers under p0 with the "
                                         "run's per-query LoRA (G only encodes): what the written prompts add."),
) -> None:
    """Evaluate a model (optionally with a PEFT adapter) or a MetaTuner run; writes metrics.json and samples.jsonl.

    With --run, --task, --task-option, --data-path and --prompt apply on top of the run's own settings: the
    run writes the prompts and LoRA, the given task loads and scores the items."""
    if on_bad_row not in (None, "error", "skip"):
        _fail(f"--on-bad-row must be error or skip, not {on_bad_row!r}")
    options = _task_options(task_option)
    if on_bad_row:
        options["on_bad_row"] = on_bad_row
    _check_paths(data_path=data_path, adapter=adapter)  # before seconds of imports
    if run is not None:
        for flag, value in (("--model", model), ("--adapter", adapter)):
            if value is not None:
                _fail(f"{flag} does not apply to --run: a MetaTuner run evaluates its own models, prompts and LoRA")
        _evaluate_run_folder(run, data_path, split, limit, out, batch_size, max_new_tokens, mc_mode, device, dtype,
                             task, options, prompt, without_prompts)
        return
    if without_prompts:
        _fail("--without-prompts applies to --run only: a plain model has no written prompts")
    if task is None:
        _fail("--task is required (or --run for a MetaTuner run)")
    _evaluate_model(model or EMBEDDED_DEFAULT_MODEL, adapter, task, data_path, split, limit, prompt, out, batch_size,
                    max_new_tokens, mc_mode, dtype, device, options)


def _task_options(items: list[str] | None) -> dict:
    options = {}
    for item in items or []:
        if "=" not in item:
            _fail(f"--task-option must look like key=value, got {item!r}")
        key, value = item.split("=", 1)
        options[key] = _parse_scalar(value)
    return options


def _check_paths(data_path=None, adapter=None, run=None) -> None:
    if data_path and not Path(data_path).is_file():
        _fail(f"--data-path {data_path}: no such file")
    if adapter and not (Path(adapter) / "adapter_config.json").is_file():
        _fail(f"--adapter {adapter} is not a PEFT adapter directory (no adapter_config.json)")
    if run is not None and not ((Path(run) / "config.yaml").is_file() and (Path(run) / "model" / "metatuner.json").is_file()):
        _fail(f"--run {run} is not a MetaTuner run folder (needs config.yaml and model/)")


def _run_task(run, task_name: str | None, options: dict):
    """The task a run is used with: its own (with `options` over its own options) or `task_name` with `options`;
    unknown options fail here, naming the option, before anything loads."""
    from .tasks import check_task_options, get_task

    _check_paths(run=run)
    cfg = load_config(Path(run) / "config.yaml")
    name = task_name or cfg.data.task
    options = options if task_name else {**cfg.data.task_kwargs(), **options}
    try:
        check_task_options(name, {k: v for k, v in options.items() if k != "on_bad_row"})
        return cfg, get_task(name, **options)
    except (TypeError, ValueError) as err:
        _fail(str(err))


def _evaluate_run_folder(run, data_path, split, limit, out, batch_size, max_new_tokens, mc_mode, device, dtype=None,
                         task_name=None, options=None, prompt=None, without_prompts=False) -> None:
    cfg, task = _run_task(run, task_name, options or {})
    if data_path is None and task_name is None:
        data_path = cfg.data.eval_path  # the run's own eval file
    try:
        examples = task.load(split, path=data_path, limit=limit)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
    from .runtime import command_line  # after the checks above: runtime imports torch

    mt = _load_run(run, device, dtype)
    mt.task, mt.p0 = task, prompt or mt.p0
    if without_prompts:
        mt.settings.use_prompt = False  # G still encodes each query for the hypernetwork; M gets p0
    examples = _fit_context(examples, mt.m, mt.m_tok, max_new_tokens or mt.task.max_new_tokens,
                            (options or {}).get("on_bad_row") or cfg.data.on_bad_row)
    result = mt.evaluate(examples, batch_size=batch_size, max_new_tokens=max_new_tokens, mc_mode=mc_mode)
    result.metrics.update({"run": str(run), "method": "metatuner", "task": task.name, "p0": mt.p0,
                           "written_prompts": not without_prompts, "command": command_line()})
    out = out or Path(run) / "eval"
    result.write(out)
    shown = {k: result.metrics[k] for k in (*mt.task.metrics, "n_eval", "seconds")}
    typer.echo(json.dumps(shown))
    typer.echo(f"diagnostics: {json.dumps(result.metrics['diagnostics'])}")
    typer.echo(f"wrote {out}/metrics.json and {out}/samples.jsonl")


def _load_run(run, device: str = "cpu", dtype: str | None = None):
    from .model import MetaTuner

    try:
        return MetaTuner.from_pretrained(run, device=device if device != "auto" else "cpu", dtype=dtype)
    except (FileNotFoundError, ValueError, ConfigError) as err:
        _fail(str(err))


@app.command("infer")
def infer_cmd(
    questions: List[str] = typer.Argument(..., help="One or more questions."),
    run: Path = typer.Option(..., help="MetaTuner run folder."),
    max_new_tokens: Optional[int] = typer.Option(None, help="Answer length limit (default: the task's)."),
    device: str = typer.Option("cpu", help="cpu, cuda, mps."),
    task: Optional[str] = typer.Option(None, help="Format the questions for another task than the run's own."),
    task_option: Optional[List[str]] = typer.Option(None, help="Task option key=value (repeatable)."),
    prompt: Optional[str] = typer.Option(None, help="Instruction p0 that G rewrites (default: the run's)."),
) -> None:
    """Write a prompt and a LoRA for each question, then answer it; prints JSON lines."""
    _, run_task = _run_task(run, task, _task_options(task_option))
    mt = _load_run(run, device)
    mt.task, mt.p0 = run_task, prompt or mt.p0
    for item in mt.generate(questions, max_new_tokens=max_new_tokens):
        typer.echo(json.dumps(item, ensure_ascii=False))


@app.command("export")
def export_cmd(
    run: Path = typer.Option(..., help="MetaTuner run folder."),
    query: str = typer.Option(..., help="The question whose LoRA to export."),
    out: Path = typer.Option(..., help="Directory for the PEFT adapter (created; must be empty or an adapter)."),
    device: str = typer.Option("cpu", help="cpu, cuda, mps."),
) -> None:
    """Export one query's LoRA as a standard PEFT adapter for the actor model."""
    from .config import load_config
    from .hyperlora import ADAPTER_FILES
    from .models import resolve_model_path

    # The rule export_peft_adapter applies, checked before minutes of loading: the adapter goes into --out and
    # nowhere else, and --out must be new, empty or an earlier adapter, never a folder that holds other files.
    if out.exists() and (not out.is_dir() or any(p.name not in ADAPTER_FILES for p in out.iterdir())):
        _fail(f"--out {out} exists and is not an adapter folder; pick a new or empty folder")
    mt = _load_run(run, device)
    cfg = load_config(Path(run) / "config.yaml")
    base = resolve_model_path(cfg.model.actor or cfg.model.name)
    try:
        path = mt.export_adapter(query, out, base)
    except ValueError as err:
        _fail(str(err))
    typer.echo(f"wrote PEFT adapter to {path}: README.md says how to build its input (the prompt written for this "
               "query, in metatuner_prompt.txt, then the question)")


@app.command("compare")
def compare_cmd(
    config: Path = typer.Option(..., "--config", "-c", help="Comparison YAML (see configs/compare-*.yaml)."),
    only: Optional[str] = typer.Option(None, help="Comma-separated methods to run now (the report covers all)."),
    seeds: Optional[str] = typer.Option(None, help="Comma-separated seeds of the config's `seeds` to run now (the "
                                                   "report covers every seed that has run here or was published)."),
    overrides: Optional[List[str]] = typer.Argument(None, help="key=value overrides of the shared run config."),
    report_only: bool = typer.Option(False, "--report-only", help="Run nothing; rewrite the results from the runs."),
) -> None:
    """Run every method of a comparison under one budget (skipping finished ones) and write the results table."""
    if report_only:  # runs nothing: the report side alone, without torch and the training machinery
        from .compare_report import load_compare_config, write_results

        try:
            write_results(load_compare_config(config, overrides), config)
        except ConfigError as err:
            _fail(str(err))
        return
    from .compare import compare, load_compare_config, method_config, starts_from_sft
    from .trainer import TrainingStopped

    try:
        cmp = load_compare_config(config, overrides)
        selected = only.split(",") if only else None
        # Architecture checks before the first method trains, for the methods that run now (and the SFT run they
        # may start from): a method left out by --only may need a model this machine does not have.
        to_run = [n for n in cmp.methods if selected is None or n in selected
                  or (n == "sft" and any(starts_from_sft(m) for m in selected))]
        for name in [] if report_only else to_run:
            if name != "zero_shot":
                try:
                    _check_models(method_config(cmp, name))
                except ConfigError as err:
                    raise ConfigError(f"method `{name}`: {err}") from None
        compare(config, selected, overrides, report_only, _seed_list(seeds))
    except ConfigError as err:
        _fail(str(err))
    except TrainingStopped as err:  # the methods finished before it keep their run folders; a rerun skips them
        _stopped(err, "Rerun the same command with train.resume=auto to continue from the checkpoint.")


@app.command("paired")
def paired_cmd(
    a: List[Path] = typer.Option(..., "--a", help="Per-item outputs of side A: an eval folder or its samples.jsonl "
                                                 "(.jsonl.gz too); repeat for seeds."),
    b: List[Path] = typer.Option(..., "--b", help="The same for side B."),
    metric: Optional[str] = typer.Option(None, help="Per-item score to compare (default: the files' first)."),
) -> None:
    """Compare two evaluations of the same items: means, 95% paired-bootstrap interval of A minus B (JSON)."""
    from .paired import compare_paired

    try:
        typer.echo(json.dumps(compare_paired(a, b, metric), indent=1))
    except ValueError as err:
        _fail(str(err))


def _seed_list(seeds: str | None) -> list[int] | None:
    try:
        return [int(s) for s in seeds.split(",")] if seeds else None
    except ValueError:
        raise ConfigError(f"--seeds takes comma-separated integers, got {seeds!r}") from None


def _parse_scalar(value: str):
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _evaluate_model(model, adapter, task_name, data_path, split, limit, prompt, out, batch_size, max_new_tokens,
                    mc_mode, dtype, device, task_options) -> None:
    from .tasks import check_task_options, get_task

    try:
        check_task_options(task_name, {k: v for k, v in task_options.items() if k != "on_bad_row"})
        task = get_task(task_name, **task_options)
        examples = task.load(split, path=data_path, limit=limit)
    except (ValueError, FileNotFoundError, RuntimeError) as err:  # RuntimeError: the hub could not be reached
        _fail(str(err))
    # Imported only now: torch and transformers take seconds, and every check above answers before them.
    from .evaluate import evaluate
    from .runtime import command_line

    lm, tokenizer = _load_plain(model, adapter, dtype, device)
    examples = _fit_context(examples, lm, tokenizer, max_new_tokens or task.max_new_tokens,
                            task_options.get("on_bad_row"))
    result = evaluate(lm, tokenizer, task, examples, prompt, batch_size=batch_size,
                      max_new_tokens=max_new_tokens, mc_mode=mc_mode)
    result.metrics.update({"model": model, "adapter": adapter, "prompt": prompt or task.default_prompt,
                           "command": command_line()})
    out = out or Path("runs") / f"eval-{task.name.replace(':', '_')}"
    result.write(out)
    shown = {k: result.metrics[k] for k in (*task.metrics, "n_eval", "seconds", "tokens_per_s")}
    typer.echo(json.dumps(shown))
    typer.echo(f"wrote {out}/metrics.json and {out}/samples.jsonl")


def _load_plain(model: str, adapter: str | None, dtype: str, device: str):
    """A causal LM and its tokenizer, with a PEFT adapter on top when one is given."""
    from .models import ModelLoadError, load_model

    try:
        lm, tokenizer = load_model(model, dtype=dtype, device=device)
    except ModelLoadError as err:
        _fail(str(err))
    if adapter:
        from peft import PeftModel

        _check_paths(adapter=adapter)
        if not (Path(adapter) / "adapter_model.safetensors").is_file():
            # PEFT would fall back to a pickled adapter_model.bin; weights are read from safetensors only.
            _fail(f"{adapter} has no adapter_model.safetensors (pickled weights are never loaded)")
        lm = PeftModel.from_pretrained(lm, adapter).eval()
    return lm, tokenizer


@app.command("serve")
def serve_cmd(
    run: Optional[Path] = typer.Option(None, help="A MetaTuner run folder: every request gets its own written prompt "
                                       "and LoRA."),
    model: Optional[str] = typer.Option(None, help="Serve a plain model instead (hub id, directory or "
                                        "embedded:<name>), for side-by-side comparisons."),
    adapter: Optional[str] = typer.Option(None, help="With --model: a PEFT adapter directory to apply."),
    host: str = typer.Option("127.0.0.1", help="Address to bind; 0.0.0.0 accepts other machines."),
    port: int = typer.Option(8000, help="TCP port (0: any free port)."),
    api_key: Optional[str] = typer.Option(None, envvar="METATUNER_API_KEY", help="Require `Authorization: Bearer "
                                          "KEY` on /v1/* (or set METATUNER_API_KEY, which keeps it out of `ps`)."),
    max_batch: int = typer.Option(16, help="Most requests decoded together."),
    max_queue: int = typer.Option(64, help="Requests that may wait for a batch slot; more get 429."),
    max_tokens_cap: int = typer.Option(1024, help="Largest max_tokens a request may ask for."),
    request_timeout: float = typer.Option(300.0, help="Seconds after which an unfinished request is ended (504)."),
    served_name: Optional[str] = typer.Option(None, help="Model id in /v1/models (default: the run folder's name "
                                              "or --model)."),
    device: str = typer.Option("cpu", help="cpu, cuda, mps."),
    dtype: Optional[str] = typer.Option(None, help="float32, bfloat16, float16 (default: the run's; float32 for "
                                        "--model)."),
) -> None:
    """Serve a MetaTuner run (or a plain model) behind an OpenAI-compatible API; see docs/serving.md."""
    from .serve import require_dependencies

    try:
        require_dependencies()
    except ImportError as err:
        _fail(str(err))
    if (run is None) == (model is None):
        _fail("give one of --run (a MetaTuner run) or --model (a plain model)")
    if adapter and run is not None:
        _fail("--adapter goes with --model; a MetaTuner run writes its own LoRA per request")
    from .serve.settings import ServeSettings

    try:
        settings = ServeSettings(host=host, port=port, api_key=api_key, max_batch=max_batch, max_queue=max_queue,
                                 max_tokens_cap=max_tokens_cap, request_timeout_s=request_timeout,
                                 shutdown_grace_s=request_timeout + 30, served_name=served_name)
    except ValueError as err:
        _fail(str(err))
    _check_paths(adapter=adapter, run=run)
    from .serve.app import create_app, run_server
    from .serve.engine import MetaTunerBackend, ModelBackend

    if run is not None:
        backend = MetaTunerBackend(_load_run(run, device, dtype), settings.served_name or Path(run).name)
    else:
        lm, tokenizer = _load_plain(model, adapter, dtype or "float32", device)
        backend = ModelBackend(lm, tokenizer, settings.served_name or model)
    where = "this machine only; --host 0.0.0.0 to accept others" if host in ("127.0.0.1", "localhost", "::1") \
        else "every machine that can reach this address"
    typer.echo(f"metatuner serve: {backend.name!r} at http://{host}:{port}/v1, reachable from {where}; "
               + ("API key required" if api_key else "no API key (--api-key to require one)"), err=True)
    run_server(create_app(backend, settings), settings)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()

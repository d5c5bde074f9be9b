"""`metatuner eval` against lm-evaluation-harness (`lm_eval --model hf`) on GSM8K, side by side in one process.

Run through the suite: `python benchmarks/perf.py --only eval_vs_lm_eval [--quick]`. It needs lm_eval, a
benchmark-only dependency (`pip install -e ".[bench]"`); without it the figure is skipped with a note.

Both sides get the same model (one local Hugging Face folder: the embedded SmolLM2 as `metatuner` materialises it,
or the tiny test model with --quick), the same first items of the repository's offline GSM8K copy, the same user
turn (the task's default instruction, then the question) under the model's chat template, greedy decoding, the
same stop strings, the same max new tokens, batch size and dtype (lm_eval's batch size can be set apart:
`perf.py --lm-eval-batch-size 1` is lm_eval's own default), and the same answer patterns: lm_eval reads the
task from `benchmarks/lm_eval_tasks/metatuner_gsm8k.yaml`, offline. Timed: `metatuner.evaluate.evaluate` (what
`metatuner eval` runs once the model is loaded) and `lm_eval.simple_evaluate` with an `HFLM` around a copy of the
loaded model (what `lm_eval --model hf` runs once it has loaded it). The figure is examples/s over examples/s;
both accuracies are reported, with the items whose outputs differ. The command lines that reproduce each side are
in the result (`commands`).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
from pathlib import Path

from bench_setup import REPO, Bench
from common import Summary, interleaved

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
TASK_NAME = "metatuner_gsm8k"
DATA = "data/gsm8k/test.jsonl"  # relative to the repository root, as in the task's YAML


@contextlib.contextmanager
def _in_repo():
    """lm_eval's json loader resolves the YAML's data path from the working directory."""
    before = os.getcwd()
    os.chdir(REPO)
    try:
        yield
    finally:
        os.chdir(before)


def _model_dir(b: Bench) -> str:
    if b.model.startswith("embedded:"):
        from metatuner.models import materialise_embedded

        return str(materialise_embedded(b.model))
    return b.model


def eval_vs_lm_eval(b: Bench) -> dict:
    theirs_batch = b.lm_eval_batch_size or b.eval_batch_size
    batches = (f"batch {b.eval_batch_size}" if theirs_batch == b.eval_batch_size
               else f"batch {b.eval_batch_size} / {theirs_batch}")
    what = (f"GSM8K examples/s, first {b.eval_items} items of {DATA}: `metatuner eval` / `lm_eval --model hf`; "
            f"same model folder, zero-shot chat prompt, greedy, max new tokens {b.eval_max_new_tokens}, {batches}, "
            f"{b.eval_dtype}")
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        return {"ratio": None, "what": what,
                "notes": {"eval_vs_lm_eval": "not measured: lm_eval is not installed (pip install -e '.[bench]')"}}
    from metatuner.evaluate import evaluate
    from metatuner.generation import task_chats
    from metatuner.models import load_model
    from metatuner.tasks import get_task

    for name in ("lm_eval", "lm-eval", "datasets"):
        logging.getLogger(name).setLevel(logging.ERROR)
    model_dir = _model_dir(b)
    model, tok = load_model(model_dir, b.eval_dtype, "cpu")
    theirs_model = copy.deepcopy(model)
    task = get_task("gsm8k")
    examples = task.load("test", path=str(REPO / DATA), limit=b.eval_items)
    chats = task_chats(tok, task, [task.default_prompt] * len(examples), examples)
    manager = TaskManager(include_path=str(TASK_DIR), include_defaults=False)
    harness = HFLM(pretrained=theirs_model, tokenizer=tok, batch_size=theirs_batch)
    found: dict = {}

    def ours(limit: int | None = None, max_new_tokens: int | None = None):
        items = examples[:limit] if limit else examples
        found["ours"] = evaluate(model, tok, task, items, batch_size=b.eval_batch_size,
                                 max_new_tokens=max_new_tokens or b.eval_max_new_tokens, progress=False)

    def theirs(limit: int | None = None, max_new_tokens: int | None = None):
        with _in_repo():
            found["lm_eval"] = lm_eval.simple_evaluate(
                model=harness, tasks=[TASK_NAME], task_manager=manager, limit=limit or len(examples),
                apply_chat_template=True, gen_kwargs={"max_gen_toks": max_new_tokens or b.eval_max_new_tokens},
                log_samples=True, bootstrap_iters=0, verbosity="ERROR")

    # One short round of each first (kernels, lm_eval's dataset preparation), then the timed rounds in turns.
    ours(2, 4)
    theirs(2, 4)
    repeats = 1 if not b.quick else b.repeats
    seconds = interleaved({"ours": ours, "lm_eval": theirs}, repeats=repeats, warmup=0)
    rate = {k: [len(examples) / s for s in v] for k, v in seconds.items()}
    work = _work(ours, theirs, {k: Summary(v).median for k, v in seconds.items()})
    return {
        "ratio": round(Summary([a / t for a, t in zip(rate["ours"], rate["lm_eval"])]).median, 4),
        "target": ">= 2.0",
        "what": what,
        "examples": len(examples), "max_new_tokens": b.eval_max_new_tokens, "batch_size": b.eval_batch_size,
        "lm_eval_batch_size": theirs_batch,
        "dtype": b.eval_dtype, "model_dir": model_dir, "repetitions": repeats,
        "ours_examples_per_s": Summary(rate["ours"]).as_dict(3),
        "lm_eval_examples_per_s": Summary(rate["lm_eval"]).as_dict(3),
        **_agreement(found["ours"], found["lm_eval"], chats, len(examples)),
        "lm_eval_version": getattr(lm_eval, "__version__", None),
        "work": work,
        "commands": {
            "ours": f"metatuner eval --model {model_dir} --task gsm8k --data-path {DATA} --limit {len(examples)} "
                    f"--max-new-tokens {b.eval_max_new_tokens} --batch-size {b.eval_batch_size} --dtype {b.eval_dtype}",
            "lm_eval": f"lm_eval --model hf --model_args pretrained={model_dir},dtype={b.eval_dtype} --tasks "
                       f"{TASK_NAME} --include_path benchmarks/lm_eval_tasks --limit {len(examples)} --batch_size "
                       f"{theirs_batch} --apply_chat_template --gen_kwargs max_gen_toks={b.eval_max_new_tokens}",
        },
    }


def _work(ours, theirs, seconds: dict[str, float]) -> dict:
    """Each side's matrix-product FLOPs, counted in one more (untimed) run of each, and its FLOP/s in the timed
    runs: the ratio is lm_eval's FLOPs over ours (what our finished rows leaving the batch save against a batch
    decoded until its last row stops) times our FLOP/s over lm_eval's."""
    from bench_setup import count_flops

    flops = {}
    for name, run in (("ours", ours), ("lm_eval", theirs)):
        with count_flops() as counter:
            run()
        flops[name] = counter.get_total_flops()
    return {
        "what": "matrix-product FLOPs (linear layers and LM head; attention not counted) of one evaluation of the "
                "items, FlopCounterMode in an untimed run; FLOP/s over the timed runs' median seconds",
        "gflop": {k: round(v / 1e9, 1) for k, v in flops.items()},
        "lm_eval_flops_over_ours": round(flops["lm_eval"] / flops["ours"], 3),
        "gflop_per_s": {k: round(flops[k] / seconds[k] / 1e9, 2) for k in flops},
    }


def _agreement(ours, results, chats: list[str], n: int) -> dict:
    """Both sides' accuracies, whether lm_eval saw our inputs, and the items whose outputs or verdicts differ."""
    by_doc = {s["doc_id"]: s for s in results["samples"][TASK_NAME]}  # one entry per filter: the same generation
    samples = [by_doc[i] for i in sorted(by_doc)]
    scores = results["results"][TASK_NAME]
    contexts = [_context(s) for s in samples]
    outputs = [s["resps"][0][0] for s in samples]
    mine = ours.samples
    differ = [i for i in range(n) if outputs[i].strip() != mine[i]["output"]]
    return {
        "accuracy": {"ours": {m: round(ours.metrics[m], 4) for m in ("strict", "flexible")},
                     "lm_eval": {"strict": round(float(scores["exact_match,strict-match"]), 4),
                                 "flexible": round(float(scores["exact_match,flexible-extract"]), 4)}},
        "correct_items": {"ours": {m: sum(s["scores"][m] >= 1.0 for s in mine) for m in ("strict", "flexible")},
                          "lm_eval": {"strict": round(float(scores["exact_match,strict-match"]) * n),
                                      "flexible": round(float(scores["exact_match,flexible-extract"]) * n)}},
        "same_inputs": contexts == chats,
        "same_outputs": n - len(differ),
        "items_with_other_outputs": differ[:20],
    }


def _context(sample) -> str:
    args = sample["arguments"]
    first = args[0] if isinstance(args, (list, tuple)) else next(iter(args.values()))
    return first[0] if isinstance(first, (list, tuple)) else next(iter(first.values()))

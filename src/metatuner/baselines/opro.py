"""OPRO-like task-level instruction search (Yang et al. 2023, "Large Language Models as Optimizers").

    metatuner train --config configs/opro-arithmetic.yaml --eval          # embedded SmolLM2-135M, CPU
    metatuner train --method opro --config configs/sft-gsm8k.yaml search.rounds=8 --eval

The generator G (`model.name`) reads a meta-prompt that lists the instructions tried so far with their dev scores
(the best `search.meta_prompt_top`, sorted ascending so the best comes last, as OPRO does) and a few task examples
(question and gold answer), and samples `search.proposals_per_round` new instructions at `search.temperature`.
The actor M (`model.actor`, by default the same checkpoint with shared weights) scores each one on a dev set carved
from the training split, never the test split. Scorers (`search.scorer`):

- `likelihood` (default): the mean per-token log-likelihood of the gold targets given instruction and question,
  one teacher-forced pass per instruction. On CPU and at 135M parameters it is far cheaper than generating, and
  it is less noisy: accuracy on a few dozen items moves in steps of several points and ties often.
- `accuracy`: the task's primary metric through `evaluate` (generation and the task's own checker).

p0 is scored first and is always in the pool, and a later instruction replaces the best only when it scores
strictly higher, so the result is never worse than p0 on dev. The run folder gets `config.yaml`, `search.json`
(every instruction tried, its dev score and round), `best_prompt.txt`, `train_metrics.json` (whose `history` has
one value per round, round 0 being the initial instructions: `train/best_score`, the best dev score so far, and
the round's `train/round_best_score`, `train/round_mean_score` and `train/new_instructions`) and the same figures
as TensorBoard scalars in `tb/`; `--eval` evaluates the actor with the found instruction on the eval split
(`evaluate(..., prompts=best)`).

Under `accelerate launch` (N processes) the main process writes the proposals and sends them to every process, each
process scores its 1/N of the dev set, and the item-weighted mean is gathered; only the main process writes files.
The result is the one process's (up to float summation order): the search itself stays sequential.
"""

from __future__ import annotations

import contextlib
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ContextManager, Sequence

from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from tqdm.auto import tqdm

from ..config import RunConfig, SearchSettings
from ..distributed import sum_across
from ..evaluate import evaluate
from ..generation import chat_prompt, generate, score_targets, task_chats
from ..models import load_generator_and_actor
from ..tasks.base import Example, Task
from ..trainer import open_run_folder, run_metrics, start_run, start_tracker, write_metrics

# OPRO's meta-prompt for GSM8K (its Figure 3), worded for a chat model. The assistant turn is opened with <INS>
# and generation stops at </INS>, so even a small generator answers with the instruction alone.
META_PROMPT = (
    "Your task is to write an instruction <INS> for solving problems like the ones below. Below are earlier "
    "instructions with their scores. Scores range from 0 to 100; higher is better. They are sorted from the "
    "lowest score to the highest.\n\n{scored}\n\n"
    "Below are some problems. The instruction <INS> is placed before each question.\n\n{examples}\n\n"
    "Write a new instruction that is different from all the instructions above and has a higher score than all "
    "of them. The instruction should be concise, effective, and generally applicable to all problems above. "
    "Write the instruction between <INS> and </INS>."
)
OPEN_TAG, CLOSE_TAG = "<INS>", "</INS>"


@dataclass
class SearchResult:
    """What a search found and everything it tried (the content of `search.json`)."""

    scorer: str
    p0: str
    p0_score: float
    best: str
    best_score: float
    dev_ids: list[str]
    history: list[dict] = field(default_factory=list)
    rounds: list[dict] = field(default_factory=list)  # `round_figures` of round 0 (the initial pool), 1, 2, ...
    instructions_scored: int = 0
    examples_scored: int = 0
    generated_tokens: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return {
            "scorer": self.scorer, "p0": self.p0, "p0_score": self.p0_score, "best": self.best,
            "best_score": self.best_score, "instructions_scored": self.instructions_scored,
            "examples_scored": self.examples_scored, "generated_tokens": self.generated_tokens,
            "seconds": round(self.seconds, 1), "dev_ids": self.dev_ids, "history": self.history,
            "rounds": self.rounds,
        }

    def write(self, out_dir: str | Path) -> Path:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "search.json").write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n")
        (out / "best_prompt.txt").write_text(self.best + "\n")
        return out


def split_dev(examples: Sequence[Example], dev_size: int, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded random dev set of `dev_size` training items, and the remaining items (the meta-prompt's examples).

    With fewer items than dev_size every item is dev and the rest is empty."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    dev = sorted(order[:dev_size])  # keep the data's order: the dev set reads like the split it came from
    rest = sorted(order[dev_size:])
    return [examples[i] for i in dev], [examples[i] for i in rest]


def clean_instruction(text: str) -> str:
    """The instruction inside a generator reply: tags, control characters and wrapping quotes removed, whitespace
    collapsed (an instruction is one paragraph; a newline in it would read as the question's start)."""
    text = text.split(CLOSE_TAG, 1)[0].replace(OPEN_TAG, " ")
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in text).split())
    while len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def display_score(score: float, scorer: str) -> float:
    """A dev score on OPRO's 0-100 scale: accuracy in percent, or the per-token gold probability in percent
    (exp of the mean log-likelihood), so the generator sees the same kind of number under both scorers."""
    value = 100 * score if scorer == "accuracy" else 100 * math.exp(score)
    return round(value, 1)


def meta_prompt(scored: Sequence[tuple[str, float]], examples: Sequence[Example], scorer: str) -> str:
    """The meta-prompt text from (instruction, score) pairs, already ordered worst to best, and a few examples."""
    shown = "\n\n".join(f"text:\n{ins}\nscore:\n{display_score(s, scorer)}" for ins, s in scored)
    demos = "\n\n".join(f"input:\nQ: {OPEN_TAG}\n{ex.question}\nA:\noutput:\n{ex.answer}" for ex in examples)
    return META_PROMPT.format(scored=shown, examples=demos)


class DevScorer:
    """Scores an instruction on the dev set through the actor; counts the examples it scores.

    With an `accelerator` (accelerate's Accelerator or PartialState) of N processes each scores its 1/N of the dev set and the item-weighted mean is summed
    across processes (every process gets the same score)."""

    def __init__(self, actor, tokenizer, task: Task, dev: Sequence[Example], scorer: str, *, batch_size: int = 16,
                 max_length: int = 512, max_new_tokens: int | None = None, mc_mode: str = "likelihood",
                 accelerator=None):
        if scorer not in ("likelihood", "accuracy"):
            raise ValueError(f"unknown scorer {scorer!r}; use likelihood or accuracy")
        self.actor, self.tokenizer, self.task, self.dev, self.scorer = actor, tokenizer, task, list(dev), scorer
        self.batch_size, self.max_length = batch_size, max_length
        self.max_new_tokens, self.mc_mode = max_new_tokens, mc_mode
        self.accelerator = accelerator
        self.examples_scored = 0

    def __call__(self, instruction: str) -> float:
        self.examples_scored += len(self.dev)
        if self.accelerator is None or self.accelerator.num_processes == 1:
            return self._score(self.dev, instruction)
        acc = self.accelerator
        mine = self.dev[acc.process_index :: acc.num_processes]
        total, n = sum_across([self._score(mine, instruction) * len(mine) if mine else 0.0, len(mine)], acc)
        return total / n

    def _score(self, dev: list[Example], instruction: str) -> float:
        if self.scorer == "accuracy":
            result = evaluate(self.actor, self.tokenizer, self.task, dev, instruction, batch_size=self.batch_size,
                              max_new_tokens=self.max_new_tokens, mc_mode=self.mc_mode, progress=False)
            return float(result.metrics[self.task.primary_metric])
        chats = task_chats(self.tokenizer, self.task, [instruction] * len(dev), dev)
        scores = score_targets(self.actor, self.tokenizer, chats, [ex.target for ex in dev],
                               batch_size=self.batch_size, max_length=self.max_length)
        # The same quantity as MetaTuner's likelihood reward: minus the mean NLL of the gold target, per item.
        return sum(s / max(c, 1) for s, c in scores) / len(scores)


def search_instructions(
    actor,
    tokenizer,
    task: Task,
    train_examples: Sequence[Example],
    initial: Sequence[str],
    settings: SearchSettings,
    *,
    generator=None,
    g_tokenizer=None,
    generator_context: Callable[[], ContextManager] | None = None,
    batch_size: int = 16,
    max_length: int = 512,
    max_new_tokens: int | None = None,
    mc_mode: str = "likelihood",
    seed: int = 0,
    desc: str = "opro",
    accelerator=None,
    tracker=None,
    tag_prefix: str = "",
) -> SearchResult:
    """OPRO-style search for one task-level instruction.

    `initial` are the starting instructions (the first is the reference p0; all are scored before round 1 and stay
    in the pool). `generator` (default: the actor) writes proposals, inside `generator_context()` when given: that
    is how a generator sharing its weights with a PEFT-wrapped actor switches the actor's adapter off. Each round's
    `round_figures` go to `tracker` (an Accelerator or accelerate tracker, step = round) as they come, their tags
    prefixed by `tag_prefix`.
    """
    if not initial:
        raise ValueError("the search needs at least one initial instruction (p0)")
    start = time.perf_counter()
    generator = actor if generator is None else generator
    g_tokenizer = tokenizer if g_tokenizer is None else g_tokenizer
    dev, rest = split_dev(train_examples, settings.dev_size, seed)
    if not dev:
        raise ValueError(f"no training examples for task {task.name}: the dev set is carved from the training split")
    # Demonstrations come from outside the dev set when there is an outside, so the generator never sees the
    # answers it is scored on.
    demo_pool = rest or dev
    rng = random.Random(seed)
    score = DevScorer(actor, tokenizer, task, dev, settings.scorer, batch_size=batch_size, max_length=max_length,
                      max_new_tokens=max_new_tokens, mc_mode=mc_mode, accelerator=accelerator)
    main = accelerator is None or accelerator.is_main_process

    scores: dict[str, float] = {}  # each distinct instruction is scored once; its first appearance orders ties
    history = [_score_initial(ins, scores, score) for ins in dict.fromkeys(initial)]
    p0 = history[0]["instruction"]
    rounds = [round_figures(history, scores)]
    _log_round(tracker, rounds[-1], 0, tag_prefix)

    generated_tokens = 0
    bar = tqdm(total=settings.rounds * settings.proposals_per_round, desc=desc, unit="instr", disable=not main)
    for round_ in range(1, settings.rounds + 1):
        demos = rng.sample(demo_pool, min(settings.examples_in_meta_prompt, len(demo_pool)))
        request = _meta_request(g_tokenizer, scores, demos, settings)
        texts, new_tokens = _propose(generator, g_tokenizer, request, settings, batch_size, generator_context,
                                     accelerator)
        generated_tokens += new_tokens
        entries = []
        for raw in texts:
            entries.append(_score_proposal(raw, round_, scores, score))
            bar.update(1)
        history.extend(entries)
        rounds.append(round_figures(entries, scores))
        _log_round(tracker, rounds[-1], round_, tag_prefix)
        bar.set_postfix(best=display_score(scores[_ranked(scores)[-1]], settings.scorer),
                        p0=display_score(scores[p0], settings.scorer))
    bar.close()

    best = _ranked(scores)[-1]
    return SearchResult(
        scorer=settings.scorer, p0=p0, p0_score=scores[p0], best=best, best_score=scores[best],
        dev_ids=[ex.id for ex in dev], history=history, rounds=rounds, instructions_scored=len(scores),
        examples_scored=score.examples_scored, generated_tokens=generated_tokens,
        seconds=time.perf_counter() - start,
    )


def _score_initial(ins: str, scores: dict[str, float], score: Callable[[str], float]) -> dict:
    """The history entry of one initial instruction, scored verbatim (p0 is the user's text, newlines and all)."""
    scores[ins] = score(ins)
    return {"round": 0, "source": "initial", "instruction": ins, "score": scores[ins]}


def _meta_request(g_tokenizer, scores: dict[str, float], demos: Sequence[Example], settings: SearchSettings) -> str:
    """A round's request to the generator: the meta-prompt over the best instructions so far, worst first (OPRO's
    order), with the assistant turn opened by <INS>."""
    top = _ranked(scores)[-settings.meta_prompt_top:]
    content = meta_prompt([(ins, scores[ins]) for ins in top], demos, settings.scorer)
    return chat_prompt(g_tokenizer, [{"role": "user", "content": content}]) + OPEN_TAG


def _score_proposal(raw: str, round_: int, scores: dict[str, float], score: Callable[[str], float]) -> dict:
    """The history entry of one generator reply; a new instruction is scored and added to `scores`."""
    ins = clean_instruction(raw)
    entry = {"round": round_, "source": "proposal", "instruction": ins, "raw": raw}
    if not ins:
        entry.update(score=None, skipped="empty")
    elif ins in scores:
        entry.update(score=scores[ins], duplicate=True)
    else:
        scores[ins] = score(ins)
        entry["score"] = scores[ins]
    return entry


def round_figures(entries: Sequence[dict], scores: dict[str, float]) -> dict[str, float | int | None]:
    """A round's figures from its history entries and the pool after it: the best dev score so far, the best and
    mean dev score of the round's scored instructions (duplicates count with their earlier score; None when every
    reply was empty) and how many of them were new. Scores are on the scorer's own scale, as in search.json."""
    tried = [e["score"] for e in entries if e["score"] is not None]
    return {"train/best_score": max(scores.values()),
            "train/round_best_score": max(tried) if tried else None,
            "train/round_mean_score": sum(tried) / len(tried) if tried else None,
            "train/new_instructions": sum(1 for e in entries if e["score"] is not None and not e.get("duplicate"))}


def _log_round(tracker, figures: dict, round_: int, tag_prefix: str) -> None:
    if tracker is not None:
        tracker.log({tag_prefix + k: v for k, v in figures.items() if v is not None}, step=round_)


def _propose(generator, g_tokenizer, request: str, settings: SearchSettings, batch_size: int,
             generator_context: Callable[[], ContextManager] | None, accelerator) -> tuple[list[str], int]:
    """A round's proposals and their generated tokens. One process samples, so N processes propose what one
    would; the others receive the texts."""
    texts, new_tokens = [None] * settings.proposals_per_round, [0]
    if accelerator is None or accelerator.is_main_process:
        with generator_context() if generator_context else contextlib.nullcontext():
            out = generate(generator, g_tokenizer, [request] * settings.proposals_per_round,
                           max_new_tokens=settings.max_instruction_tokens, do_sample=True,
                           temperature=settings.temperature, stop_strings=[CLOSE_TAG], batch_size=batch_size)
        texts, new_tokens = list(out.texts), [sum(out.new_tokens)]
    if accelerator is not None and accelerator.num_processes > 1:
        texts, new_tokens = broadcast_object_list([texts, new_tokens])
    return texts, new_tokens[0]


def _ranked(scores: dict[str, float]) -> list[str]:
    """Instructions from worst to best. On equal scores the earlier one ranks higher, so p0 (scored first) is
    only ever replaced by a strictly better instruction."""
    position = {ins: k for k, ins in enumerate(scores)}
    return sorted(scores, key=lambda ins: (scores[ins], -position[ins]))


def search_settings_kwargs(cfg: RunConfig) -> dict:
    """The keyword arguments of `search_instructions` that come from the run config's other sections."""
    return {"batch_size": cfg.eval.batch_size, "max_length": cfg.train.max_length,
            "max_new_tokens": cfg.eval.max_new_tokens, "mc_mode": cfg.eval.mc_mode, "seed": cfg.seed}


def search_metrics(result: SearchResult, n_dev: int) -> dict:
    """The search's share of `train_metrics.json`; its `history` has one value per round (0 = the initial pool)."""
    keys = result.rounds[0] if result.rounds else {}  # a SearchResult built elsewhere (RLPrompt) may have none
    history = {key: [figures[key] for figures in result.rounds] for key in keys}
    return {"train_seconds": round(result.seconds, 1), "train_examples": result.examples_scored,
            "unique_train_examples": n_dev, "instructions_scored": result.instructions_scored,
            "generated_tokens": result.generated_tokens, "scorer": result.scorer,
            "p0_dev_score": result.p0_score, "best_dev_score": result.best_score, "history": history}


def search_device(cfg: RunConfig, state) -> str:
    """This process's device: its own GPU under `accelerate launch`, else what the config asks for."""
    return str(state.device) if state.num_processes > 1 else cfg.model.device


def train_opro(cfg: RunConfig) -> Path:
    """Run the OPRO-like search described by `cfg`; returns the run folder (best instruction in best_prompt.txt)."""
    out = open_run_folder(cfg)
    # PartialState, not Accelerator: it sets up the processes without fixing a mixed precision, which the SFT
    # phase (or a later method in `metatuner compare`) chooses when it makes its own Accelerator.
    state = PartialState(cpu=cfg.model.device == "cpu")
    run = start_run(cfg, out, state.is_main_process)  # the seed: the proposals are sampled
    task = run.task
    examples = task.load(cfg.data.train_split, path=cfg.data.train_path, limit=cfg.data.train_limit)
    generator, actor, g_tok, m_tok = load_generator_and_actor(
        cfg.model.name, cfg.model.actor, cfg.model.dtype, search_device(cfg, state), cfg.model.trust_remote_code)
    tracker = start_tracker(out)
    result = search_instructions(actor, m_tok, task, examples, [run.p0], cfg.search,
                                 generator=generator, g_tokenizer=g_tok, accelerator=state, tracker=tracker,
                                 **search_settings_kwargs(cfg))
    if state.is_main_process:
        result.write(out)
        write_metrics(out, run_metrics("opro", **search_metrics(result, len(result.dev_ids)), best_prompt=result.best),
                      tracker, step=cfg.search.rounds)
    tracker.finish()
    state.wait_for_everyone()
    return out

"""What every benchmark of the suite shares: the model, the data, the precision and the repetition counts.

Not run directly; `benchmarks/perf.py` builds one `Bench` from its command line and hands it to each benchmark.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from metatuner.generation import chat_prompt
from metatuner.models import load_model
from metatuner.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = "embedded:smollm2-135m-instruct"
TRAIN_TASK = ("rg:chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2})
GEN_TASK = ("rg:gsm_symbolic", {})  # questions that make a small model write long answers
MC_DATA = [REPO / "data" / "cosmosqa" / "valid.csv",
           REPO / "src" / "metatuner" / "tasks" / "fixtures" / "cosmosqa.csv"]
# Candidate instructions for scoring: p0 plus rewrites of different lengths, as rollouts produce them.
CANDIDATES = [
    "Solve the problem step by step. End with 'The answer is N.' where N is the final number.",
    "Compute the result carefully.",
    "Add and subtract the numbers from left to right, keep track of the sign, and finish with 'The answer is N.'",
    "Give the final number only, as 'The answer is N.'",
    "Work through the arithmetic one term at a time; negative results are allowed. End with 'The answer is N.'",
]


@dataclass
class Bench:
    model: str = EMBEDDED  # a load_model name or a local directory
    quick: bool = False
    precision: str = "fp32"  # autocast of the training-side benchmarks: bf16 or fp32 (perf.py resolves --precision auto)
    repeats: int = 5
    threads: int = field(default_factory=torch.get_num_threads)
    batch_size: int = 8
    max_length: int = 512
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    n_candidates: int = 5
    gen_prompts: int = 16
    gen_batch_size: int = 16
    gen_baseline_prompts: int = 4
    max_new_tokens: int = 64
    mc_examples: int = 24
    eval_items: int = 64  # eval_vs_lm_eval: GSM8K items, generation limit, batch size and dtype of both sides
    eval_max_new_tokens: int = 256
    eval_batch_size: int = 16
    eval_dtype: str = "float32"  # what `metatuner eval` loads by default
    lm_eval_batch_size: int | None = None  # lm_eval's side (None: eval_batch_size; lm_eval's own default is 1)
    llama_cpp: bool = True
    serve_run: str | None = None  # the MetaTuner run that the server benchmarks serve (perf.py --serve-run)

    @classmethod
    def for_mode(cls, quick: bool, model: str | None = None, **overrides) -> "Bench":
        if quick:
            base = cls(model=model or tiny_model_dir(), quick=True, repeats=2, batch_size=4, n_candidates=3,
                       gen_prompts=4, gen_batch_size=4, gen_baseline_prompts=2, max_new_tokens=8, mc_examples=4,
                       eval_items=4, eval_max_new_tokens=8, eval_batch_size=4, llama_cpp=False)
        else:
            base = cls(model=model or EMBEDDED)
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base

    def load(self):
        """A fresh copy of the model (frozen, eval mode) and its tokenizer."""
        model, tokenizer = _cached_load(self.model)
        return copy.deepcopy(model), tokenizer

    def train_examples(self, n: int):
        name, options = TRAIN_TASK
        task = get_task(name, **options)
        return task, task.load("train", limit=n)

    def actor_pairs(self, n: int, tokenizer):
        """(chat with p0, target) for n training examples: what M sees in SFT and in the task loss."""
        task, examples = self.train_examples(n)
        return task, examples, [(chat_prompt(tokenizer, task.messages(task.default_prompt, ex)), ex.target)
                                for ex in examples]

    def generation_chats(self, n: int, tokenizer) -> list[str]:
        name, options = GEN_TASK
        task = get_task(name, **options)
        return [chat_prompt(tokenizer, task.messages(task.default_prompt, ex)) for ex in task.load("train", limit=n)]

    def mc_examples_and_task(self):
        task_path = next((p for p in MC_DATA if p.is_file()), MC_DATA[-1])
        task = get_task("cosmosqa", train_rows=None)
        return task, task.load("test", path=str(task_path), limit=self.mc_examples), task_path

    def settings(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


@functools.lru_cache(maxsize=2)
def _cached_load(name: str):
    return load_model(name, "float32", "cpu")


@functools.lru_cache(maxsize=1)
def tiny_model_dir() -> str:
    """The test suite's tiny random model, saved as a normal model directory (so subprocesses can load it too)."""
    from metatuner.testing import tiny_model_and_tokenizer

    path = Path(tempfile.mkdtemp(prefix="metatuner-bench-tiny-"))
    model, tokenizer = tiny_model_and_tokenizer(num_layers=4)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


class PhaseTimer:
    """Seconds per named phase of a step."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        from common import now

        start = now()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + now() - start


class PhaseFlops:
    """Matrix-product FLOPs per named phase, with `PhaseTimer`'s interface (torch's `FlopCounterMode`: the linear
    layers and the LM head, forward, backward and any recompute; attention is not counted on a CPU, where it is a
    few percent of these models' work at these lengths)."""

    def __init__(self):
        self.flops: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str):
        with count_flops() as counter:
            yield
        self.flops[phase] = self.flops.get(phase, 0) + counter.get_total_flops()


def count_flops():
    """A context that counts the matrix-product FLOPs run inside it (`.get_total_flops()` afterwards)."""
    from torch.utils.flop_counter import FlopCounterMode

    return FlopCounterMode(display=False)


def j_step_backward(mt, task, rows, p0: str, store, timer: PhaseTimer, max_length: int = 512) -> None:
    """The forward and backward of one schedule-J step with rollouts, from MetaTuner's public API, in the order of
    `metatuner.train`: write prompts with {phi_s, phi_p'} (h keeps its gradient), task loss through M with the
    per-query LoRA and its backward, rollouts refreshing D2, SR loss on D2's prompts and its backward. As in
    `metatuner.train`, each loss's backward runs as soon as the loss exists (outside autocast), so the step holds
    one graph at a time. Call under autocast; the optimiser step is the caller's.

    The rollouts score candidates by likelihood with p0 among them, whatever `mt.settings` say: that is the step the
    published figures measure (the library's defaults are now D2 from samples and the checker's reward, whose
    rollouts also generate M's answer for every candidate, a cost that depends on the task's answer length)."""
    from metatuner.rollouts import run_rollouts

    s = mt.settings
    requests = mt.rewrite_requests([p0] * len(rows), [ex.question for ex in rows])
    with timer("write_prompts"):
        written = mt.write_prompts(requests, with_grad=True)
        factors = mt.factors(written.h)
    with timer("task_loss"):
        chats = [chat_prompt(mt.m_tok, task.messages(p, ex)) for p, ex in zip(written.prompts, rows)]
        loss = mt.task_loss(chats, [ex.target for ex in rows], factors, max_length)
    with timer("backward"), torch.autocast("cpu", enabled=False), mt.role("actor"), mt.lora.apply(factors):
        loss.backward()
    with timer("rollouts"):
        run_rollouts(mt, task, rows, p0, factors.detach(), store, n=s.n_rollouts,
                     temperature=s.rollout_temperature, reward="likelihood", batch_size=16)
    with timer("sr_loss"):
        sr = mt.sr_loss(requests, [store.best(ex.id, p0) for ex in rows])
    with timer("backward"), torch.autocast("cpu", enabled=False), mt.role("learner"):
        (s.sr_weight * sr).backward()

"""What answers a request: a backend turns requests into M's input (for a MetaTuner run, G writes each one's prompt
and LoRA), and the engine decodes every admitted row together, one token per step, with per-row LoRA.

    engine = Engine(MetaTunerBackend(MetaTuner.from_pretrained("runs/x")))
    engine.admit(jobs)            # G writes prompts + LoRA for the jobs in one batch; M prefills them; they join
    while engine.rows:
        engine.step()             # one token for every row; finished rows leave at once

Rows join between steps (`DecodeBatch.extend`) and leave as soon as they finish, each with its KV cache and LoRA
factors. Not thread-safe: one thread (the scheduler's) drives an engine.
"""

from __future__ import annotations

import contextlib
import secrets
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Sequence

import torch

from ..generation import DecodeBatch, _cut_at_stop, _encode, _next_tokens, chat_prompt, eos_ids
from ..hyperlora import LoraFactors
from .prefix import PromptWriter
from .protocol import RequestError


@dataclass
class Job:
    """One request as the engine sees it. `emit` is called from the engine's thread with each event."""

    text: str  # a MetaTuner run: the question; a plain model: its whole input, already chat-formatted if chat
    max_tokens: int
    emit: Callable[["Event"], None]
    temperature: float = 1.0
    top_p: float = 1.0
    stop: Sequence[str] = ()
    seed: int | None = None
    cancelled: bool = False  # set by the server (timeout, client gone); the row leaves at the next step
    enqueued: float = 0.0

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class Started:
    prompt: str | None  # the prompt G wrote (None for a plain model)
    prompt_tokens: int  # M's input tokens


@dataclass
class Delta:
    text: str


@dataclass
class Done:
    text: str  # the whole answer (what the deltas add up to)
    finish_reason: str  # stop (end of sequence or a stop string) or length
    completion_tokens: int


@dataclass
class Failed:
    error: RequestError


Event = Started | Delta | Done | Failed


class Backend:
    """M, its tokenizer and how a batch of jobs becomes M's input."""

    name: str
    model: torch.nn.Module
    tokenizer: object
    stop_strings: tuple[str, ...] = ()
    default_max_tokens: int = 256

    def prepare(self, jobs: Sequence[Job]) -> tuple[list[str], list[str | None], LoraFactors | None]:
        """M's input text per job, the written prompt per job, and the jobs' LoRA factors (None: no per-row LoRA)."""
        raise NotImplementedError

    def actor(self) -> ContextManager:
        """The context M's forwards run in."""
        return contextlib.nullcontext()

    def apply_lora(self, factors: LoraFactors | None) -> ContextManager | None:
        return None

    @property
    def context_length(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def input_tokens(self, text: str, max_tokens: int, field: str = "messages") -> int:
        """M's input length for `text`; a RequestError naming `field` when it and `max_tokens` do not fit M's
        context."""
        n = len(_encode(self.tokenizer, [text])[0])
        _fits(n, max_tokens, self.context_length, "the input", field)
        return n


def _fits(n_input: int, max_tokens: int, context: int | None, what: str, field: str) -> None:
    if context and n_input + max_tokens > context:
        raise RequestError(f"{field}: {what} is {n_input} tokens; with max_tokens {max_tokens} it exceeds the "
                           f"model's context of {context} tokens", field, code="context_length_exceeded")


class ModelBackend(Backend):
    """A plain causal LM (optionally with a PEFT adapter): chat requests go through its chat template as given."""

    def __init__(self, model, tokenizer, name: str, default_max_tokens: int = 256):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.default_max_tokens = default_max_tokens

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return chat_prompt(self.tokenizer, messages)

    def prepare(self, jobs):
        return [j.text for j in jobs], [None] * len(jobs), None


class MetaTunerBackend(Backend):
    """A trained MetaTuner run: G writes each question's prompt and LoRA, M answers in the task's format."""

    def __init__(self, mt, name: str):
        self.mt, self.name = mt, name
        task = mt._require_task()
        self.model, self.tokenizer = mt.m, mt.m_tok
        self.stop_strings = tuple(task.stop_strings)
        self.default_max_tokens = task.max_new_tokens
        self.writer = PromptWriter(mt)  # G's cache of the rewrite request's shared beginning, made once here

    def input_tokens(self, text: str, max_tokens: int, field: str = "messages") -> int:
        mt = self.mt
        g_context = getattr(mt.g.config, "max_position_embeddings", None)
        request = mt.rewrite_requests([mt.p0], [text])[0]
        _fits(len(_encode(mt.g_tok, [request])[0]), mt.settings.max_prompt_tokens, g_context,
              "the question with G's rewrite request", field)
        # The written prompt is at most max_prompt_tokens long; count M's input with room for it.
        n = len(_encode(self.tokenizer, mt.answer_chats([""], [text]))[0]) + mt.settings.max_prompt_tokens
        _fits(n, max_tokens, self.context_length, "the question with its written prompt", field)
        return n

    def prepare(self, jobs):
        mt = self.mt
        questions = [j.text for j in jobs]
        # prompts and h as write_all gives them (h as float), so a request's LoRA is exactly MetaTuner.generate's
        prompts, h = self.writer.write(questions)
        return mt.answer_chats(prompts, questions), prompts, mt.factors(h)

    def actor(self):
        return self.mt.role("actor")

    def apply_lora(self, factors):
        return self.mt.lora.apply(factors) if factors is not None else None


@dataclass
class Row:
    """A job being decoded: its tokens so far and how much of its text the client has."""

    job: Job
    prompt_tokens: int
    generator: torch.Generator | None
    stops: tuple[str, ...]
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already emitted

    def take(self, token: int, end: bool, tokenizer) -> str | None:
        """Add one sampled token; emit what is new; return the finish reason once the row is done."""
        if not end:
            self.tokens.append(token)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        answer = _cut_at_stop(text, self.stops)
        finish = "stop" if end or answer != text else ("length" if len(self.tokens) >= self.job.max_tokens else None)
        if finish:
            # The answer is what MetaTuner.generate returns: cut at the first stop string, stripped.
            final = answer.strip()
            if final[self.sent:]:
                self.job.emit(Delta(final[self.sent:]))
            self.job.emit(Done(final, finish, len(self.tokens)))
            return finish
        stable = _hold_back(text.strip(), self.stops)
        if len(stable) > self.sent:
            self.job.emit(Delta(stable[self.sent:]))
            self.sent = len(stable)
        return None


def _hold_back(text: str, stops: Sequence[str]) -> str:
    """`text` without what may still change: an incomplete UTF-8 character, and an ending that may be the start of a
    stop string (trailing white space is already held back, since a finished answer is stripped)."""
    text = text.rstrip("\ufffd").rstrip()
    hold = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
    return text[: len(text) - hold].rstrip()


class Engine:
    """The rows being decoded and their per-row LoRA; `admit` adds jobs, `step` decodes one token for every row."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self.tokenizer = backend.tokenizer
        self.rows: list[Row] = []
        self.batch: DecodeBatch | None = None
        self.factors: LoraFactors | None = None
        self.eos = torch.tensor(eos_ids(backend.tokenizer, backend.model), dtype=torch.long)
        # M's role is held from step to step and left only when G writes: switching PEFT adapters costs about a
        # fifth of a decoding step of a 135M model.
        self._actor: contextlib.ExitStack | None = None

    def _as_actor(self) -> None:
        if self._actor is None:
            self._actor = contextlib.ExitStack()
            self._actor.enter_context(self.backend.actor())

    def _leave_actor(self) -> None:
        if self._actor is not None:
            self._actor.close()
            self._actor = None

    @property
    def can_join(self) -> bool:
        """Whether new rows can join now (always when idle; while decoding, when the cache can be padded)."""
        return self.batch is None or self.batch.can_join()

    @torch.no_grad()
    def admit(self, jobs: Sequence[Job]) -> None:
        """G writes the jobs' prompts and LoRA in one batch, M prefills them, and they join the decoding batch."""
        backend = self.backend
        self._leave_actor()
        texts, prompts, factors = backend.prepare(jobs)
        ids = _encode(self.tokenizer, texts)
        device = backend.model.device
        rows = []
        for job, prompt, row_ids in zip(jobs, prompts, ids):
            generator = None
            if job.temperature > 0:
                # Each row samples from its own generator: a seeded request gives the same answer whatever else
                # is in the batch.
                generator = torch.Generator(device=device).manual_seed(
                    job.seed if job.seed is not None else secrets.randbits(63))
            rows.append(Row(job, len(row_ids), generator, tuple(backend.stop_strings) + tuple(job.stop)))
            job.emit(Started(prompt, len(row_ids)))
        self._as_actor()
        fresh = DecodeBatch.prefill(backend.model, ids, self.tokenizer.pad_token_id, backend.apply_lora(factors))
        if self.batch is None:
            self.batch, self.factors = fresh, factors
        else:
            self.batch.extend(fresh)
            self.factors = None if factors is None else LoraFactors.cat([self.factors, factors])
        self.rows += rows

    @torch.no_grad()
    def step(self) -> int:
        """One token for every row; finished and cancelled rows leave. Returns how many rows were decoded."""
        batch, rows = self.batch, self.rows
        n = len(rows)
        tokens = batch.logits.argmax(-1)
        for k, row in enumerate(rows):
            if row.generator is not None:
                tokens[k] = _next_tokens(batch.logits[k : k + 1], row.job.temperature, row.job.top_p, row.generator)[0]
        ended = torch.isin(tokens, self.eos.to(tokens.device)).tolist()
        keep = [k for k, (row, token, end) in enumerate(zip(rows, tokens.tolist(), ended))
                if not row.job.cancelled and row.take(token, end, self.tokenizer) is None]
        if not keep:  # idle again: G's role back, as the rest of MetaTuner expects it
            self.rows, self.batch, self.factors = [], None, None
            self._leave_actor()
            return n
        if len(keep) < n:
            batch.select(keep)
            batch.trim()
            tokens = tokens[torch.tensor(keep, device=tokens.device)]
            self.factors = None if self.factors is None else self.factors.index_select(keep)
            self.rows = [rows[k] for k in keep]
        self._as_actor()
        batch.advance(self.backend.model, tokens, self.backend.apply_lora(self.factors))
        return n

    def fail_all(self, error: RequestError) -> None:
        """Tell every row's client that its request failed, and forget the batch (after an internal error)."""
        for row in self.rows:
            row.job.emit(Failed(error))
        self.rows, self.batch, self.factors = [], None, None
        self._leave_actor()

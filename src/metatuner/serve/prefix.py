"""G's prompt writing with the rewrite request's shared beginning prefilled once per server.

Every request G reads starts the same way: the chat template's opening, the rewrite template and p0; only the
question differs. With the demo run that is 80 of about 107 tokens, and on a CPU a prefill costs the same per token
at any batch size, so `PromptWriter` runs that beginning through G once (in the writer role: G's adapters do not
change while a run is served) and every request's prefill goes through its question's tokens only, attending to
the cached keys and values.

    writer = PromptWriter(mt)
    prompts, h = writer.write(questions)       # what mt.write_all(questions) returns, with less of G's work

Exact, not approximate: a request takes the cached path only when tokenising its whole request (what
`MetaTuner.generate` does) gives the cached tokens first, so its tokens and positions are those of a full prefill;
a request whose question merges with the last tokens of the beginning gets a full prefill (`MetaTuner.write_prompts`).
h is pooled from the same layer-k states: the beginning's are kept for pool=mean.
"""

from __future__ import annotations

from typing import Sequence

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..generation import DecodeBatch, _encode, _left_pad, cache_argument, last_logits_only, output_cache

# Stands for the question while the request's beginning is cut out of a rendered request; a chat template leaves
# it as it is.
_MARK = "\x00metatuner-question\x00"


def shared_tokens(mt) -> list[int]:
    """The tokens every rewrite request starts with, whatever the question.

    The text before the question, tokenised alone, without its last token: that one may merge with the
    question's first characters (" " and "What" become " What"). Each request is still checked (`split`)."""
    rendered = mt.rewrite_requests([mt.p0], [_MARK])[0]
    if rendered.count(_MARK) != 1:
        return []
    return _encode(mt.g_tok, [rendered.split(_MARK)[0]])[0][:-1]


class PromptWriter:
    """Writes prompts and h for questions as `MetaTuner.write_all` does, reusing G's cache of the shared tokens."""

    def __init__(self, mt):
        self.mt = mt
        self.ids: list[int] = shared_tokens(mt) if mt.settings.share and mt.settings.use_prompt else []
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.states: torch.Tensor | None = None
        if self.ids:
            self._prefill_shared()

    @torch.no_grad()
    def _prefill_shared(self) -> None:
        mt = self.mt
        ids = torch.tensor([self.ids], device=mt.g.device)
        with mt.role("writer"):
            out = mt.g(input_ids=ids, attention_mask=torch.ones_like(ids),
                       position_ids=torch.arange(len(self.ids), device=ids.device)[None], use_cache=True,
                       output_hidden_states=True, **last_logits_only(mt.g))
        cache = output_cache(out)
        if not all(type(layer) is DynamicLayer for layer in getattr(cache, "layers", [None])):
            # a sliding-window or other windowed cache keeps only part of the beginning: every request in full
            self.ids = []
            return
        self.layers = [(layer.keys, layer.values) for layer in cache.layers]
        self.states = out.hidden_states[mt.k]  # (1, shared tokens, hidden): pool=mean averages over them too

    def split(self, request_ids: Sequence[int]) -> list[int] | None:
        """The request's tokens after the shared ones, or None when it does not start with them (full prefill)."""
        n = len(self.ids)
        if not n or list(request_ids[:n]) != self.ids or len(request_ids) == n:
            return None
        return list(request_ids[n:])

    @torch.no_grad()
    def write(self, questions: Sequence[str]) -> tuple[list[str], torch.Tensor]:
        """(prompts, h as float) for `questions`, in their order."""
        mt = self.mt
        requests = mt.rewrite_requests([mt.p0] * len(questions), questions)
        rests = [self.split(ids) for ids in _encode(mt.g_tok, requests)] if self.ids else [None] * len(requests)
        cached = [i for i, rest in enumerate(rests) if rest is not None]
        full = [i for i, rest in enumerate(rests) if rest is None]
        prompts: list[str] = [""] * len(questions)
        h: list[torch.Tensor | None] = [None] * len(questions)
        for rows, write in ((cached, lambda: self._write_cached([rests[i] for i in cached])),
                            (full, lambda: self._write_full([requests[i] for i in full]))):
            if rows:
                got_prompts, got_h = write()
                for k, i in enumerate(rows):
                    prompts[i], h[i] = got_prompts[k], got_h[k]
        return prompts, torch.stack(h)

    def _write_full(self, requests: list[str]) -> tuple[list[str], torch.Tensor]:
        mt = self.mt
        written = mt.write_prompts(requests, with_grad=False)
        return written.prompts or [mt.p0] * len(requests), written.h.float()

    def _write_cached(self, rests: list[list[int]]) -> tuple[list[str], torch.Tensor]:
        """Prefill the questions' tokens after the cached ones, pool h, decode the prompts (G's writer role)."""
        mt = self.mt
        n, shared = len(rests), len(self.ids)
        ids, mask = _left_pad(rests, mt.g_tok.pad_token_id, mt.g.device)
        # Columns: the shared tokens, the padding of shorter rows, then each row's own tokens. Positions count real
        # tokens only, so every row sees exactly the positions of its full left-padded prefill.
        mask = torch.cat([torch.ones((n, shared), dtype=mask.dtype, device=mask.device), mask], dim=1)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]
        cache = DynamicCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in self.layers])
        with mt.role("writer"):
            out = mt.g(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                       output_hidden_states=True, **{cache_argument(mt.g): cache}, **last_logits_only(mt.g))
            states = torch.cat([self.states.expand(n, -1, -1), out.hidden_states[mt.k]], dim=1)
            h = mt.pool_h(states, {"attention_mask": mask})
            prompts = mt._decode(DecodeBatch(output_cache(out), out.logits[:, -1], mask, pos[:, -1:]), temperature=0.0)
        return prompts, h.float()

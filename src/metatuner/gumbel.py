"""The Gumbel-softmax ablation: train the prompt branch through the task loss instead of the SR loss.

    metatuner train --config configs/demo-arithmetic.yaml metatuner.prompt_objective=gumbel

G writes the prompt token by token with straight-through Gumbel-softmax (Jang et al. 2017): the forward pass
uses the sampled token, the backward pass the relaxed distribution. M reads the prompt as those (one-hot times
embedding matrix) embeddings, so the gradient of the task loss reaches phi_p and phi_s through the prompt, and
phi_q and phi_s through h. No rollouts, no D2, no SR loss. The paper reports this variant clearly below
MetaTuner with SR (arXiv 2509.24245, ablations); it exists to reproduce that comparison.

It needs G and M to share a vocabulary (the same checkpoint or tokenizer), since M embeds G's tokens.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from .generation import cache_argument, chat_prompt, left_padded_batch, output_cache
from .tasks.base import Example, Task

_SLOT = "\u0000PROMPT\u0000"  # a marker no tokenizer merges with its neighbours


def relaxed_prompts(mt, requests: Sequence[str], max_tokens: int, tau: float):
    """Sample prompts from {phi_s, phi_p} with straight-through Gumbel-softmax, keeping the gradient.

    Returns (one-hot-like token weights: batch x steps x vocab, lengths before the first end token, h).

    Runs in the parameters' own precision even under mixed precision: autocast casts every frozen weight afresh on
    each forward and keeps the copy for the backward pass, so a bf16 loop of T steps would hold T copies of G's
    weights where fp32 keeps only the activations.
    """
    eos = mt.g_tok.eos_token_id
    with mt.role("learner"), torch.autocast(mt.g.device.type, enabled=False):
        batch = left_padded_batch(mt.g_tok, requests, mt.g.device)
        out = mt.g(**batch, use_cache=True, output_hidden_states=True)
        h = mt.pool_h(out.hidden_states[mt.k], batch)  # as write_prompts pools it (pool=last or mean)
        cache, logits = output_cache(out), out.logits[:, -1]
        mask, pos = batch["attention_mask"], batch["position_ids"][:, -1:]
        embed = mt.g.get_input_embeddings().weight
        steps = []
        for _ in range(max_tokens):
            y = F.gumbel_softmax(logits.float(), tau=tau, hard=True)  # forward: one-hot; backward: soft
            steps.append(y)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            pos = pos + 1
            out = mt.g(inputs_embeds=(y.to(embed.dtype) @ embed)[:, None], attention_mask=mask, position_ids=pos,
                       use_cache=True, **{cache_argument(mt.g): cache})
            cache, logits = output_cache(out), out.logits[:, -1]
    weights = torch.stack(steps, 1)
    tokens = weights.argmax(-1)
    is_end = tokens == eos
    lengths = torch.where(is_end.any(1), is_end.float().argmax(1), torch.full_like(tokens[:, 0], max_tokens))
    return weights, lengths.tolist(), h


def gumbel_task_loss(mt, task: Task, rows: Sequence[Example], p0: str, max_tokens: int, tau: float,
                     max_length: int = 512):
    """Task loss of M given the relaxed prompt and the per-query LoRA; returns (loss, decoded prompts)."""
    requests = mt.rewrite_requests([p0] * len(rows), [ex.question for ex in rows])
    weights, lengths, h = relaxed_prompts(mt, requests, max_tokens, tau)
    factors = mt.factors(h)
    embed = mt.m.get_input_embeddings()
    with torch.autocast(weights.device.type, enabled=False):  # one product, and no low-precision copy of the table
        soft_prompts = weights.to(embed.weight.dtype) @ embed.weight
    seqs, labels = [], []
    prompts = []
    for i, ex in enumerate(rows):
        # Render the chat around a slot, then put the relaxed prompt's embeddings in the slot.
        before, after = chat_prompt(mt.m_tok, task.messages(_SLOT, ex)).split(_SLOT)
        ids_before = mt.m_tok(before, add_special_tokens=False)["input_ids"]
        ids_after = mt.m_tok(after, add_special_tokens=False)["input_ids"]
        target = mt.m_tok(ex.target, add_special_tokens=False)["input_ids"] + [mt.m_tok.eos_token_id]
        soft = soft_prompts[i, : lengths[i]]
        hard_after = torch.tensor(ids_after + target, device=soft.device)
        parts = [embed(torch.tensor(ids_before, device=soft.device)), soft, embed(hard_after)]
        seq = torch.cat(parts)[:max_length]
        n_prompt_side = len(ids_before) + lengths[i] + len(ids_after)
        lab = [-100] * n_prompt_side + target
        seqs.append(seq)
        labels.append(torch.tensor(lab[: seq.shape[0]], device=soft.device))
        prompts.append(mt.g_tok.decode(weights[i, : lengths[i]].argmax(-1).tolist(), skip_special_tokens=True))
    width = max(s.shape[0] for s in seqs)
    inputs = torch.stack([F.pad(s, (0, 0, 0, width - s.shape[0])) for s in seqs])
    attention = torch.stack([F.pad(torch.ones(s.shape[0], dtype=torch.long, device=s.device), (0, width - s.shape[0]))
                             for s in seqs])
    label_t = torch.stack([F.pad(lab, (0, width - lab.shape[0]), value=-100) for lab in labels])
    with mt.role("actor"), (mt.lora.apply(factors) if factors is not None else contextlib.nullcontext()):
        loss = mt.m(inputs_embeds=inputs, attention_mask=attention, labels=label_t).loss
    return loss, prompts


"""A/B figures of the decoding, rollout and memory changes of the J step (rows of "Speed-ups kept").

Run through the suite as part of `speedups` (`python benchmarks/perf.py --only speedups [--quick]`). Each entry
runs the kept way and the former way in turns on the same inputs, in this process; > 1 means the kept way is
faster. The former ways are switched back by the library's own switches (`generation.PREALLOCATE_KV`,
`generation.CAST_FROZEN_WEIGHTS_ONCE`, `MetaTuner.checkpoint_sr`) or, for the sampler, by calling what it used to
call. Where a change must not change results, the entry records that both ways gave the same ones.
"""

from __future__ import annotations

import contextlib
import copy
import json

import torch

import metatuner.generation as generation
from bench_setup import Bench
from common import Summary, autocast, interleaved
from metatuner.config import MetaTunerSettings
from metatuner.generation import generate, task_chats
from metatuner.model import MetaTuner
from metatuner.rollouts import ExpertPromptStore, run_rollouts


def _ratio(former: list[float], kept: list[float]) -> float:
    return round(Summary([a / b for a, b in zip(former, kept)]).median, 4)


@contextlib.contextmanager
def _switched(**flags):
    """Module switches of `metatuner.generation` set for the block."""
    saved = {k: getattr(generation, k) for k in flags}
    for k, v in flags.items():
        setattr(generation, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(generation, k, v)


def _graph_bytes(fn) -> int:
    """Bytes of the tensors the autograd graph of `fn()` keeps for its backward (shared storages counted once; not
    for checkpointed layers, whose inputs the checkpoint keeps outside these hooks)."""
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def speedups(b: Bench) -> dict:
    model, tok = b.load()
    repeats = max(2, b.repeats - 2)
    return {**_generation(b, model, tok, repeats), **_next_token(b, model), **_rollouts(b, model, tok, repeats),
            **_checker_scoring(b, model, tok, repeats), **_graphs(b, model, tok, repeats)}


def _generation(b: Bench, model, tok, repeats: int) -> dict:
    chats = b.generation_chats(b.gen_prompts, tok)
    texts = {}

    def run(name, **flags):
        with _switched(**flags), autocast(b.precision):
            out = generate(model, tok, chats, max_new_tokens=b.max_new_tokens, batch_size=b.gen_batch_size)
        texts[name] = out.texts

    s = interleaved({"kept": lambda: run("kept"),
                     "dynamic_cache": lambda: run("dynamic_cache", PREALLOCATE_KV=False),
                     "autocast_casts": lambda: run("autocast_casts", CAST_FROZEN_WEIGHTS_ONCE=False)},
                    repeats=repeats)
    same = {k: texts[k] == texts["kept"] for k in texts}
    where = (f"greedy generation of {len(chats)} prompts, batch {b.gen_batch_size}, max_new_tokens "
             f"{b.max_new_tokens}, {b.precision}")
    return {
        "kv_cache_buffer": {
            "speedup": _ratio(s["dynamic_cache"], s["kept"]),
            "what": f"{where}: DynamicCache (concatenates the cache at every step) / preallocated KVBuffer layers "
                    f"(same outputs: {same['dynamic_cache']})",
            "seconds": {k: Summary(s[k]).as_dict() for k in ("kept", "dynamic_cache")}},
        "frozen_weights_cast_once": {
            "speedup": _ratio(s["autocast_casts"], s["kept"]),
            "what": f"{where}: autocast casting every frozen weight at every forward / cast once and kept "
                    f"(frozen_weight_casts; same outputs: {same['autocast_casts']})",
            "seconds": {k: Summary(s[k]).as_dict() for k in ("kept", "autocast_casts")}},
    }


def _next_token(b: Bench, model) -> dict:
    vocab = model.config.vocab_size
    logits = torch.randn(32, vocab, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    probs = torch.softmax(logits.float() / 0.8, -1)
    gen = {"kept": torch.Generator().manual_seed(1), "former": torch.Generator().manual_seed(1)}
    drawn = {"kept": [], "former": []}

    def ours():
        drawn["kept"].append(generation._next_tokens(logits, 0.8, 1.0, gen["kept"]))

    def former():
        drawn["former"].append(torch.multinomial(probs, 1, generator=gen["former"]).squeeze(-1))

    s_draw = interleaved({"kept": ours, "former": former}, repeats=5, number=10)
    s_pick = interleaved({"kept": lambda: logits.max(-1).indices, "former": lambda: logits.argmax(-1)}, repeats=5,
                         number=10)
    same = all(torch.equal(a, c) for a, c in zip(drawn["kept"], drawn["former"]))
    return {
        "sampler_draws_itself": {
            "speedup": _ratio(s_draw["former"], s_draw["kept"]),
            "what": f"one sampled token for 32 rows over {vocab} tokens (rollouts): torch.multinomial / the same "
                    f"exponential draw and max (same tokens for the same seed: {same})",
            "seconds": {k: Summary(v).as_dict(6) for k, v in s_draw.items()}},
        "greedy_pick_by_max": {
            "speedup": _ratio(s_pick["former"], s_pick["kept"]),
            "what": f"greedy token of 32 rows of bf16 logits over {vocab} tokens: argmax / max(-1).indices "
                    "(the same index: the first maximum)",
            "seconds": {k: Summary(v).as_dict(6) for k, v in s_pick.items()}},
    }


def _metatuner(b: Bench, model, tok) -> MetaTuner:
    torch.manual_seed(0)
    mt = MetaTuner(copy.deepcopy(model), tok, MetaTunerSettings(
        target_modules=list(b.lora_targets), rank=b.lora_r, max_prompt_tokens=8 if b.quick else 48))
    with torch.no_grad():  # a hypernetwork past its zero start, so that the LoRA moves the scores
        for p in mt.hyper.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return mt


def _rollouts(b: Bench, model, tok, repeats: int) -> dict:
    mt = _metatuner(b, model, tok)
    task, examples = b.train_examples(b.batch_size)
    p0 = task.default_prompt
    with torch.no_grad(), autocast(b.precision):
        written = mt.write_prompts(mt.rewrite_requests([p0] * len(examples), [ex.question for ex in examples]),
                                   with_grad=False)
        factors = mt.factors(written.h)
    stores = {}

    def run(name, **flags):
        torch.manual_seed(7)
        store = ExpertPromptStore()
        with _switched(**flags), autocast(b.precision):
            run_rollouts(mt, task, examples, p0, factors, store, n=4, temperature=0.8)
        stores[name] = json.dumps(store.entries)

    s = interleaved({"kept": lambda: run("kept"),
                     "former": lambda: run("former", PREALLOCATE_KV=False, CAST_FROZEN_WEIGHTS_ONCE=False)},
                    repeats=repeats, warmup=0)
    return {"rollouts_decoding": {
        "speedup": _ratio(s["former"], s["kept"]),
        "what": f"rollouts (n=4, {len(examples)} queries, sample then score, likelihood reward, {b.precision}): "
                "DynamicCache and autocast's casts / KVBuffer and kept casts "
                f"(same D2: {stores['kept'] == stores['former']})",
        "seconds": {k: Summary(v).as_dict() for k, v in s.items()}}}


def _checker_scoring(b: Bench, model, tok, repeats: int) -> dict:
    """Rollout candidates under the checker's reward (the default): M's likelihood of the gold answer and M's greedy
    answer, from two passes over each candidate's chat (score, then answer) or from one prefill."""
    mt = _metatuner(b, model, tok)
    task, examples = b.train_examples(b.batch_size)
    p0 = task.default_prompt
    torch.manual_seed(7)
    requests = mt.rewrite_requests([p0] * len(examples), [ex.question for ex in examples])
    with torch.no_grad(), autocast(b.precision):
        factors = mt.factors(mt.write_prompts(requests, with_grad=False).h)
        sampled = mt.sample_prompts(requests, n=4, temperature=0.8)
    owners = [i for i, samples in enumerate(sampled) for _ in [p0, *samples]]
    chats = task_chats(tok, task, [p for samples in sampled for p in [p0, *samples]], [examples[i] for i in owners])
    targets = [examples[i].target for i in owners]
    rows = factors.index_select(owners)
    out = {}

    def two_passes():
        with autocast(b.precision):
            scores = mt.score(chats, targets, rows, batch_size=16)
            answers = mt.answer(chats, rows, max_new_tokens=task.max_new_tokens, stop_strings=task.stop_strings)
        out["two_passes"] = (scores, answers.texts)

    def one_prefill():
        with autocast(b.precision):
            scores, answers = mt.score_and_answer(chats, targets, rows, max_new_tokens=task.max_new_tokens,
                                                  stop_strings=task.stop_strings)
        out["one_prefill"] = (scores, answers.texts)

    s = interleaved({"one_prefill": one_prefill, "two_passes": two_passes}, repeats=repeats)
    (kept_scores, kept_texts), (former_scores, former_texts) = out["one_prefill"], out["two_passes"]
    drift = max(abs(a - c) / max(n, 1) for (a, n), (c, _) in zip(kept_scores, former_scores))
    return {"checker_scoring_one_prefill": {
        "speedup": _ratio(s["two_passes"], s["one_prefill"]),
        "what": f"rollout candidates under the checker's reward ({len(chats)} chats: p0 and 4 samples for "
                f"{len(examples)} queries, per-query LoRA, max_new_tokens {task.max_new_tokens}, {b.precision}): "
                f"score then answer, each prefilling the chat / one prefill for both (same answers: "
                f"{kept_texts == former_texts}; mean log-likelihoods within {drift:.1e})",
        "seconds": {k: Summary(v).as_dict() for k, v in s.items()}}}


def _graphs(b: Bench, model, tok, repeats: int) -> dict:
    mt = _metatuner(b, model, tok)
    task, examples = b.train_examples(b.batch_size)
    p0 = task.default_prompt
    requests = mt.rewrite_requests([p0] * len(examples), [ex.question for ex in examples])
    best = [p0] * len(examples)

    def sr(checkpoint: bool):
        mt.checkpoint_sr = checkpoint
        with autocast(b.precision):
            loss = mt.sr_loss(requests, best)
        with mt.role("learner"):
            loss.backward()
        mt.zero_grad(set_to_none=True)

    def h(detached: bool):
        if not detached:
            mt._graph_below_k = contextlib.nullcontext  # the former prefill: a graph through every layer
        try:
            with autocast(b.precision), mt.role("writer"):
                value = mt._prefill(requests)[0]
            value.float().pow(2).sum().backward()
        finally:
            mt.__dict__.pop("_graph_below_k", None)
        mt.zero_grad(set_to_none=True)

    s_sr = interleaved({"checkpointed": lambda: sr(True), "whole_graph": lambda: sr(False)}, repeats=repeats)
    s_h = interleaved({"below_k": lambda: h(True), "every_layer": lambda: h(False)}, repeats=repeats)
    h_bytes = {k: _graph_bytes(lambda d=d: h(d)) for k, d in (("below_k", True), ("every_layer", False))}
    return {
        "sr_loss_checkpoints_g": {
            "speedup": _ratio(s_sr["whole_graph"], s_sr["checkpointed"]),
            "what": f"SR loss forward+backward, {len(requests)} requests, {b.precision}: whole graph / G's layers "
                    "checkpointed (slower by the recompute; the same loss and gradients; what it saves in peak "
                    "memory: memory_vs_sft's details)",
            "seconds": {k: Summary(v).as_dict() for k, v in s_sr.items()}},
        "prefill_graph_below_k": {
            "speedup": _ratio(s_h["every_layer"], s_h["below_k"]),
            "what": f"G's prefill with gradient for h (forward + backward of h), {len(requests)} requests, "
                    f"{b.precision}: a graph through every layer / through layers 0..k-1 only (the graph keeps "
                    f"{h_bytes['below_k'] / 2**20:.0f} of {h_bytes['every_layer'] / 2**20:.0f} MiB; the same h "
                    "and gradients)",
            "graph_mib": {k: round(v / 2**20, 1) for k, v in h_bytes.items()},
            "seconds": {k: Summary(v).as_dict() for k, v in s_h.items()}},
    }

"""In-process hot-path benchmarks: per-query LoRA against PEFT, scoring against a plain forward, batched generation
against transformers and llama.cpp, and multiple-choice evaluation throughput.

Run through the suite (`python benchmarks/perf.py [--quick] [--only NAME]`); each function takes a `Bench` and
returns a JSON-ready dict whose "ratio" (or "examples_per_s") is the headline. Both sides of a ratio run in this
process, interleaved, on their own copy of the same weights (benchmarks/common.py has the rules).
"""

from __future__ import annotations

import contextlib
import copy

import torch
from peft import LoraConfig, get_peft_model

from bench_setup import CANDIDATES, Bench
from common import Summary, autocast, interleaved
from metatuner.config import MetaTunerSettings
from metatuner.evaluate import evaluate
from metatuner.generation import chat_prompt, generate, length_batches, lm_batch, lm_loss, score_targets
from metatuner.hyperlora import HyperLoraConfig, HyperLoraGenerator, PerExampleLoRA
from metatuner.model import MetaTuner


def _ratio(ours: list[float], theirs: list[float]) -> float:
    """Median of the per-repetition ratios: the two sides of one repetition ran back to back under the same
    machine load, so their ratio is steadier than the ratio of two medians on a shared, busy CPU."""
    return round(Summary([a / b for a, b in zip(ours, theirs)]).median, 4)


def _nonzero_b(factors):
    """Random B (the hypernetwork starts at B = 0); the cost is the same, the test of the path is honest."""
    for _, b in factors.factors.values():
        with torch.no_grad():
            b.normal_(0, 0.02)
    return factors


# ---------------------------------------------------------------------------------------------------------------
def hyperlora_vs_peft(b: Bench) -> dict:
    """Forward + backward of M with per-example LoRA written by the hypernetwork, over PEFT's static LoRA (same rank,
    targets, batch and tokens). Ours includes the hypernetwork's forward and backward."""
    model, tok = b.load()
    _, _, pairs = b.actor_pairs(b.batch_size, tok)
    batch = lm_batch(tok, [p for p, _ in pairs], [t for _, t in pairs], b.max_length)
    config = HyperLoraConfig(target_modules=list(b.lora_targets), r=b.lora_r)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(
        r=b.lora_r, lora_alpha=b.lora_r, lora_dropout=0.0, target_modules=list(b.lora_targets), task_type="CAUSAL_LM"))
    actor = PerExampleLoRA(model, config.target_modules, scale=config.scale)
    hyper = HyperLoraGenerator(config, input_dim=model.config.hidden_size, targets=actor.targets)
    h = torch.randn(b.batch_size, model.config.hidden_size)

    def ours():
        with autocast(b.precision):
            factors = hyper(h)
            with actor.apply(factors):
                loss = lm_loss(model, batch)
        loss.backward()
        hyper.zero_grad(set_to_none=True)

    def peft():
        with autocast(b.precision):
            loss = lm_loss(peft_model, batch)
        loss.backward()
        peft_model.zero_grad(set_to_none=True)

    seconds = interleaved({"ours": ours, "peft": peft}, repeats=b.repeats, warmup=1)
    tokens = int(batch["attention_mask"].sum())
    return {
        "ratio": _ratio(seconds["ours"], seconds["peft"]),
        "target": "<= 1.10",
        "what": "seconds per forward+backward, per-query LoRA (hypernetwork included) / PEFT static LoRA",
        "tokens_per_batch": tokens, "batch_size": b.batch_size, "rank": b.lora_r, "targets": list(b.lora_targets),
        "precision": b.precision,
        "ours_seconds": Summary(seconds["ours"]).as_dict(), "peft_seconds": Summary(seconds["peft"]).as_dict(),
    }


# ---------------------------------------------------------------------------------------------------------------
def _candidate_rows(b: Bench, tok):
    task, examples = b.train_examples(b.batch_size)
    pool = CANDIDATES[: b.n_candidates]
    owners = [i for i in range(len(examples)) for _ in pool]
    chats = [chat_prompt(tok, task.messages(p, examples[i])) for i in range(len(examples)) for p in pool]
    targets = [examples[i].target for i in owners]
    return owners, chats, targets


def scoring_vs_forward(b: Bench) -> dict:
    """Likelihood rewards of n candidates per query through M with each query's LoRA (`MetaTuner.score`, what
    rollouts run), in tokens/s, over the plain model's forward on the same padded batches."""
    model, tok = b.load()
    plain = copy.deepcopy(model)
    mt = MetaTuner(model, tok, MetaTunerSettings(target_modules=list(b.lora_targets), rank=b.lora_r))
    owners, chats, targets = _candidate_rows(b, tok)
    with torch.no_grad():
        h = torch.randn(b.batch_size, model.config.hidden_size)
        factors = _nonzero_b(mt.hyper(h)).index_select(owners)
    lengths = [len(p) + len(t) for p, t in zip(chats, targets)]
    groups = length_batches(lengths, 16)
    batches = [lm_batch(tok, [chats[i] for i in g], [targets[i] for i in g], b.max_length, append_eos=False)
               for g in groups]
    tokens = sum(int(x["attention_mask"].sum()) for x in batches)

    def ours():
        with autocast(b.precision):
            mt.score(chats, targets, factors, batch_size=16)

    @torch.no_grad()
    def forward():
        with autocast(b.precision):
            for x in batches:
                plain(input_ids=x["input_ids"], attention_mask=x["attention_mask"])

    @torch.no_grad()
    def decoder_only():  # the floor: no LM head at all
        with autocast(b.precision):
            for x in batches:
                plain.get_decoder()(input_ids=x["input_ids"], attention_mask=x["attention_mask"])

    # The plain forward's logits over every position (49k vocabulary) make it the slowest call here.
    seconds = interleaved({"ours": ours, "forward": forward, "decoder_only": decoder_only},
                          repeats=max(2, b.repeats - 2))
    rate = {k: [tokens / s for s in v] for k, v in seconds.items()}
    return {
        "ratio": _ratio(rate["ours"], rate["forward"]),
        "target": ">= 0.80",
        "what": "tokens/s of likelihood scoring with per-query LoRA / tokens/s of model(input_ids, attention_mask)",
        "ratio_vs_decoder_only": _ratio(rate["ours"], rate["decoder_only"]),
        "queries": b.batch_size, "candidates_per_query": len(CANDIDATES[: b.n_candidates]), "rows": len(chats),
        "tokens": tokens, "precision": b.precision,
        "ours_tokens_per_s": Summary(rate["ours"]).as_dict(1),
        "forward_tokens_per_s": Summary(rate["forward"]).as_dict(1),
        "decoder_only_tokens_per_s": Summary(rate["decoder_only"]).as_dict(1),
    }


# ---------------------------------------------------------------------------------------------------------------
def _hf_generate(model, tok, chats, max_new_tokens) -> int:
    """transformers' generate, one prompt at a time, greedy; new tokens without the end-of-sequence token."""
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos]) | {tok.eos_token_id}
    produced = 0
    for chat in chats:
        ids = tok(chat, add_special_tokens=False, return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
        new = out[0, ids["input_ids"].shape[1]:].tolist()
        produced += len([t for t in new if t not in eos])
    return produced


def _llama_cpp(chats, max_new_tokens, threads):
    """llama-cpp-python on the GGUF the embedded model is converted from; None when it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    from metatuner.models import EMBEDDED_MODELS, _embedded_gguf

    gguf = _embedded_gguf(next(iter(EMBEDDED_MODELS)))
    llm = Llama(model_path=str(gguf), n_ctx=1024, n_threads=threads, n_threads_batch=threads, seed=0, verbose=False)

    def run() -> int:
        produced = 0
        for chat in chats:
            out = llm.create_completion(chat, max_tokens=max_new_tokens, temperature=0.0, top_k=1)
            produced += out["usage"]["completion_tokens"]
        return produced

    return run, gguf.name


def generation_speedup(b: Bench) -> dict:
    """Our batched evaluation generation (total new tokens/s) over transformers' generate at batch 1, greedy, same
    prompts and limit; llama.cpp (batch 1, the same model as a Q4_1 GGUF) beside them.

    Both transformers-based sides run in fp32 and, on a CPU that computes bf16 natively, under bf16 autocast (what
    `torch.autocast` gives any caller; elsewhere it is emulated and many times slower, so not a contender); the
    headline divides our faster setting by transformers' faster one, and every figure is reported."""
    model, tok = b.load()
    chats = b.generation_chats(b.gen_prompts, tok)
    few = chats[: b.gen_baseline_prompts]  # batch 1 is slow; a rate over fewer prompts is still a rate
    produced: dict[str, int] = {}

    def ours(precision):
        with autocast(precision):
            out = generate(model, tok, chats, max_new_tokens=b.max_new_tokens, batch_size=b.gen_batch_size)
        produced[f"ours_{precision}"] = sum(out.new_tokens)

    @torch.no_grad()
    def hf(precision):
        with autocast(precision):
            produced[f"hf_{precision}"] = _hf_generate(model, tok, few, b.max_new_tokens)

    precisions = ("fp32", "bf16") if b.precision == "bf16" else ("fp32",)  # bf16 only where training picks it
    fns = {f"{side}_{p}": (lambda side=side, p=p: (ours if side == "ours" else hf)(p))
           for side in ("ours", "hf") for p in precisions}
    gguf_name = None
    if b.llama_cpp and b.model.startswith("embedded:"):
        found = _llama_cpp(few, b.max_new_tokens, b.threads)
        if found is not None:
            run, gguf_name = found
            fns["llama_cpp"] = lambda: produced.__setitem__("llama_cpp", run())
    repeats = max(2, b.repeats // 2)  # batch-1 decoding is the slowest thing in the suite
    seconds = interleaved(fns, repeats=repeats, warmup=1)
    rate = {k: [produced[k] / s for s in v] for k, v in seconds.items()}
    best = {side: max((f"{side}_{p}" for p in precisions), key=lambda k: Summary(rate[k]).median)
            for side in ("ours", "hf")}
    result = {
        "ratio": _ratio(rate[best["ours"]], rate[best["hf"]]),
        "target": ">= 8",
        "what": f"new tokens/s: ours (batch {b.gen_batch_size}, {len(chats)} prompts) / transformers generate "
                f"(batch 1, {len(few)} prompts); greedy, max_new_tokens {b.max_new_tokens}; each side in its faster "
                f"precision (ours: {best['ours'].split('_')[1]}, transformers: {best['hf'].split('_')[1]})",
        "ratio_both_fp32": _ratio(rate["ours_fp32"], rate["hf_fp32"]),
        "ours_tokens_per_s": Summary(rate[best["ours"]]).as_dict(1),
        "hf_batch1_tokens_per_s": Summary(rate[best["hf"]]).as_dict(1),
        "tokens_per_s_by_setting": {k: Summary(v).as_dict(1) for k, v in rate.items()},
        "new_tokens": dict(produced),
    }
    result["llama_cpp_what"] = (f"new tokens/s: ours (batch {b.gen_batch_size}, {len(chats)} prompts, "
                                f"{best['ours'].split('_')[1]}) / llama.cpp (batch 1, {len(few)} prompts, the shipped "
                                f"{gguf_name or 'GGUF'}); greedy, max_new_tokens {b.max_new_tokens}")
    if "llama_cpp" in rate:
        result["llama_cpp_batch1_tokens_per_s"] = Summary(rate["llama_cpp"]).as_dict(1)
        result["llama_cpp_gguf"] = gguf_name
        result["ours_over_llama_cpp"] = _ratio(rate[best["ours"]], rate["llama_cpp"])
    else:
        result["llama_cpp_batch1_tokens_per_s"] = None
        result["ours_over_llama_cpp"] = None
        result["notes"] = {"generation_vs_llama_cpp": "not measured: " + (
            "llama-cpp-python is not installed (pip install -e '.[bench]' builds it)" if b.llama_cpp
            and b.model.startswith("embedded:") else "needs the embedded model's GGUF (full mode)")}
    result.update(_generation_with_lora(b, model, tok, chats))
    result["work"] = _generation_work(b, model, tok, chats, few, seconds, result["ratio_both_fp32"])
    return result


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul")


def _generation_work(b: Bench, model, tok, chats, few, seconds, ratio_fp32) -> dict:
    """How far `generation_speedup` can go on this machine in fp32: each side's matrix-product FLOPs (counted in an
    untimed run) over its timed seconds, the share of our run's CPU time that the matrix products take (a profiled
    run), and one thread's rate on a large square product. With every cost but the matrix products gone, our side
    would run 1 / share times faster, so the fp32 ratio could reach at most ratio / share without fewer FLOPs."""
    from torch.profiler import ProfilerActivity, profile

    from bench_setup import count_flops

    def ours():
        return generate(model, tok, chats, max_new_tokens=b.max_new_tokens, batch_size=b.gen_batch_size)

    with count_flops() as counter:
        ours()
    ours_flops = counter.get_total_flops()
    with count_flops() as counter, torch.no_grad():
        _hf_generate(model, tok, few, b.max_new_tokens)
    hf_flops = counter.get_total_flops()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ours()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    share = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS) / total
    size = 256 if b.quick else 1024
    x = torch.randn(size, size)
    square = interleaved({"mm": lambda: torch.mm(x, x)}, repeats=b.repeats, warmup=1, number=5)["mm"]
    ours_s, hf_s = Summary(seconds["ours_fp32"]).median, Summary(seconds["hf_fp32"]).median
    return {
        "what": "matrix-product FLOPs (linear layers and LM head, prefill and decoding; attention not counted) per "
                "timed second; matmul_share: self CPU time in aten::mm and kin / all operators' in a profiled run",
        "gflop": {"ours": round(ours_flops / 1e9, 2), "hf_batch1": round(hf_flops / 1e9, 2)},
        "gflop_per_s": {"ours": round(ours_flops / ours_s / 1e9, 2), "hf_batch1": round(hf_flops / hf_s / 1e9, 2),
                        "ours_matmuls_alone": round(ours_flops / (share * ours_s) / 1e9, 2),
                        f"square_{size}_matmul": round(2 * size**3 / Summary(square).median / 1e9, 2)},
        "ours_matmul_share": round(share, 3),
        "fp32_ratio_ceiling": round(ratio_fp32 / share, 2),
    }


def _generation_with_lora(b: Bench, model, tok, chats) -> dict:
    """MetaTuner's answer generation (per-query LoRA from h), with the factors made once per set of live rows
    against the former behaviour of running the hypernetwork again at every decoded token."""
    mt = MetaTuner(model, tok, MetaTunerSettings(target_modules=list(b.lora_targets), rank=b.lora_r))
    with torch.no_grad():
        h = torch.randn(len(chats), model.config.hidden_size)
    produced = {}

    def run(name, context):
        with mt.role("actor"):
            out = generate(mt.m, tok, chats, max_new_tokens=b.max_new_tokens, batch_size=b.gen_batch_size,
                           batch_context=context)
        produced[name] = sum(out.new_tokens)

    fns = {"cached": lambda: run("cached", mt.lora_context(h)),
           "per_token": lambda: run("per_token", lambda rows: mt.lora.apply(mt.hyper(h[list(rows)])))}
    seconds = interleaved(fns, repeats=max(2, b.repeats // 2), warmup=0)
    rate = {k: [produced[k] / s for s in v] for k, v in seconds.items()}
    return {"with_per_query_lora_tokens_per_s": Summary(rate["cached"]).as_dict(1),
            "with_per_query_lora_hyper_every_token_tokens_per_s": Summary(rate["per_token"]).as_dict(1),
            "lora_factor_reuse_speedup": _ratio(rate["cached"], rate["per_token"])}


# ---------------------------------------------------------------------------------------------------------------
def eval_examples_per_s(b: Bench) -> dict:
    """Multiple-choice evaluation (CosmosQA, options ranked by likelihood), examples/s, through `evaluate`; beside
    it the former scorer that ran every option as its own prompt+option row."""
    model, tok = b.load()
    task, examples, path = b.mc_examples_and_task()

    def run(flat: bool):
        if not flat:
            return evaluate(model, tok, task, examples, batch_size=16, progress=False)
        with _flat_option_scoring():
            return evaluate(model, tok, task, examples, batch_size=16, progress=False)

    accuracy = {}

    def shared():
        accuracy["shared"] = run(False).metrics["accuracy"]

    def flat():
        accuracy["flat"] = run(True).metrics["accuracy"]

    # The former flat scorer is the slow side (about 3x); three repetitions keep the run short.
    seconds = interleaved({"shared": shared, "flat": flat}, repeats=min(3, b.repeats), warmup=1)
    rate = {k: [len(examples) / s for s in v] for k, v in seconds.items()}
    return {
        "examples_per_s": round(Summary(rate["shared"]).median, 3),
        "what": f"CosmosQA examples/s, {len(examples)} items, 4 options ranked by mean log-likelihood, batch 16, fp32",
        "data": str(path.name), "examples": len(examples),
        "shared_prefix_examples_per_s": Summary(rate["shared"]).as_dict(3),
        "flat_rows_examples_per_s": Summary(rate["flat"]).as_dict(3),
        "shared_prefix_speedup": _ratio(rate["shared"], rate["flat"]),
        "accuracy": accuracy,
    }


@contextlib.contextmanager
def _flat_option_scoring():
    """Swap in the former option scorer (every option as a full prompt+option row through `score_targets`)."""
    import metatuner.evaluate as ev

    def flat_score_choices(model, tokenizer, prompts, choices, *, batch_size=16, batch_context=None, progress=False):
        rows = [(i, c) for i, options in enumerate(choices) for c in options]
        ctx = (lambda r: batch_context([rows[k][0] for k in r])) if batch_context else None
        scores = iter(score_targets(model, tokenizer, [prompts[i] for i, _ in rows], [c for _, c in rows],
                                    batch_size=batch_size, batch_context=ctx))
        return [[next(scores) for _ in options] for options in choices]

    saved = ev.score_choices
    ev.score_choices = flat_score_choices
    try:
        yield
    finally:
        ev.score_choices = saved


# ---------------------------------------------------------------------------------------------------------------
def speedups(b: Bench) -> dict:
    """A/B figures for changes in the hot paths, each side run in turns on the same inputs (> 1: the kept way is
    faster). Also bf16 autocast against fp32 for a LoRA training step, which decides the training default."""
    model, tok = b.load()
    chats = b.generation_chats(b.gen_batch_size, tok)
    from metatuner.generation import left_padded_batch

    batch = left_padded_batch(tok, chats)

    @torch.no_grad()
    def prefill(keep_last: bool):
        extra = {"logits_to_keep": 1} if keep_last else {}
        model(**batch, use_cache=True, **extra)

    repeats = max(2, b.repeats - 2)  # A/B figures of kept changes: fewer repetitions than the headline ratios
    s_prefill = interleaved({"last": lambda: prefill(True), "all": lambda: prefill(False)}, repeats=repeats)

    mt = MetaTuner(copy.deepcopy(model), tok, MetaTunerSettings(share_depth=0.25))
    task, examples = b.train_examples(b.batch_size)
    requests = mt.rewrite_requests([task.default_prompt] * len(examples), [ex.question for ex in examples])

    def h_grad(early: bool):
        with autocast(b.precision), mt.role("writer"):
            h = mt.encode(requests) if early else mt._prefill(requests)[0]
        h.float().pow(2).sum().backward()
        mt.zero_grad(set_to_none=True)

    s_encode = interleaved({"k_layers": lambda: h_grad(True), "full_prefill": lambda: h_grad(False)},
                           repeats=repeats)

    _, _, pairs = b.actor_pairs(b.batch_size, tok)
    lm = lm_batch(tok, [p for p, _ in pairs], [t for _, t in pairs], b.max_length)
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                 target_modules=list(b.lora_targets)))

    def step(precision):
        with autocast(precision):
            loss = lm_loss(peft_model, lm)
        loss.backward()
        peft_model.zero_grad(set_to_none=True)

    s_bf16 = interleaved({"bf16": lambda: step("bf16"), "fp32": lambda: step("fp32")}, repeats=repeats)
    import decoding_ab

    return {**decoding_ab.speedups(b),
        "prefill_last_logits_only": {
            "speedup": _ratio(s_prefill["all"], s_prefill["last"]),
            "what": f"prefill of {len(chats)} generation prompts with use_cache: logits at every position / at the "
                    "last one only (generate, write_prompts, sample_prompts)",
            "seconds": {k: Summary(v).as_dict() for k, v in s_prefill.items()}},
        "encoder_stops_at_layer_k": {
            "speedup": _ratio(s_encode["full_prefill"], s_encode["k_layers"]),
            "what": f"h with gradient (forward + backward), {len(requests)} requests, k = K/4: full prefill / "
                    "layers 0..k-1 only (MetaTuner.encode)",
            "seconds": {k: Summary(v).as_dict() for k, v in s_encode.items()}},
        "bf16_autocast": {
            "speedup": _ratio(s_bf16["fp32"], s_bf16["bf16"]),
            "what": "PEFT LoRA forward+backward on the actor batch: fp32 / bf16 autocast",
            "seconds": {k: Summary(v).as_dict() for k, v in s_bf16.items()}},
    }

"""Batched generation and teacher-forced scoring, shared by evaluation, rollouts, training and the baselines.

    prompts = task_chats(tokenizer, task, [p0] * len(examples), examples)
    out = generate(model, tokenizer, prompts, max_new_tokens=256, batch_size=16, stop_strings=["\\n\\nQuestion:"])
    targets = [ex.target for ex in examples]
    scores = score_targets(model, tokenizer, prompts, targets)   # [(sum_logprob, n_tokens)]
    scores, out = score_and_generate(model, tokenizer, prompts, targets, max_new_tokens=16)  # both, one prefill

Prompts are grouped into batches of similar length (fewer pad tokens), left-padded, and decoded with the KV cache
by our own loop (`decode_loop`, over a `DecodeBatch`). Results come back in the caller's order.
`batch_context(indices)` lets a caller wrap each batch in a context manager, which is how per-example LoRA factors
follow their rows through the sort. A `DecodeBatch` can also be stepped by hand, with rows leaving and joining
between steps (the server's continuous batching, `metatuner.serve.engine`).

Two things keep a decoding step cheap without changing what it computes. The KV cache is a preallocated buffer
per layer (`KVBuffer`): a step writes its token's keys and values in place, where transformers' `DynamicCache`
concatenates the whole cache at every step. Under bf16 (or fp16) autocast, the frozen weights of the model's linear
layers are cast once and kept (`frozen_weight_casts`), where autocast would cast every weight again at every
forward (it caches only casts of weights that require grad); the linear layers then compute exactly what they
compute under autocast. `PREALLOCATE_KV` and `CAST_FROZEN_WEIGHTS_ONCE` switch either off (benchmarks' A/B).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterator, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicLayer, get_layer_types_and_kwargs

BatchContext = Callable[[list[int]], ContextManager]

PREALLOCATE_KV = True  # decode into `KVBuffer` layers (False: transformers' DynamicCache, as before)
CAST_FROZEN_WEIGHTS_ONCE = True  # `frozen_weight_casts` keeps cast weights (False: autocast casts them every forward)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The model's chat template applied to `messages`, ending where the assistant's answer starts."""
    if tokenizer.chat_template is None:
        # Base models without a template get the plain user text followed by a newline.
        return "\n\n".join(m["content"] for m in messages) + "\n"
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def task_chats(tokenizer: PreTrainedTokenizerBase, task, prompts: Sequence[str], examples) -> list[str]:
    """Each example's question under its instruction: the task's messages through the chat template."""
    return [chat_prompt(tokenizer, task.messages(p, ex)) for p, ex in zip(prompts, examples)]


def length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so an out-of-memory error shows early)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _encode(tokenizer: PreTrainedTokenizerBase, texts: Sequence[str]) -> list[list[int]]:
    # Chat templates already contain their special tokens; adding more would shift every position.
    return tokenizer(list(texts), add_special_tokens=False)["input_ids"]


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def _right_pad(rows: list[list[int]], pad_id: int, device: torch.device,
               width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded on the right to `width` (default: the longest), with their mask: continuations of a cached prompt."""
    width = max(len(r) for r in rows) if width is None else width
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def _cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    cut = min((text.find(s) for s in stop_strings if s and s in text), default=-1)
    return text[:cut] if cut >= 0 else text


@dataclass
class GenerationOutput:
    texts: list[str]
    new_tokens: list[int]
    seconds: float


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop_strings: Sequence[str] = (),
    batch_size: int = 16,
    batch_context: BatchContext | None = None,
    progress: bool = False,
    desc: str = "generate",
) -> GenerationOutput:
    """Generate a completion for every prompt (greedy unless `do_sample`); returned in the prompts' order.

    Rows that finish (end-of-sequence token or a stop string) leave the batch at once, together with their KV
    cache and, through `batch_context`, their per-example LoRA: a batch costs what its live rows cost.
    """
    start = time.perf_counter()
    encoded = _encode(tokenizer, prompts)
    texts: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    eos = eos_ids(tokenizer, model)
    bar = tqdm(total=len(prompts), desc=desc, disable=not progress, unit="item")
    for batch in length_batches([len(e) for e in encoded], batch_size):
        prefilled = DecodeBatch.prefill(model, [encoded[i] for i in batch], tokenizer.pad_token_id,
                                        batch_context(batch) if batch_context else None, reserve=max_new_tokens)
        _decode_rows(model, tokenizer, prefilled, batch, texts, counts, eos, max_new_tokens=max_new_tokens,
                     temperature=temperature if do_sample else 0.0, top_p=top_p, stop_strings=stop_strings,
                     batch_context=batch_context)
        bar.update(len(batch))
    bar.close()
    return GenerationOutput(texts, counts, time.perf_counter() - start)


def _decode_rows(model, tokenizer, prefilled: "DecodeBatch", batch: list[int], texts: list[str], counts: list[int],
                 eos: list[int], *, max_new_tokens: int, temperature: float, top_p: float, stop_strings: Sequence[str],
                 batch_context: BatchContext | None) -> None:
    """Decode one prefilled batch; row k's text and token count go to `texts[batch[k]]` and `counts[batch[k]]`."""
    rows = decode_loop(
        model, prefilled.cache, prefilled.logits, prefilled.mask, prefilled.pos, max_new_tokens=max_new_tokens,
        eos_ids=eos, temperature=temperature, top_p=top_p, tokenizer=tokenizer,
        stop_strings=stop_strings,
        row_context=(lambda live: batch_context([batch[k] for k in live])) if batch_context else None,
    )
    for i, row in zip(batch, rows):
        counts[i] = len(row)
        texts[i] = _cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop_strings).strip()


@torch.no_grad()
def score_and_generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    max_new_tokens: int,
    stop_strings: Sequence[str] = (),
    batch_size: int = 16,
    max_length: int = 1024,
    batch_context: BatchContext | None = None,
) -> tuple[list[tuple[float, int]], GenerationOutput]:
    """`score_targets(prompts, targets)` and greedy `generate(prompts)` from one prefill of each prompt.

    The prompt is most of a row (a rollout's candidate prompt and question against a short target and answer), so
    scoring it and answering it separately ran the prompt through M twice. Here each batch's prefill gives the
    first target token's and the first answer token's logits; the targets then run through its KV cache, which is
    cut back to the prompts before decoding. The answers are `generate`'s (same batches, same prefill); the scores
    are `score_targets`' up to float rounding (other padding and batch neighbours). Where the cache cannot be
    cut back in place (`PREALLOCATE_KV` off, or layers other than full attention) it runs the two separately.
    """
    if decode_cache(model, 0) is None:
        scores = score_targets(model, tokenizer, prompts, targets, batch_size=batch_size, max_length=max_length,
                               batch_context=batch_context)
        return scores, generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                                batch_size=batch_size, batch_context=batch_context)
    start = time.perf_counter()
    encoded, target_ids = _encode(tokenizer, prompts), _encode(tokenizer, targets)
    scores: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
    texts: list[str] = [""] * len(prompts)
    counts: list[int] = [0] * len(prompts)
    eos = eos_ids(tokenizer, model)
    for batch in length_batches([len(e) for e in encoded], batch_size):
        # score_targets' rule: a row longer than max_length loses the end of its target, never the prompt
        cut = [target_ids[i][: max(0, max_length - len(encoded[i]))] for i in batch]
        width = max(len(t) for t in cut)
        context = (lambda: batch_context(batch)) if batch_context else (lambda: None)  # a context enters once
        prefilled = DecodeBatch.prefill(model, [encoded[i] for i in batch], tokenizer.pad_token_id, context(),
                                        reserve=max(max_new_tokens, width))
        if width:
            sums = prefilled.target_logprobs(model, cut, tokenizer.pad_token_id, context())
            prefilled.cache.crop(-width)
            for i, s, t in zip(batch, sums.tolist(), cut):
                scores[i] = (s, len(t))
        _decode_rows(model, tokenizer, prefilled, batch, texts, counts, eos, max_new_tokens=max_new_tokens,
                     temperature=0.0, top_p=1.0, stop_strings=stop_strings, batch_context=batch_context)
    return scores, GenerationOutput(texts, counts, time.perf_counter() - start)


def eos_ids(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> list[int]:
    """The tokens that end a completion: the model's generation config's (when `model` is given) and the
    tokenizer's. G's prompt writing passes no model: a prompt ends at the tokenizer's end-of-turn token alone."""
    ids = model.generation_config.eos_token_id if model is not None else None
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def lm_batch(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    max_length: int = 1024,
    append_eos: bool = True,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Right-padded `input_ids`, `attention_mask` and `labels` (-100 except on target tokens) for prompt+target.

    Prompt and target are tokenised separately and concatenated, so the target's tokens are the same whatever the
    prompt ends with. Sequences longer than `max_length` lose the end of their target, never the prompt.
    """
    p_ids = _encode(tokenizer, prompts)
    t_ids = _encode(tokenizer, targets)
    rows, labels = [], []
    for p, t in zip(p_ids, t_ids):
        if append_eos and tokenizer.eos_token_id is not None:
            t = t + [tokenizer.eos_token_id]
        seq = (p + t)[:max_length]
        n_target = max(0, len(seq) - len(p))
        rows.append(seq)
        labels.append([-100] * (len(seq) - n_target) + seq[len(seq) - n_target :])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=torch.long)
    attention = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], dtype=torch.long)
    label_t = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels], dtype=torch.long)
    return {"input_ids": input_ids.to(device), "attention_mask": attention.to(device), "labels": label_t.to(device)}


def target_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row sum of target-token log-probabilities and target-token count, from full logits (differentiable)."""
    logits = logits[:, :-1].float()
    labels = labels[:, 1:]
    mask = labels != -100
    picked = torch.gather(logits, 2, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    logprobs = picked - torch.logsumexp(logits, dim=-1)
    return (logprobs * mask).sum(-1), mask.sum(-1)


def digit_tokens(tokenizer: PreTrainedTokenizerBase, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ids of every token whose text holds a digit (`metatuner.prompt_without_digits` bans them from G's
    prompts, so G cannot state a number, and with it a guessed answer)."""
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])  # text, not pieces: <0x31> is a byte
    return torch.tensor([i for i, text in enumerate(texts) if any(c.isdigit() for c in text)],
                        dtype=torch.long, device=device)


def base_model(model):
    """The transformers model under DDP / FSDP / DeepSpeed wrappers (`.module`) and a PEFT model."""
    while hasattr(model, "module"):
        model = model.module
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@functools.lru_cache(maxsize=None)
def _accepts_logits_to_keep(model_class: type) -> bool:
    return "logits_to_keep" in inspect.signature(model_class.forward).parameters


def last_logits_only(model) -> dict:
    """`logits_to_keep=1` where the model takes it: a prefill needs the last position's logits only, and the LM
    head over every position of a 49k vocabulary is about a fifth of a small model's prefill."""
    return {"logits_to_keep": 1} if _accepts_logits_to_keep(type(base_model(model))) else {}


def _head_only_at_targets(model) -> bool:
    # Models that transform logits after the head (soft-capping, scaling) must go through their own forward.
    config = model.config
    return not (getattr(config, "final_logit_softcapping", None) or getattr(config, "logits_scaling", None)
                or getattr(config, "logit_scale", None))


def sequence_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of target log-probabilities, target count) per row of an `lm_batch`, differentiable.

    The LM head runs only at target positions: with a 49k-token vocabulary, logits over every position are most
    of the memory of a training step and a good part of its time.
    """
    base = base_model(model)
    labels = batch["labels"][:, 1:]
    with frozen_weight_casts(model):
        # No KV cache: nothing decodes after a loss or a score, and a checkpointed layer refuses one anyway.
        if not _head_only_at_targets(base):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
            return target_logprobs(logits, batch["labels"])
        hidden = base.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                    use_cache=False).last_hidden_state
        mask = labels != -100
        logits = base.get_output_embeddings()(hidden[:, :-1][mask]).float()
    token_logprobs = -F.cross_entropy(logits, labels[mask], reduction="none")
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(labels)[mask]
    sums = torch.zeros(labels.shape[0], dtype=token_logprobs.dtype, device=labels.device).index_add(0, rows, token_logprobs)
    return sums, mask.sum(-1)


def lm_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean NLL over all target tokens of an `lm_batch` (what `model(**batch).loss` computes, with less memory)."""
    sums, counts = sequence_logprobs(model, batch)
    return -sums.sum() / counts.sum().clamp(min=1)


@torch.no_grad()
def score_targets(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    append_eos: bool = False,
    batch_context: BatchContext | None = None,
    progress: bool = False,
) -> list[tuple[float, int]]:
    """Teacher-forced (sum of log-probabilities, token count) of each target given its prompt, in input order."""
    lengths = [len(p) + len(t) for p, t in zip(prompts, targets)]  # characters are a fine proxy for sorting
    results: list[tuple[float, int]] = [(0.0, 0)] * len(prompts)
    bar = tqdm(total=len(prompts), desc="score", disable=not progress, unit="item")
    for batch in length_batches(lengths, batch_size):
        enc = lm_batch(
            tokenizer, [prompts[i] for i in batch], [targets[i] for i in batch], max_length, append_eos, model.device
        )
        with batch_context(batch) if batch_context else contextlib.nullcontext():
            sums, counts = sequence_logprobs(model, enc)
        for i, s, c in zip(batch, sums.tolist(), counts.tolist()):
            results[i] = (s, int(c))
        bar.update(len(batch))
    bar.close()
    return results


@torch.no_grad()
def score_choices(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    choices: Sequence[Sequence[str]],
    *,
    batch_size: int = 16,
    max_length: int = 1024,
    batch_context: BatchContext | None = None,
    progress: bool = False,
) -> list[list[tuple[float, int]]]:
    """(sum of log-probabilities, token count) of every option `choices[i][j]` given `prompts[i]`.

    What `score_targets` gives for the flattened (prompt, option) pairs, but each prompt is encoded once and its KV
    cache is shared by its options: with a long passage and short options (multiple choice) that is nearly
    options-times less work. Tokens are those of `lm_batch` (prompt and option tokenised separately).
    `batch_context(indices)` gets prompt indices, repeated once per option for the options' forward.
    """
    base = base_model(model)
    if not _head_only_at_targets(base) or not hasattr(base, "get_decoder"):
        flat = [(i, c) for i, options in enumerate(choices) for c in options]
        ctx = (lambda rows: batch_context([flat[r][0] for r in rows])) if batch_context else None
        scores = iter(score_targets(model, tokenizer, [prompts[i] for i, _ in flat], [c for _, c in flat],
                                    batch_size=batch_size, max_length=max_length, batch_context=ctx))
        return [[next(scores) for _ in options] for options in choices]
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    cache_kw = _cache_argument(type(decoder))
    device = base.device
    p_ids = _encode(tokenizer, prompts)
    results: list[list[tuple[float, int]]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc="score", disable=not progress, unit="item")
    for batch in length_batches([len(p) for p in p_ids], batch_size):
        ids, mask = _left_pad([p_ids[i] for i in batch], tokenizer.pad_token_id, device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with batch_context(batch) if batch_context else contextlib.nullcontext(), frozen_weight_casts(model):
            out = decoder(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        owner, rows = [], []
        for k, i in enumerate(batch):
            room = max(0, max_length - len(p_ids[i]))  # as lm_batch: the option's end goes, never the prompt
            for option in _encode(tokenizer, list(choices[i])):
                owner.append(k)
                rows.append(option[:room])
        width = max(1, max(len(r) for r in rows))
        target, t_mask = _right_pad(rows, tokenizer.pad_token_id, device, width)
        index = torch.tensor(owner, device=device)
        cache = output_cache(out)
        cache.batch_select_indices(index)  # every option row continues its own prompt's cache
        c_mask = torch.cat([mask[index], t_mask], dim=1)
        c_pos = pos[index][:, -1:] + 1 + torch.arange(width, device=device)
        with batch_context([batch[k] for k in owner]) if batch_context else contextlib.nullcontext(), \
                frozen_weight_casts(model):
            hidden = decoder(input_ids=target, attention_mask=c_mask, position_ids=c_pos, use_cache=True,
                             **{cache_kw: cache}).last_hidden_state
            # Option token j is predicted by the state before it: the prompt's last for j = 0, the option's j-1.
            before = torch.cat([out.last_hidden_state[index, -1:], hidden[:, :-1]], dim=1)
            keep = t_mask.bool()
            token_logprobs = -F.cross_entropy(head(before[keep]).float(), target[keep], reduction="none")
        row_of = torch.arange(len(rows), device=device).unsqueeze(1).expand_as(target)[keep]
        sums = torch.zeros(len(rows), dtype=token_logprobs.dtype, device=device).index_add(0, row_of, token_logprobs)
        for k, s, c in zip(owner, sums.tolist(), t_mask.sum(-1).tolist()):
            results[batch[k]].append((s, int(c)))
        bar.update(len(batch))
    bar.close()
    return results


def left_padded_batch(
    tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """`input_ids`, `attention_mask` and matching `position_ids` for left-padded texts (last token at -1)."""
    ids, mask = _left_pad(_encode(tokenizer, texts), tokenizer.pad_token_id, torch.device(device))
    return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


@functools.lru_cache(maxsize=None)
def _cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def cache_argument(model) -> str:
    """The KV-cache keyword of `model.forward`: transformers renamed `past_key_values` to `cache` in 5.x."""
    return _cache_argument(type(base_model(model)))


def output_cache(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


# ----- frozen weights cast once under autocast ---------------------------------------------------------------------
_casting = threading.local()  # set while a `frozen_weight_casts` block is open in this thread


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The lower precision that autocast runs linear layers in on `device_type`; None outside autocast."""
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    return dtype if dtype in (torch.bfloat16, torch.float16) else None


def _cast_of(module: torch.nn.Module, name: str, param: torch.Tensor, dtype: torch.dtype) -> torch.nn.Parameter:
    """`param` in `dtype`, made once and kept on `module` until the parameter is replaced or changed in place (its
    version counter moves with every optimiser step, `copy_` or load)."""
    casts = module.__dict__.setdefault("_metatuner_casts", {})
    key = (param.data_ptr(), param._version, dtype)
    entry = casts.get(name)
    if entry is None or entry[0]() is not param or entry[1] != key:
        cast = torch.nn.Parameter(param.detach().to(dtype), requires_grad=False)
        entry = casts[name] = (weakref.ref(param), key, cast)
    return entry[2]


@contextlib.contextmanager
def frozen_weight_casts(model) -> Iterator[None]:
    """Forwards of `model` inside this block use, under bf16 or fp16 autocast, a copy in that dtype of every frozen
    weight and bias of its linear layers, made once and kept (`_cast_of`).

    Autocast casts a weight that does not require grad again at every forward (it caches only the casts of weights
    that do): at batch 16 that was two fifths of a SmolLM2-135M decoding step. A linear layer given the cast copy
    computes exactly what it computes under autocast: the same cast values and the same kernel. Trainable weights
    are left to autocast. Outside autocast, nested in another such block, under a DDP / FSDP / DeepSpeed wrapper or
    with `CAST_FROZEN_WEIGHTS_ONCE` off it does nothing. Forwards only: a backward runs after the block (a
    checkpointed layer then recomputes with autocast's own casts, the same values).
    """
    first = next(model.parameters(), None)
    dtype = _autocast_dtype(first.device.type) if first is not None and CAST_FROZEN_WEIGHTS_ONCE else None
    if dtype is None or getattr(_casting, "active", False) or hasattr(model, "module"):
        yield
        return
    swapped: list[tuple[torch.nn.Module, str, torch.Tensor]] = []
    _casting.active = True
    try:
        for module in model.modules():
            if "FSDP" in type(module).__name__ or "FullyShardedDataParallel" in type(module).__name__:
                break  # sharded parameters are swapped in by FSDP itself; leave them to autocast
            if not isinstance(module, torch.nn.Linear):
                continue
            for name in ("weight", "bias"):
                param = module._parameters.get(name)
                if param is None or param.requires_grad or param.dtype == dtype or not param.is_floating_point():
                    continue
                module._parameters[name] = _cast_of(module, name, param, dtype)
                swapped.append((module, name, param))
        yield
    finally:
        for module, name, param in reversed(swapped):
            module._parameters[name] = param
        _casting.active = False


# ----- the KV cache ------------------------------------------------------------------------------------------------
def _filled_part(slot: str):
    """Getter and setter of a `KVBuffer` side: the filled part of its buffer; a tensor set becomes the buffer, full."""
    def get(self):
        buffer = getattr(self, slot)
        return None if buffer is None else buffer[..., : self._length, :]

    def put(self, tensor):
        setattr(self, slot, tensor)
        self._length = tensor.shape[-2] if tensor is not None and tensor.dim() == 4 else 0

    return get, put


class KVBuffer(DynamicLayer):
    """A `DynamicLayer` whose keys and values are views of a preallocated buffer.

    `update` writes the new tokens' states in place; `DynamicLayer` concatenates the whole cache at every step
    (14% of a decoding step at batch 16). When the buffer is full it grows to `reserve` tokens (at least a quarter
    of its length) past what it must hold. Whatever sets `keys` or `values` (the server's joins and trims,
    `crop`) hands over a tensor that becomes the buffer; selecting and repeating rows keep the spare room.
    """

    def __init__(self, reserve: int = 0):
        self._k = self._v = None
        self._length = 0
        self.reserve = reserve
        super().__init__()

    keys = property(*_filled_part("_k"))
    values = property(*_filled_part("_v"))

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self._k = self._v = None
        self._length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[-2]
        if self._k is None or end > self._k.shape[-2]:
            room = end + max(self.reserve, end // 4)
            k = key_states.new_empty((*key_states.shape[:2], room, key_states.shape[-1]))
            v = value_states.new_empty((*value_states.shape[:2], room, value_states.shape[-1]))
            if start:
                k[..., :start, :] = self._k[..., :start, :]
                v[..., :start, :] = self._v[..., :start, :]
            self._k, self._v = k, v
        self._k[..., start:end, :] = key_states
        self._v[..., start:end, :] = value_states
        self._length = end
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length if self._k is not None else 0

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `-tokens_to_remove` tokens (transformers' convention); their room stays for the next."""
        if tokens_to_remove > 0 or self._k is None:
            return super().crop(tokens_to_remove)
        self._length = max(0, self._length + tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self._k, self._v = self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self._k is not None:
            self._k, self._v = self._k[indices], self._v[indices]


def decode_cache(model, reserve: int) -> Cache | None:
    """An empty cache of `KVBuffer` layers for `model`, with room for `reserve` tokens past its prefill; None (the
    model makes its own `DynamicCache`) with `PREALLOCATE_KV` off or when a layer is anything but plain full
    attention (sliding windows, linear attention, shared KV)."""
    if not PREALLOCATE_KV:
        return None
    try:
        types, _ = get_layer_types_and_kwargs(base_model(model).config.get_text_config(decoder=True))
    except (AttributeError, KeyError, TypeError):
        return None
    if not types or any(t != "full_attention" for t in types):
        return None
    return Cache(layers=[KVBuffer(reserve) for _ in types])


def buffered(cache, reserve: int):
    """`cache` with each plain `DynamicLayer` replaced by a `KVBuffer` holding a detached copy of its states and
    room for `reserve` more tokens (one copy, instead of one per decoding step); any other cache as it is.

    For a prefill that could not write into a buffer itself: one run with gradients (G's prefill gives h, whose
    backward needs the keys and values as they were; decoding must not write into them)."""
    layers = getattr(cache, "layers", None)
    if not PREALLOCATE_KV or not layers or not all(type(layer) is DynamicLayer for layer in layers):
        return cache
    for i, layer in enumerate(layers):
        buffer = KVBuffer(reserve)
        if layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
            buffer.lazy_initialization(layer.keys, layer.values)
            buffer.update(layer.keys.detach(), layer.values.detach())
        layers[i] = buffer
    return cache


def _with_cache(model, cache: Cache | None) -> dict:
    return {cache_argument(model): cache} if cache is not None else {}


def _next_tokens(logits: torch.Tensor, temperature: float, top_p: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    # max(-1).indices is argmax (the first of equal maxima, as argmax), four times faster on bf16 logits.
    if temperature <= 0:
        return logits.max(-1).indices
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always survives).
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    # torch.multinomial(probs, 1) draws exactly this way (argmax of p / q, q ~ Exp(1) from the same generator), so
    # the draws are the same for the same seed; its argmax over the vocabulary is the slow part.
    q = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / q).max(-1).indices


def _pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim % t.dim()) + [missing, 0]
    return F.pad(t, pad)


@dataclass
class DecodeBatch:
    """Rows decoded together after a prefill: their KV cache, attention mask, last positions and next-token logits.

    Between two steps rows can leave (`select`) and, where every cache layer is a plain `DynamicLayer`, the rows
    of another prefill can join (`extend`): the shorter cache is left-padded and masked, positions stay per row.
    That is how a server adds requests to a batch that is already decoding. At rest the mask is as wide as the
    cache is long.
    """

    cache: Any
    logits: torch.Tensor  # (rows, vocab): each row's next-token scores
    mask: torch.Tensor  # (rows, cache length)
    pos: torch.Tensor  # (rows, 1): each row's last position

    @classmethod
    @torch.no_grad()
    def prefill(cls, model, rows: Sequence[Sequence[int]], pad_id: int, context: ContextManager | None = None,
                reserve: int = 0):
        """Left-padded prompt token ids through `model` (inside `context`, e.g. the rows' per-example LoRA), into a
        KV cache with room for `reserve` more tokens (it grows past them when it must)."""
        ids, mask = _left_pad([list(r) for r in rows], pad_id, model.device)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with context or contextlib.nullcontext(), frozen_weight_casts(model):
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **last_logits_only(model),
                        **_with_cache(model, decode_cache(model, reserve)))
        return cls(output_cache(out), out.logits[:, -1], mask, pos[:, -1:])

    def __len__(self) -> int:
        return self.logits.shape[0]

    @torch.no_grad()
    def target_logprobs(self, model, targets: Sequence[Sequence[int]], pad_id: int,
                        context: ContextManager | None = None) -> torch.Tensor:
        """Sum of log-probabilities of each row's target tokens after its prompt (teacher-forced, one forward
        through the cache, which then holds the targets too: `cache.crop(-width)` forgets them)."""
        ids, keep = _right_pad([list(t) for t in targets], pad_id, self.logits.device)
        pos = self.pos + 1 + torch.arange(ids.shape[1], device=ids.device)
        with context or contextlib.nullcontext(), frozen_weight_casts(model):
            out = model(input_ids=ids, attention_mask=torch.cat([self.mask, keep], 1), position_ids=pos,
                        use_cache=True, **{cache_argument(model): self.cache})
        # The prefill's last logits predict each target's first token; the targets' own logits the rest.
        logits = torch.cat([self.logits[:, None], out.logits[:, :-1]], 1).float()
        token_logprobs = -F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view_as(ids)
        return (token_logprobs * keep).sum(-1)

    def repeat(self, n: int) -> None:
        """Each row n times in a row (n samples from one prefill)."""
        self.cache.batch_repeat_interleave(n)
        self.logits, self.mask, self.pos = (t.repeat_interleave(n, 0) for t in (self.logits, self.mask, self.pos))

    def select(self, keep: Sequence[int]) -> None:
        """Keep only the rows at `keep`, in that order."""
        index = torch.tensor(list(keep), device=self.logits.device, dtype=torch.long)
        self.cache.batch_select_indices(index)
        self.mask, self.pos, self.logits = self.mask[index], self.pos[index], self.logits[index]

    @torch.no_grad()
    def advance(self, model, tokens: torch.Tensor, context: ContextManager | None = None) -> None:
        """One step: every row takes its token in `tokens` and gets its next logits."""
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.pos = self.pos + 1
        with context or contextlib.nullcontext(), frozen_weight_casts(model):
            out = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.pos, use_cache=True,
                        **{cache_argument(model): self.cache})
        self.cache, self.logits = output_cache(out), out.logits[:, -1]

    def can_join(self) -> bool:
        """Whether other rows can join this batch (sliding-window, static or quantized caches cannot be padded)."""
        return all(type(layer) in (DynamicLayer, KVBuffer) for layer in getattr(self.cache, "layers", [None]))

    def extend(self, other: "DecodeBatch") -> None:
        """Append the rows of `other` (a fresh prefill) after this batch's rows."""
        width = max(self.mask.shape[1], other.mask.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_pad_left(mine.keys, width, -2), _pad_left(theirs.keys, width, -2)])
            mine.values = torch.cat([_pad_left(mine.values, width, -2), _pad_left(theirs.values, width, -2)])
        self.mask = torch.cat([_pad_left(self.mask, width, 1), _pad_left(other.mask, width, 1)])
        self.pos = torch.cat([self.pos, other.pos])
        self.logits = torch.cat([self.logits, other.logits])

    def trim(self) -> None:
        """Drop leading columns that no row attends to: the padding of rows that have left."""
        start = int(self.mask.any(0).to(torch.int8).argmax())
        if start == 0:
            return
        for layer in self.cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        self.mask = self.mask[:, start:]


@torch.no_grad()
def decode_loop(
    model: PreTrainedModel,
    cache,
    next_logits: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    temperature: float = 0.0,
    top_p: float = 1.0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    stop_strings: Sequence[str] = (),
    row_context: BatchContext | None = None,
    banned_tokens: torch.Tensor | None = None,
) -> list[list[int]]:
    """Decode from an existing prefill (its KV cache and last logits), greedy or sampled.

    Used after a plain prefill (evaluation), after the meta encoder's prefill (the written prompt reuses the states
    that gave h), and after a prefill repeated n times (n candidate prompts share one prefix). Finished rows are
    dropped from the batch; `row_context(live_rows)` wraps each forward (per-example LoRA of the live rows).
    `banned_tokens` (token ids) are never chosen. Returns each row's new tokens without the end-of-sequence token.
    """
    eos = torch.tensor(list(eos_ids), device=next_logits.device, dtype=torch.long)
    out_rows: list[list[int]] = [[] for _ in range(next_logits.shape[0])]
    live = list(range(len(out_rows)))
    batch = DecodeBatch(buffered(cache, max_new_tokens), next_logits, attention_mask, position_ids[:, -1:])
    tail = 24  # tokens re-decoded to look for stop strings; longer than any stop string in practice
    with frozen_weight_casts(model):  # once for the whole loop (each step's own block is then a no-op)
        for step in range(max_new_tokens):
            logits = batch.logits
            if banned_tokens is not None:
                logits = logits.index_fill(1, banned_tokens, float("-inf"))
            nxt = _next_tokens(logits, temperature, top_p)
            finished = torch.isin(nxt, eos).tolist()
            for k, (row, token, end) in enumerate(zip(live, nxt.tolist(), finished)):
                if not end:
                    out_rows[row].append(token)
            if stop_strings and tokenizer is not None:
                finished = [end or any(s in tokenizer.decode(out_rows[row][-tail:]) for s in stop_strings)
                            for row, end in zip(live, finished)]
            if step == max_new_tokens - 1 or all(finished):
                break
            if any(finished):
                keep = [k for k, end in enumerate(finished) if not end]
                batch.select(keep)
                nxt = nxt[torch.tensor(keep, device=nxt.device)]
                live = [live[k] for k in keep]
            batch.advance(model, nxt, row_context(live) if row_context else None)
    return out_rows

import contextlib

import pytest
import torch

from metatuner.generation import chat_prompt, generate, length_batches, lm_batch, score_targets, target_logprobs

PROMPTS = ["Solve 3 + 5.", "What is the answer to this very much longer question about apples?", "Hi", "4 - 1 - 7 ="]


def _chats(tokenizer):
    return [chat_prompt(tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]


def test_length_batches_cover_every_index_once_longest_first():
    batches = length_batches([3, 9, 1, 5, 7], batch_size=2)
    assert sorted(i for b in batches for i in b) == [0, 1, 2, 3, 4]
    assert batches[0] == [1, 4]


def test_batched_generation_equals_one_by_one(model, tokenizer):
    chats = _chats(tokenizer)
    batched = generate(model, tokenizer, chats, max_new_tokens=12, batch_size=4)
    for i, chat in enumerate(chats):
        alone = generate(model, tokenizer, [chat], max_new_tokens=12, batch_size=1)
        assert alone.texts[0] == batched.texts[i]
        assert alone.new_tokens[0] == batched.new_tokens[i]


def test_generation_cuts_at_stop_string(model, tokenizer):
    chats = _chats(tokenizer)
    full = generate(model, tokenizer, chats, max_new_tokens=16)
    text = next(t for t in full.texts if len(t) > 6)
    stop = text[3:6]
    cut = generate(model, tokenizer, chats, max_new_tokens=16, stop_strings=[stop])
    assert all(stop not in t for t in cut.texts)


def test_score_targets_matches_manual_computation(model, tokenizer):
    chats = _chats(tokenizer)
    targets = ["The answer is 8.", "apples", "Hello there", "-4"]
    scores = score_targets(model, tokenizer, chats, targets, batch_size=3)
    for chat, target, (logprob, count) in zip(chats, targets, scores):
        p = tokenizer(chat, add_special_tokens=False)["input_ids"]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([p + t])).logits[0]
        manual = sum(torch.log_softmax(logits[len(p) - 1 + k], -1)[tok].item() for k, tok in enumerate(t))
        assert count == len(t)
        assert abs(manual - logprob) < 1e-4


def test_lm_batch_masks_prompt_and_padding_and_keeps_prompt_when_truncating(tokenizer):
    batch = lm_batch(tokenizer, ["abc abc abc", "a"], ["xyz", "q"], max_length=64)
    labels, mask = batch["labels"], batch["attention_mask"]
    assert (labels[mask == 0] == -100).all()
    n_prompt = len(tokenizer("abc abc abc", add_special_tokens=False)["input_ids"])
    assert (labels[0, :n_prompt] == -100).all() and (labels[0, n_prompt:][mask[0, n_prompt:] == 1] != -100).all()
    short = lm_batch(tokenizer, ["abc abc abc"], ["xyz " * 20], max_length=n_prompt + 2)
    assert short["input_ids"].shape[1] == n_prompt + 2 and (short["labels"] != -100).sum() == 2


def test_target_logprobs_is_differentiable(model, tokenizer):
    batch = lm_batch(tokenizer, _chats(tokenizer)[:2], ["a b", "c"])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits.requires_grad_()
    sums, counts = target_logprobs(logits, batch["labels"])
    (-sums.sum()).backward()
    assert logits.grad is not None and counts.tolist() == [int(x) for x in (batch["labels"][:, 1:] != -100).sum(-1)]


def test_lm_loss_equals_the_models_own_loss_with_and_without_peft(model, tokenizer):
    from peft import LoraConfig, get_peft_model

    from metatuner.generation import lm_loss, sequence_logprobs

    batch = lm_batch(tokenizer, _chats(tokenizer), ["The answer is 8.", "apples", "Hello", "-4"])
    assert torch.allclose(lm_loss(model, batch), model(**batch).loss, atol=1e-5)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert torch.allclose(lm_loss(peft_model, batch), peft_model(**batch).loss, atol=1e-5)
    sums, counts = sequence_logprobs(peft_model, batch)
    ref_sums, ref_counts = target_logprobs(peft_model(**batch).logits, batch["labels"])
    assert torch.allclose(sums, ref_sums, atol=1e-4) and torch.equal(counts, ref_counts)


def _lora_context(model, n_rows, seed=0):
    """A per-row LoRA on q_proj/v_proj with non-zero B, and the actor that applies it."""
    from metatuner.hyperlora import LoraFactors, PerExampleLoRA

    actor = PerExampleLoRA(model, ["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(seed)
    factors = LoraFactors({t.key: (0.3 * torch.randn(n_rows, 4, t.d_in, generator=gen),
                                   0.3 * torch.randn(n_rows, t.d_out, 4, generator=gen)) for t in actor.targets})
    return actor, factors


def test_score_choices_equals_scoring_every_option_on_its_own(model, tokenizer):
    from metatuner.generation import score_choices

    chats = _chats(tokenizer)
    options = [["The answer is A.", "The answer is B. ok"], ["B"], ["x", "The answer is 42", "apples"], ["-4", "4"]]
    shared = score_choices(model, tokenizer, chats, options, batch_size=3)
    flat = score_targets(model, tokenizer, [c for c, o in zip(chats, options) for _ in o], [t for o in options for t in o])
    assert [len(s) for s in shared] == [len(o) for o in options]
    for (a, n), (b, m) in zip([s for row in shared for s in row], flat):
        assert n == m and abs(a - b) < 1e-4


def test_score_choices_gives_each_option_its_prompts_lora(model, tokenizer):
    from metatuner.generation import score_choices

    chats = _chats(tokenizer)
    options = [["The answer is A.", "B"], ["apples"], ["x", "42"], ["-4"]]
    owners = [i for i, o in enumerate(options) for _ in o]
    actor, factors = _lora_context(model, len(chats))
    shared = score_choices(model, tokenizer, chats, options, batch_size=2,
                           batch_context=lambda rows: actor.apply(factors.index_select(rows)))
    flat = score_targets(model, tokenizer, [chats[i] for i in owners], [t for o in options for t in o], batch_size=3,
                         batch_context=lambda rows: actor.apply(factors.index_select([owners[r] for r in rows])))
    plain = score_choices(model, tokenizer, chats, options)
    for (a, _), (b, _), (c, _) in zip([s for row in shared for s in row], flat, [s for row in plain for s in row]):
        assert abs(a - b) < 1e-4
        assert abs(a - c) > 1e-6  # the LoRA did change the scores


def test_encode_gives_the_prefills_layer_k_state_without_the_upper_layers(model, tokenizer):
    from metatuner.config import MetaTunerSettings
    from metatuner.model import MetaTuner

    for pool in ("last", "mean"):
        mt = MetaTuner(model, tokenizer, MetaTunerSettings(share_depth=0.5, pool=pool))
        requests = mt.rewrite_requests(["Solve it.", "Answer briefly."], ["What is 3 + 5?", "Why is the sky blue?"])
        with mt.role("writer"):
            full, _ = mt._prefill(requests)
            early = mt.encode(requests)
            again, _ = mt._prefill(requests)  # an early stop leaves no hook or state behind
        assert torch.equal(full, early) and torch.equal(full, again)
        early.sum().backward()  # h keeps its gradient to the shared adapter
        assert any(p.grad is not None for p in mt.generator_parameters())
        mt.lora.remove()
        model = mt.g.unload()


def _greedy_without_cache(model, ids: list[int], max_new_tokens: int, eos: set[int]) -> list[int]:
    """Reference decoding: the whole sequence through the model at every step, no KV cache, no padding."""
    out = []
    for _ in range(max_new_tokens):
        with torch.no_grad():
            token = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
        if token in eos:
            break
        out.append(token)
    return out


def test_decode_loop_matches_uncached_greedy_decoding_when_rows_finish_early(model, tokenizer):
    """decode_loop on a left-padded prefill: every row's tokens equal a cache-free greedy decode of that row alone.
    One row's first token is made its end-of-sequence token, so it leaves the batch at the first step; a bug in
    dropping finished rows (cache, mask or positions of the remaining rows misaligned) changes the other rows."""
    from metatuner.generation import DecodeBatch, _encode, decode_loop

    encoded = _encode(tokenizer, _chats(tokenizer))
    first = [_greedy_without_cache(model, ids, 1, set())[0] for ids in encoded]
    eos = {first[2]}  # row 2 ends at once; rows whose first token differs go on
    assert any(f not in eos for f in first)
    prefilled = DecodeBatch.prefill(model, encoded, tokenizer.pad_token_id, None)
    with torch.no_grad():
        rows = decode_loop(model, prefilled.cache, prefilled.logits, prefilled.mask, prefilled.pos,
                           max_new_tokens=8, eos_ids=sorted(eos))
    assert rows[2] == []  # the end-of-sequence token itself is not returned
    for ids, row in zip(encoded, rows):
        assert row == _greedy_without_cache(model, ids, 8, eos)


def test_decode_loop_never_chooses_a_banned_token_and_digit_tokens_are_those_that_write_a_digit(model, tokenizer):
    """`prompt_without_digits` bans, in G's decoding, every token whose text holds a digit. Fails if a banned token
    can still be chosen (greedy or sampled), or if the ban misses a digit token or catches one without a digit."""
    from metatuner.generation import DecodeBatch, _encode, decode_loop, digit_tokens

    banned = digit_tokens(tokenizer)
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    assert set(banned.tolist()) == {i for i, t in enumerate(texts) if any(c.isdigit() for c in t)}
    assert set(tokenizer.encode("2024", add_special_tokens=False)) <= set(banned.tolist())
    assert not set(tokenizer.encode(" hello world", add_special_tokens=False)) & set(banned.tolist())

    encoded = _encode(tokenizer, _chats(tokenizer))
    greedy = [_greedy_without_cache(model, ids, 6, set()) for ids in encoded]
    ban = torch.tensor(sorted({t for row in greedy for t in row}))  # every token the free decode chose
    for temperature in (0.0, 1.0):
        prefilled = DecodeBatch.prefill(model, encoded, tokenizer.pad_token_id, None)
        with torch.no_grad():
            rows = decode_loop(model, prefilled.cache, prefilled.logits, prefilled.mask, prefilled.pos,
                               max_new_tokens=6, eos_ids=[], temperature=temperature, banned_tokens=ban)
        assert all(len(row) == 6 and not set(row) & set(ban.tolist()) for row in rows)


def test_eos_ids_add_the_generation_configs_ends_only_when_the_model_is_given(model, tokenizer):
    from metatuner.generation import eos_ids

    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert eos_ids(tokenizer) == [tokenizer.eos_token_id]  # G's prompts end at the end-of-turn token alone
    assert eos_ids(tokenizer, model) == [tokenizer.eos_token_id, tokenizer.pad_token_id]


# ----- decoding optimisations: the same tokens as the former decoding ------------------------------------------------
def _former_next_tokens(logits, temperature, top_p, generator=None):
    """The sampler before `_next_tokens` drew through exponential_ itself: argmax and torch.multinomial."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        drop = sorted_probs.cumsum(-1) - sorted_probs > top_p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def former_decoding(monkeypatch):
    """Decode as before the preallocated KV cache, the kept weight casts and the sampler's own draw."""
    import metatuner.generation as generation

    monkeypatch.setattr(generation, "PREALLOCATE_KV", False)
    monkeypatch.setattr(generation, "CAST_FROZEN_WEIGHTS_ONCE", False)
    monkeypatch.setattr(generation, "_next_tokens", _former_next_tokens)


def _bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


def test_sampler_draws_what_torch_multinomial_draws():
    from metatuner.generation import _next_tokens

    for seed in range(20):
        logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(seed)) * 3
        for temperature, top_p in ((0.8, 1.0), (1.2, 0.9), (0.0, 1.0)):
            ours = _next_tokens(logits, temperature, top_p, torch.Generator().manual_seed(seed))
            theirs = _former_next_tokens(logits, temperature, top_p, torch.Generator().manual_seed(seed))
            assert torch.equal(ours, theirs)
    ties = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], dtype=torch.bfloat16)
    assert _next_tokens(ties, 0.0, 1.0).tolist() == ties.argmax(-1).tolist() == [1, 0]


def _decode_steps(model, tokenizer, steps=6, reserve=8):
    """Logits of a left-padded prefill and `steps` greedy steps, with the row at index 1 leaving after 2 steps."""
    from metatuner.generation import DecodeBatch, _encode

    batch = DecodeBatch.prefill(model, _encode(tokenizer, _chats(tokenizer)), tokenizer.pad_token_id, reserve=reserve)
    logits = [batch.logits.float().clone()]
    for step in range(steps):
        if step == 2:
            batch.select([0, 2, 3])
        batch.advance(model, batch.logits.argmax(-1))
        logits.append(batch.logits.float().clone())
    return logits, batch


@pytest.mark.parametrize("reserve", [0, 3, 16])  # 0 and 3: the buffer grows while decoding
def test_kv_buffer_and_kept_casts_give_the_former_logits_bit_for_bit(model, tokenizer, monkeypatch, reserve):
    from metatuner.generation import KVBuffer

    with torch.no_grad(), _bf16():
        ours, batch = _decode_steps(model, tokenizer, reserve=reserve)
    assert all(type(layer) is KVBuffer for layer in batch.cache.layers)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the casts are swapped in for forwards only
    former_decoding(monkeypatch)
    with torch.no_grad(), _bf16():
        theirs, former = _decode_steps(model, tokenizer, reserve=reserve)
    assert not any(type(layer) is KVBuffer for layer in former.cache.layers)
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert torch.equal(batch.cache.layers[0].keys, former.cache.layers[0].keys)


def _greedy_and_sampled(model, tokenizer, bf16: bool):
    chats = _chats(tokenizer) * 2
    with _bf16() if bf16 else contextlib.nullcontext():
        greedy = generate(model, tokenizer, chats, max_new_tokens=10, batch_size=3)
        torch.manual_seed(3)
        sampled = generate(model, tokenizer, chats, max_new_tokens=10, batch_size=8, do_sample=True, temperature=0.9)
    return [(out.texts, out.new_tokens) for out in (greedy, sampled)]


@pytest.mark.parametrize("bf16", [False, True])
def test_generate_gives_the_former_outputs(model, tokenizer, monkeypatch, bf16):
    ours = _greedy_and_sampled(model, tokenizer, bf16)
    former_decoding(monkeypatch)
    assert ours == _greedy_and_sampled(model, tokenizer, bf16)


def test_kept_casts_follow_weight_changes_and_leave_trainable_weights_to_autocast(model, tokenizer):
    from metatuner.generation import frozen_weight_casts

    batch = lm_batch(tokenizer, _chats(tokenizer), ["a", "b", "c", "d"])
    q = model.model.layers[0].self_attn.q_proj
    q.weight.requires_grad_(False)
    model.model.layers[0].self_attn.o_proj.weight.requires_grad_(True)
    with torch.no_grad(), _bf16():
        with frozen_weight_casts(model):
            assert q.weight.dtype == torch.bfloat16
            assert model.model.layers[0].self_attn.o_proj.weight.dtype == torch.float32  # trainable: autocast's
            assert model.model.embed_tokens.weight.dtype == torch.float32  # not a linear layer
            first = model(**batch).logits
        q.weight.mul_(2.0)  # an in-place change (an optimiser step, a load) makes a new cast
        with frozen_weight_casts(model):
            changed = model(**batch).logits
        with torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False):
            reference = model(**batch).logits
    assert not torch.equal(first, changed) and torch.equal(changed, reference)


@pytest.mark.parametrize("with_lora", [False, True])
def test_score_and_generate_equals_score_targets_and_generate(model, tokenizer, with_lora):
    """One prefill serves both: the answers are generate's, token for token, and the scores score_targets' (a
    cache not cut back after the targets would change the answers; a target shifted by one position, the scores)."""
    from metatuner.generation import score_and_generate

    chats = _chats(tokenizer) * 2
    targets = ["The answer is 8.", "apples", "Hello there", "-4", "", "a much longer target than the others", "x", "9"]
    context = None
    if with_lora:
        actor, factors = _lora_context(model, len(chats))
        context = lambda rows: actor.apply(factors.index_select(rows))  # noqa: E731
    scores, answers = score_and_generate(model, tokenizer, chats, targets, max_new_tokens=10, batch_size=3,
                                         batch_context=context)
    apart = score_targets(model, tokenizer, chats, targets, batch_size=3, batch_context=context)
    generated = generate(model, tokenizer, chats, max_new_tokens=10, batch_size=3, batch_context=context)
    assert answers.texts == generated.texts and answers.new_tokens == generated.new_tokens
    assert [c for _, c in scores] == [c for _, c in apart] and scores[4] == (0.0, 0)
    for (a, _), (b, _) in zip(scores, apart):
        assert abs(a - b) < 1e-4


def test_score_and_generate_keeps_score_targets_truncation(model, tokenizer):
    from metatuner.generation import score_and_generate

    chats = _chats(tokenizer)
    targets = ["one two three four five six"] * len(chats)
    limit = max(len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chats) + 2
    scores, _ = score_and_generate(model, tokenizer, chats, targets, max_new_tokens=4, max_length=limit)
    apart = score_targets(model, tokenizer, chats, targets, max_length=limit)
    assert [c for _, c in scores] == [c for _, c in apart]
    for (a, _), (b, _) in zip(scores, apart):
        assert abs(a - b) < 1e-4

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
            full, _, _ = mt._prefill(requests)
            early = mt.encode(requests)
            again, _, _ = mt._prefill(requests)  # an early stop leaves no hook or state behind
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


def test_eos_ids_add_the_generation_configs_ends_only_when_the_model_is_given(model, tokenizer):
    from metatuner.generation import eos_ids

    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert eos_ids(tokenizer) == [tokenizer.eos_token_id]  # G's prompts end at the end-of-turn token alone
    assert eos_ids(tokenizer, model) == [tokenizer.eos_token_id, tokenizer.pad_token_id]

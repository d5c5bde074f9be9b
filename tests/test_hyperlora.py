import copy
import json
import re

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from metatuner.hyperlora import (
    HyperLoraConfig,
    HyperLoraGenerator,
    LoraFactors,
    PerExampleLoRA,
    export_peft_adapter,
)

# q_proj and v_proj differ in d_out (GQA); down_proj differs in d_in: every head shape is exercised.
TARGETS = ["q_proj", "v_proj", "down_proj"]
SCALE, RANK = 0.5, 4
TEXTS = ["Solve 3 + 5.", "What is the answer to this longer question about apples?", "Hi there"]


def _random_factors(actor, batch, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return LoraFactors(
        {
            t.key: (
                torch.randn(batch, RANK, t.d_in, generator=gen) * 0.3,
                torch.randn(batch, t.d_out, RANK, generator=gen) * 0.3,
            )
            for t in actor.targets
        }
    )


def _peft_reference(model):
    """An independent PEFT LoRA model on a copy of M, with the same rank, targets and scaling."""
    config = LoraConfig(r=RANK, lora_alpha=SCALE * RANK, target_modules=TARGETS, lora_dropout=0.0)
    return get_peft_model(copy.deepcopy(model), config).eval()


def _load_example(peft_model, factors, i):
    for name, module in peft_model.named_modules():
        if hasattr(module, "lora_A") and not name.endswith(("lora_A", "lora_B")):
            layer = int(re.search(r"layers\.(\d+)\.", name).group(1))
            a, b = factors[(layer, name.rsplit(".", 1)[-1])]
            with torch.no_grad():
                module.lora_A["default"].weight.copy_(a[i])
                module.lora_B["default"].weight.copy_(b[i])


def _batch(tokenizer, side):
    tokenizer.padding_side = side
    return tokenizer(TEXTS, return_tensors="pt", padding=True)


def _make_actor(model):
    return PerExampleLoRA(model, TARGETS, scale=SCALE)


def _generator(actor, input_dim=48, perturb=True):
    config = HyperLoraConfig(target_modules=TARGETS, r=RANK, scale=SCALE, hidden_size=32, query_embed_dim=16)
    torch.manual_seed(1)
    generator = HyperLoraGenerator(config, input_dim, actor.targets)
    if perturb:  # a fresh generator gives B = 0; move up_B off zero as a few training steps would
        for head in generator.up_B.values():
            torch.nn.init.normal_(head.weight, std=0.1)
    return generator, config


def test_targets_are_found_in_fixed_order(model):
    actor = _make_actor(model)
    assert [t.key for t in actor.targets[:3]] == [(0, "q_proj"), (0, "v_proj"), (0, "down_proj")]
    assert len(actor.targets) == 4 * len(TARGETS)
    q, v, down = actor.targets[:3]
    assert (q.d_in, q.d_out, v.d_out, down.d_in) == (64, 64, 32, 128)


def test_training_forward_equals_peft_one_example_at_a_time(model, tokenizer):
    batch = _batch(tokenizer, "right")
    reference = _peft_reference(model)
    actor = _make_actor(model)
    factors = _random_factors(actor, len(TEXTS))
    model.train()
    with actor.apply(factors):
        logits = model(**batch).logits
    base = model(**batch).logits
    assert (logits - base).abs().max() > 1e-2  # the LoRA matters, so the comparison below has teeth

    for i in range(len(TEXTS)):
        n = int(batch.attention_mask[i].sum())
        _load_example(reference, factors, i)
        with torch.no_grad():
            alone = reference(input_ids=batch.input_ids[i : i + 1, :n]).logits[0]
        torch.testing.assert_close(logits[i, :n], alone, atol=1e-5, rtol=1e-5)


def test_kv_cached_generation_equals_peft_one_example_at_a_time(model, tokenizer):
    batch = _batch(tokenizer, "left")
    reference = _peft_reference(model)
    actor = _make_actor(model)
    factors = _random_factors(actor, len(TEXTS), seed=3)
    kwargs = dict(do_sample=False, max_new_tokens=8, min_new_tokens=8, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad(), actor.apply(factors):
        out = model.generate(**batch, **kwargs)
    base = model.generate(**batch, **kwargs)
    assert not torch.equal(out.sequences, base.sequences)

    width = batch.input_ids.shape[1]
    for i in range(len(TEXTS)):
        ids = batch.input_ids[i, batch.attention_mask[i].bool()][None]
        _load_example(reference, factors, i)
        with torch.no_grad():
            alone = reference.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
        assert out.sequences[i, width:].tolist() == alone.sequences[0, ids.shape[1] :].tolist()
        for step_batched, step_alone in zip(out.logits, alone.logits):
            torch.testing.assert_close(step_batched[i], step_alone[0], atol=1e-5, rtol=1e-5)


def test_fresh_generator_leaves_the_model_unchanged(model, tokenizer):
    batch = _batch(tokenizer, "left")
    base = model(**batch).logits
    actor = _make_actor(model)
    generator, _ = _generator(actor, perturb=False)
    with actor.apply(generator(torch.randn(len(TEXTS), 48))):
        logits = model(**batch).logits
    torch.testing.assert_close(logits, base, atol=1e-6, rtol=0)


def test_gradients_reach_the_generator_not_the_base_model(model, tokenizer):
    batch = _batch(tokenizer, "right")
    model.requires_grad_(False)
    actor = _make_actor(model)
    generator, _ = _generator(actor, perturb=False)
    h = torch.randn(len(TEXTS), 48, requires_grad=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)

    def step():
        generator.zero_grad()
        h.grad = None
        with actor.apply(generator(h)):
            loss = model(**batch, labels=labels).loss
        loss.backward()

    # At step 0 B = 0, so, as with LoRA, only B's head gets a gradient.
    step()
    assert generator.up_B["q_proj"].weight.grad.abs().sum() > 0
    torch.optim.SGD(generator.parameters(), lr=1.0).step()
    step()
    for name, param in generator.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert h.grad.abs().sum() > 0  # the task loss reaches the meta encoder through h
    assert all(p.grad is None for p in model.parameters())


def test_autocast_bf16_forward_and_backward(model, tokenizer):
    batch = _batch(tokenizer, "right")
    actor = _make_actor(model)
    factors = _random_factors(actor, len(TEXTS))
    a, _ = factors[(0, "q_proj")]
    a.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16), actor.apply(factors):
        logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    logits.float().mean().backward()
    assert a.grad is not None and a.grad.dtype == torch.float32


def test_repeat_interleave_matches_num_return_sequences(model, tokenizer):
    batch = _batch(tokenizer, "left")
    actor = _make_actor(model)
    factors = _random_factors(actor, len(TEXTS))
    expanded = factors.repeat_interleave(2)
    a, _ = factors[(1, "v_proj")]
    assert torch.equal(expanded[(1, "v_proj")][0][4], a[2]) and torch.equal(expanded[(1, "v_proj")][0][5], a[2])
    assert torch.equal(expanded.index_select([4])[(1, "v_proj")][0][0], a[2])

    kwargs = dict(do_sample=True, max_new_tokens=6, min_new_tokens=6)
    with torch.no_grad(), actor.apply(expanded):
        torch.manual_seed(0)
        via_generate = model.generate(**batch, num_return_sequences=2, **kwargs)
        torch.manual_seed(0)
        manual = model.generate(
            input_ids=batch.input_ids.repeat_interleave(2, 0),
            attention_mask=batch.attention_mask.repeat_interleave(2, 0),
            **kwargs,
        )
    assert torch.equal(via_generate, manual)

    with actor.apply(factors), pytest.raises(ValueError, match="repeat_interleave"):
        model.generate(**batch, num_return_sequences=2, **kwargs)


def test_exported_adapter_reproduces_the_hypernetwork_path(model, tokenizer, tmp_path):
    batch = _batch(tokenizer, "left")
    actor = _make_actor(model)
    generator, config = _generator(actor)
    factors = generator(torch.randn(len(TEXTS), 48))
    with torch.no_grad(), actor.apply(factors):
        logits = model(**batch).logits

    model.save_pretrained(tmp_path / "base")
    out = export_peft_adapter(factors.index_select([1]), tmp_path / "base", tmp_path / "adapter", config)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == RANK and saved["lora_alpha"] == SCALE * RANK
    assert saved["base_model_name_or_path"] == str(tmp_path / "base")

    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), out).eval()
    n = int(batch.attention_mask[1].sum())
    with torch.no_grad():
        alone = loaded(input_ids=batch.input_ids[1:2, -n:]).logits[0]
    torch.testing.assert_close(alone, logits[1, -n:], atol=1e-5, rtol=1e-5)

    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "model.safetensors").write_text("")
    with pytest.raises(ValueError, match="non-adapter"):
        export_peft_adapter(factors.index_select([1]), tmp_path / "base", tmp_path / "busy", config)
    with pytest.raises(ValueError, match="one query"):
        export_peft_adapter(factors, tmp_path / "base", tmp_path / "adapter", config)


def test_missing_target_names_it_and_lists_available(model):
    with pytest.raises(ValueError, match=r"no_such_proj.*k_proj"):
        PerExampleLoRA(model, ["q_proj", "no_such_proj"])


def test_batch_mismatch_is_a_clear_error(model, tokenizer):
    batch = _batch(tokenizer, "left")
    actor = _make_actor(model)
    with actor.apply(_random_factors(actor, 2)), pytest.raises(ValueError, match="batch size 2 .* batch of 3"):
        model(**batch)


def test_factors_must_cover_the_targets(model):
    actor = _make_actor(model)
    factors = dict(_random_factors(actor, 1).items())
    del factors[(0, "q_proj")]
    with pytest.raises(ValueError, match="missing"):
        with actor.apply(factors):
            pass


def test_outside_the_context_the_model_is_the_base(model, tokenizer):
    batch = _batch(tokenizer, "left")
    before = model(**batch).logits
    actor = _make_actor(model)
    assert torch.equal(model(**batch).logits, before)
    with actor.apply(_random_factors(actor, len(TEXTS))):
        assert not torch.equal(model(**batch).logits, before)
    assert torch.equal(model(**batch).logits, before)
    with pytest.raises(ValueError, match="already carries"):
        PerExampleLoRA(model, TARGETS)
    actor.remove()
    PerExampleLoRA(model, TARGETS).remove()


def test_running_standardize_matches_the_statistics_of_everything_seen_in_training():
    """Fails if the running update drops a batch's share or the shift between batch means (Chan's term)."""
    from metatuner.hyperlora import RunningStandardize

    torch.manual_seed(0)
    norm = RunningStandardize(3)
    batches = [torch.randn(n, 3) * 4 + 7 for n in (8, 5, 1, 8)]
    for batch in batches:
        norm(batch)
    seen = torch.cat(batches)
    assert torch.allclose(norm.mean, seen.mean(0), atol=1e-5)
    assert torch.allclose(norm.var, seen.var(0, unbiased=False), atol=1e-4)
    norm.eval()
    out = norm(batches[0])  # eval mode: normalised with the running statistics, which stay put
    assert torch.allclose(out, (batches[0] - seen.mean(0)) / (seen.var(0, unbiased=False) + 1e-5).sqrt(), atol=1e-4)
    assert int(norm.count) == seen.shape[0]
    # Saved with the hypernetwork's state and restored by load_state_dict.
    other = RunningStandardize(3)
    other.load_state_dict(norm.state_dict())
    assert torch.equal(other.mean, norm.mean) and int(other.count) == 22

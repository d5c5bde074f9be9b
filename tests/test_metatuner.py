import contextlib

import pytest
import torch

from metatuner.config import MetaTunerSettings
from metatuner.generation import chat_prompt
from metatuner.model import MetaTuner
from metatuner.models import resolve_share_depth
from metatuner.testing import tiny_model

QUESTIONS = ["Janet has 3 apples and buys 5 more. How many?", "4 - 1 - 7 =", "What is 2 + 2?"]


@pytest.fixture()
def mt(tokenizer):
    torch.manual_seed(0)
    settings = MetaTunerSettings(share_depth=0.5, rank=4, hyper_hidden=32, g_lora_r=4, max_prompt_tokens=6)
    return MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer, settings)


def _grads(params):
    return [p.grad is not None and bool(p.grad.abs().sum() > 0) for p in params]


def _perturb(mt):
    # LoRA's B starts at zero, so no gradient reaches the A side yet; nonzero weights make routing visible.
    with torch.no_grad():
        for p in mt.generator_parameters() + list(mt.hyper.parameters()):
            p.add_(torch.randn_like(p) * 0.05)
    mt.sync_frozen()


def _actor_chats(mt, prompts):
    return [chat_prompt(mt.m_tok, [{"role": "user", "content": f"{p}\n\n{q}"}]) for p, q in zip(prompts, QUESTIONS)]


def test_share_depth_resolves_counts_and_fractions_and_rejects_impossible():
    assert resolve_share_depth(0.25, 32) == 8 and resolve_share_depth(3, 4) == 3
    with pytest.raises(ValueError, match="share_depth"):
        resolve_share_depth(4, 4)


def test_task_loss_reaches_hyper_and_shared_but_not_prompt_decoder(mt):
    _perturb(mt)
    requests = mt.rewrite_requests(["Solve it."] * 3, QUESTIONS)
    written = mt.write_prompts(requests)
    loss = mt.task_loss(_actor_chats(mt, written.prompts), ["8", "-4", "4"], mt.hyper(written.h))
    loss.backward()
    assert all(_grads(mt._adapter_params("shared")))
    assert not any(_grads(mt._adapter_params("prompt")))
    assert not any(_grads(mt._adapter_params("prompt_frozen")))
    assert any(_grads(mt.hyper.parameters()))


def test_sr_loss_reaches_prompt_decoder_and_shared_but_not_hyper(mt):
    _perturb(mt)
    requests = mt.rewrite_requests(["Solve it."] * 3, QUESTIONS)
    mt.sr_loss(requests, ["Think step by step.", "Add the numbers.", "Answer."]).backward()
    assert all(_grads(mt._adapter_params("shared")))
    assert all(_grads(mt._adapter_params("prompt")))
    assert not any(_grads(mt._adapter_params("prompt_frozen")))
    assert not any(_grads(mt.hyper.parameters()))


def test_frozen_prompt_decoder_changes_only_at_sync(mt):
    frozen = [p.clone() for p in mt._adapter_params("prompt_frozen")]
    with torch.no_grad():
        for p in mt._adapter_params("prompt"):
            p.add_(1.0)
    assert all(torch.equal(a, b) for a, b in zip(frozen, mt._adapter_params("prompt_frozen")))
    mt.sync_frozen()
    assert all(torch.equal(a, b) for a, b in zip(mt._adapter_params("prompt"), mt._adapter_params("prompt_frozen")))


def test_actor_at_initialisation_equals_base_model(mt, tokenizer):
    base = tiny_model(tokenizer, num_layers=4)
    chats = _actor_chats(mt, ["Solve it."] * 3)
    written = mt.write_prompts(mt.rewrite_requests(["p"] * 3, QUESTIONS), with_grad=False)
    ours = mt.score(chats, ["8", "-4", "4"], mt.hyper(written.h))
    from metatuner.generation import score_targets
    ref = score_targets(base, tokenizer, chats, ["8", "-4", "4"])
    assert [c for _, c in ours] == [c for _, c in ref]
    assert all(abs(a - b) < 1e-4 for (a, _), (b, _) in zip(ours, ref))


def test_write_prompts_matches_single_request_decoding(mt):
    _perturb(mt)
    requests = mt.rewrite_requests(["Solve it."] * 3, QUESTIONS)
    batched = mt.write_prompts(requests, with_grad=False)
    for i, request in enumerate(requests):
        alone = mt.write_prompts([request], with_grad=False)
        assert alone.prompts[0] == batched.prompts[i]
        assert torch.allclose(alone.h[0], batched.h[i], atol=1e-5)


def test_sample_prompts_returns_n_per_request(mt):
    out = mt.sample_prompts(mt.rewrite_requests(["Solve it."] * 2, QUESTIONS[:2]), n=3, temperature=1.0)
    assert [len(c) for c in out] == [3, 3]


def test_save_load_round_trip_gives_identical_outputs(mt, tokenizer, tmp_path):
    _perturb(mt)
    mt.add_actor_adapter(r=4, alpha=8, target_modules=["q_proj"])
    with torch.no_grad():
        for p in mt.actor_parameters():
            p.add_(0.1)
    mt.save(tmp_path)
    other = MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer, mt.settings)
    other.load(tmp_path)
    requests = mt.rewrite_requests(["Solve it."] * 3, QUESTIONS)
    a, b = mt.write_prompts(requests, with_grad=False), other.write_prompts(requests, with_grad=False)
    assert a.prompts == b.prompts and torch.allclose(a.h, b.h)
    chats = _actor_chats(mt, a.prompts)
    assert mt.score(chats, ["8"] * 3, mt.hyper(a.h)) == other.score(chats, ["8"] * 3, other.hyper(b.h))


@pytest.mark.fault
def test_fault_truncated_checkpoint_names_the_file(mt, tmp_path):
    mt.save(tmp_path)
    weights = tmp_path / "metatuner.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match="metatuner.safetensors"):
        mt.load(tmp_path)


def test_sft_adapter_as_actor_warm_up_reproduces_the_peft_model(mt, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model

    from metatuner.generation import score_targets

    sft = get_peft_model(tiny_model(tokenizer, num_layers=4), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "up_proj"]))
    with torch.no_grad():
        for n, p in sft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    sft.save_pretrained(tmp_path / "sft")
    mt.load_actor_adapter(tmp_path / "sft")
    chats = _actor_chats(mt, ["Solve it."] * 3)
    written = mt.write_prompts(mt.rewrite_requests(["p"] * 3, QUESTIONS), with_grad=False)
    ours = mt.score(chats, ["8", "-4", "4"], mt.hyper(written.h))  # the hypernetwork adds nothing at step 0
    ref = score_targets(sft.eval(), tokenizer, chats, ["8", "-4", "4"])
    assert all(abs(a - b) < 1e-4 for (a, _), (b, _) in zip(ours, ref))
    assert abs(ours[0][0] - score_targets(tiny_model(tokenizer, num_layers=4), tokenizer, chats[:1], ["8"])[0][0]) > 1e-3


@pytest.fixture()
def mt_full(tokenizer):
    torch.manual_seed(0)
    settings = MetaTunerSettings(share_depth=2, rank=4, hyper_hidden=32, max_prompt_tokens=6, g_finetune="full")
    return MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer, settings,
                     actor=tiny_model(tokenizer, num_layers=2, seed=1), m_tokenizer=tokenizer)


def _split_grads(mt):
    layers = mt.g.get_decoder().layers
    lower = [p for layer in layers[: mt.k] for p in layer.parameters()]
    upper = [p for module in mt._live_upper for p in module.parameters()]
    return lower, upper


def test_full_finetuning_routes_gradients_like_lora(mt_full):
    with torch.no_grad():
        for p in mt_full.hyper.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    requests = mt_full.rewrite_requests(["Solve it."] * 3, QUESTIONS)
    written = mt_full.write_prompts(requests)
    mt_full.task_loss(_actor_chats(mt_full, written.prompts), ["8", "-4", "4"], mt_full.hyper(written.h)).backward()
    lower, upper = _split_grads(mt_full)
    assert all(_grads(lower)) and not any(_grads(upper)) and any(_grads(mt_full.hyper.parameters()))
    assert not any(_grads(mt_full.frozen_upper.parameters()))
    mt_full.zero_grad(set_to_none=True)
    mt_full.sr_loss(requests, ["Think.", "Add.", "Answer."]).backward()
    lower, upper = _split_grads(mt_full)
    assert all(_grads(lower)) and all(_grads(upper)) and not any(_grads(mt_full.hyper.parameters()))
    assert not any(_grads(mt_full.frozen_upper.parameters()))


def test_full_finetuning_frozen_copy_syncs_and_round_trips(mt_full, tokenizer, tmp_path):
    with torch.no_grad():
        for p in mt_full._live_upper.parameters():
            p.add_(0.05)
    assert not all(torch.equal(a, b) for a, b in zip(mt_full._live_upper.parameters(), mt_full.frozen_upper.parameters()))
    mt_full.sync_frozen()
    assert all(torch.equal(a, b) for a, b in zip(mt_full._live_upper.parameters(), mt_full.frozen_upper.parameters()))
    mt_full.save(tmp_path)
    other = MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer, mt_full.settings,
                      actor=tiny_model(tokenizer, num_layers=2, seed=1), m_tokenizer=tokenizer)
    other.load(tmp_path)
    requests = mt_full.rewrite_requests(["Solve it."] * 2, QUESTIONS[:2])
    assert mt_full.write_prompts(requests, False).prompts == other.write_prompts(requests, False).prompts


@pytest.mark.bad_input
def test_bad_input_full_finetuning_with_shared_weights_is_refused():
    from metatuner.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="g_finetune"):
        load_config(None, ["metatuner.g_finetune=full"])


def test_no_sharing_routes_task_loss_to_the_private_encoder_only(tokenizer):
    torch.manual_seed(0)
    settings = MetaTunerSettings(share_depth=2, rank=4, hyper_hidden=32, g_lora_r=4, max_prompt_tokens=6, share=False)
    mt = MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer, settings)
    _perturb(mt)
    requests = mt.rewrite_requests(["Solve it."] * 3, QUESTIONS)
    written = mt.write_prompts(requests)
    mt.task_loss(_actor_chats(mt, written.prompts), ["8", "-4", "4"], mt.hyper(written.h)).backward()
    assert all(_grads(mt._adapter_params("private_encoder"))) and not any(_grads(mt._adapter_params("prompt")))
    assert not mt._adapter_params("shared")
    mt.zero_grad(set_to_none=True)
    mt.sr_loss(requests, ["Think.", "Add.", "Answer."]).backward()
    assert all(_grads(mt._adapter_params("prompt"))) and not any(_grads(mt._adapter_params("private_encoder")))
    assert len(mt._adapter_params("prompt")) == 2 * len(mt._adapter_params("private_encoder"))  # all 4 layers vs 2


def test_gumbel_ablation_sends_the_task_loss_into_the_prompt_decoder(mt):
    from metatuner.gumbel import gumbel_task_loss
    from metatuner.tasks import get_task

    _perturb(mt)
    task = get_task("rg:chain_sum", size=3, test_size=1)
    loss, prompts = gumbel_task_loss(mt, task, task.load("train"), "Solve it.", max_tokens=4, tau=1.0)
    loss.backward()
    assert len(prompts) == 3 and torch.isfinite(loss)
    assert all(_grads(mt._adapter_params("shared"))) and any(_grads(mt._adapter_params("prompt")))
    assert any(_grads(mt.hyper.parameters())) and not any(_grads(mt._adapter_params("prompt_frozen")))


def test_gumbel_prompts_keep_no_low_precision_weight_copies_under_autocast(mt):
    """Under bf16 autocast every forward casts G's frozen weights afresh; over a T-step relaxed prompt, keeping
    those casts for the backward pass would hold T copies of G."""
    from metatuner.gumbel import relaxed_prompts

    weight_shapes = {tuple(p.shape) for p in mt.g.parameters() if p.dim() == 2}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    requests = mt.rewrite_requests(["Solve it."] * 2, QUESTIONS[:2])
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        weights, _, h = relaxed_prompts(mt, requests, max_tokens=4, tau=1.0)
    assert saved and weights.requires_grad and h.requires_grad
    assert not [shape for shape, dtype in saved if dtype == torch.bfloat16 and shape in weight_shapes]


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_gumbel_prompts_pool_h_as_the_encoder_does(tokenizer, pool):
    """The Gumbel ablation computes h in its own prefill; it used to take the last token's state whatever
    metatuner.pool said, so pool=mean trained the hypernetwork on another h than inference gives it."""
    from metatuner.gumbel import relaxed_prompts

    torch.manual_seed(0)
    settings = MetaTunerSettings(share_depth=0.5, rank=4, hyper_hidden=32, g_lora_r=4, pool=pool)
    mt = MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer, settings)
    requests = mt.rewrite_requests(["Solve it.", "Solve it."], QUESTIONS[:2])  # two lengths: padding matters
    _, _, h = relaxed_prompts(mt, requests, max_tokens=2, tau=1.0)
    with mt.role("learner"), torch.no_grad():
        expected = mt.encode(requests)
    assert torch.allclose(h.detach(), expected, atol=1e-5)


def _sr_grads(mt, requests, best, checkpoint: bool, bf16: bool):
    mt.checkpoint_sr = checkpoint
    mt.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = mt.sr_loss(requests, best)
    with mt.role("learner"):  # where training runs the SR backward (a checkpointed layer recomputes in it)
        loss.backward()
    return loss.detach(), [None if p.grad is None else p.grad.clone() for p in mt.generator_parameters()]


@pytest.mark.parametrize("bf16", [False, True])
def test_sr_loss_checkpointing_gives_the_same_loss_and_gradients(mt, bf16):
    _perturb(mt)
    requests = mt.rewrite_requests(["Solve it."] * 3, QUESTIONS)
    best = ["Think step by step.", "Add the numbers.", "Answer."]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        loss, grads = _sr_grads(mt, requests, best, checkpoint=True, bf16=bf16)
    kept, saved = sum(saved), []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        ref_loss, ref_grads = _sr_grads(mt, requests, best, checkpoint=False, bf16=bf16)
    assert torch.equal(loss, ref_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads)) and any(g is not None for g in grads)
    assert kept < sum(saved) / 2  # the graph keeps the layers' inputs, not their activations
    layers = mt.g.get_base_model().model.layers
    assert not any(layer.training or layer.gradient_checkpointing for layer in layers)


def test_write_prompts_records_no_graph_above_layer_k(mt):
    """h keeps its graph to phi_s; the upper layers' activations (the prompt is decoded without gradients) are
    not recorded, and h and its gradients are those of a prefill that recorded them."""
    _perturb(mt)
    requests = mt.rewrite_requests(["Solve it."] * 3, QUESTIONS)
    with mt.role("writer"):
        h, prefilled = mt._prefill(requests)
    layers = prefilled.cache.layers
    assert h.requires_grad and layers[0].keys.requires_grad and not layers[-1].keys.requires_grad
    h.pow(2).sum().backward()
    grads = [p.grad.clone() for p in mt._adapter_params("shared")]
    mt.zero_grad(set_to_none=True)
    mt._graph_below_k = contextlib.nullcontext
    with mt.role("writer"):
        ref, prefilled = mt._prefill(requests)
    assert prefilled.cache.layers[-1].keys.requires_grad
    ref.pow(2).sum().backward()
    assert torch.equal(h, ref)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, mt._adapter_params("shared")))

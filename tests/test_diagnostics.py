"""The prompt-branch and LoRA-diversity diagnostics (`metatuner.diagnostics`) against hand-computed cases."""

import pytest
import torch

from metatuner.config import MetaTunerSettings
from metatuner.diagnostics import (diversity_from_gram, lora_diversity, prompt_diagnostics, update_gram,
                                   word_edit_distance)
from metatuner.hyperlora import LoraFactors
from metatuner.model import MetaTuner
from metatuner.testing import tiny_model


def test_word_edit_distance_by_hand():
    assert word_edit_distance("a b c", "a b c") == 0.0
    assert word_edit_distance("a b c", "a x c") == pytest.approx(1 / 3)  # one substitution
    assert word_edit_distance("a b", "a b c d") == pytest.approx(2 / 4)  # two insertions over the longer
    assert word_edit_distance("", "a") == 1.0


def test_prompt_diagnostics_count_p0_and_distinct_prompts():
    d = prompt_diagnostics(["p zero", "p zero", "other words", "p one"], "p zero")
    assert d == {"prompts": 4, "distinct_prompts": 3, "p0_share": 0.5,
                 "edit_distance_to_p0": pytest.approx((0 + 0 + 1 + 0.5) / 4)}
    # p0 cut at the prompt-length limit is still G copying p0
    assert prompt_diagnostics(["Solve the problem step", "Solve it"], "Solve the problem step by step.")["p0_share"] == 0.5


def _dense(factors: LoraFactors, scale: float) -> torch.Tensor:
    """Each example's update scale * B A over all targets, flattened (in float32): what the Gram trick must equal."""
    rows = []
    for i in range(factors.batch_size):
        rows.append(torch.cat([(scale * b[i] @ a[i]).flatten() for a, b in factors.factors.values()]))
    return torch.stack(rows).double()


def test_gram_trick_equals_the_dense_updates():
    """Fails if the Gram matrix drops a target, the scale, or mixes up A and B."""
    torch.manual_seed(0)
    factors = LoraFactors({(0, "q"): (torch.randn(5, 3, 7), torch.randn(5, 6, 3)),
                           (1, "v"): (torch.randn(5, 3, 7), torch.randn(5, 4, 3))})
    dense = _dense(factors, 0.5)
    assert torch.allclose(update_gram(factors, 0.5), dense @ dense.T, rtol=1e-5)
    d = diversity_from_gram(dense @ dense.T)
    centred = dense - dense.mean(0)
    assert d["between_query_variance_share"] == pytest.approx(
        float((centred**2).sum(1).mean() / (dense**2).sum(1).mean()), rel=1e-5)
    unit = dense / dense.norm(dim=1, keepdim=True)
    cos = unit @ unit.T
    assert d["mean_pairwise_cosine_distance"] == pytest.approx(float(1 - (cos.sum() - 5) / 20), rel=1e-5)
    assert d["mean_frobenius_norm"] == pytest.approx(float(dense.norm(dim=1).mean()), rel=1e-5)


def test_identical_updates_have_no_diversity():
    a, b = torch.randn(1, 2, 4).repeat(3, 1, 1), torch.randn(1, 5, 2).repeat(3, 1, 1)
    d = diversity_from_gram(update_gram(LoraFactors({(0, "q"): (a, b)}), 1.0))
    assert d["between_query_variance_share"] == pytest.approx(0, abs=1e-9)
    assert d["mean_pairwise_cosine_distance"] == pytest.approx(0, abs=1e-9)


def test_lora_diversity_of_a_model_reads_distinct_queries_and_the_static_adapter(tokenizer):
    torch.manual_seed(0)
    settings = MetaTunerSettings(share_depth=2, rank=4, hyper_hidden=32, g_lora_r=4, max_prompt_tokens=4)
    mt = MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer, settings)
    mt.p0 = "p"

    def diversity(questions):
        return lora_diversity(mt, questions, mt.write_all(questions)[1])

    assert diversity(["1 + 2", "3 + 4"])["mean_frobenius_norm"] == 0  # B = 0 at step 0
    with torch.no_grad():
        for p in mt.hyper.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    d = diversity(["1 + 2", "3 + 4", "1 + 2", "9 - 5"])
    assert d["queries"] == 3 and d["mean_frobenius_norm"] > 0 and d["static_adapter_frobenius_norm"] is None
    mt.add_actor_adapter(2, 4.0, ["q_proj"])
    assert diversity(["1 + 2"])["static_adapter_frobenius_norm"] == 0  # PEFT's B starts at zero

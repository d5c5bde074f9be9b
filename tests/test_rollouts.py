import json

import pytest
import torch

from metatuner.config import MetaTunerSettings
from metatuner.generation import chat_prompt
from metatuner.metatuner import MetaTuner
from metatuner.rollouts import ExpertPromptStore, candidate_scores, run_rollouts
from metatuner.tasks import get_task
from metatuner.testing import tiny_model

P0 = "Solve it."


@pytest.fixture()
def setup(tokenizer):
    torch.manual_seed(0)
    settings = MetaTunerSettings(share_depth=2, rank=4, hyper_hidden=32, g_lora_r=4, max_prompt_tokens=5)
    mt = MetaTuner(tiny_model(tokenizer, num_layers=4), tokenizer, settings)
    with torch.no_grad():
        for p in mt.hyper.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    task = get_task("rg:chain_sum", size=6, test_size=2)
    return mt, task, task.load("train")


def _rescore(mt, task, examples, prompts, factors):
    chats = [chat_prompt(mt.m_tok, task.messages(p, ex)) for p, ex in zip(prompts, examples)]
    return candidate_scores(mt, task, examples, chats, factors, "likelihood", 8)


def test_d2_never_gets_worse_and_starts_no_worse_than_p0(setup):
    mt, task, examples = setup
    written = mt.write_prompts(mt.rewrite_requests([P0] * len(examples), [e.question for e in examples]), False)
    factors = mt.hyper(written.h).detach()
    store = ExpertPromptStore()
    p0_scores = _rescore(mt, task, examples, [P0] * len(examples), factors)
    previous = None
    for _ in range(3):
        run_rollouts(mt, task, examples, P0, factors, store, n=3, temperature=1.5)
        best = _rescore(mt, task, examples, [store.best(e.id, P0) for e in examples], factors)
        assert all(b >= p - 1e-6 for b, p in zip(best, p0_scores))
        if previous is not None:
            assert all(b >= p - 1e-6 for b, p in zip(best, previous))
        previous = best
    assert any(store.best(e.id, P0) != P0 for e in examples)  # sampling found something better somewhere


def test_exact_match_reward_scores_pairs(setup):
    mt, task, examples = setup
    written = mt.write_prompts(mt.rewrite_requests([P0] * 2, [e.question for e in examples[:2]]), False)
    store = ExpertPromptStore()
    result = run_rollouts(mt, task, examples[:2], P0, mt.hyper(written.h).detach(), store, n=2, temperature=1.0,
                          reward="exact_match")
    assert result.scored >= 2
    assert all(isinstance(e["score"], list) and len(e["score"]) == 2 for e in store.entries.values())


def test_store_round_trip_and_bad_input_names_the_file(tmp_path):
    store = ExpertPromptStore({"a": {"prompt": "p", "score": -1.5}, "b": {"prompt": "q", "score": [1.0, -0.2]}})
    store.save(tmp_path / "d2.json")
    assert ExpertPromptStore.load(tmp_path / "d2.json").entries == store.entries
    (tmp_path / "bad.json").write_text(json.dumps({"a": {"prompt": 3}}))
    with pytest.raises(ValueError, match="bad.json"):
        ExpertPromptStore.load(tmp_path / "bad.json")
    (tmp_path / "cut.json").write_text('{"a": {"prompt": "p", "sc')
    with pytest.raises(ValueError, match="cut.json"):
        ExpertPromptStore.load(tmp_path / "cut.json")

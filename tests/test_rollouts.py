import json

import pytest
import torch

from metatuner.config import MetaTunerSettings
from metatuner.generation import chat_prompt
from metatuner.model import MetaTuner
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


@pytest.mark.bad_input
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


def test_d2_from_samples_never_stores_p0_and_a_sample_must_beat_the_stored_one(setup, monkeypatch):
    """Fails if p0 is a candidate or the default (G would be taught to copy it), or if a worse sample replaces the
    stored one."""
    mt, task, examples = setup
    examples = examples[:3]
    written = mt.write_prompts(mt.rewrite_requests([P0] * 3, [e.question for e in examples]), False)
    factors = mt.hyper(written.h).detach()
    store = ExpertPromptStore()
    # G samples only prompts other than p0 here, so p0 can only be stored if it is (wrongly) a candidate.
    monkeypatch.setattr(mt, "sample_prompts", lambda requests, n, temperature: [
        [f"Sample {i}-{j}." for j in range(n)] for i in range(len(requests))])
    result = run_rollouts(mt, task, examples, P0, factors, store, n=2, temperature=1.0, p0_candidate=False)
    assert set(store.entries) == {e.id for e in examples}
    assert all(e["prompt"].startswith("Sample") for e in store.entries.values())
    assert result.improved == 3 and store.from_samples_share(P0) == 1.0
    # The gap over p0 is measured against p0's own score (p0 was scored as the reference).
    samples = [store.best(e.id, None) for e in examples]
    expected = [s - p for s, p in zip(_rescore(mt, task, examples, samples, factors),
                                      _rescore(mt, task, examples, [P0] * 3, factors))]
    assert result.gap_over_p0 == pytest.approx(sum(expected) / 3, abs=1e-4)
    assert result.beats_p0 == sum(g > 0 for g in expected)

    # A second round whose samples all score below the stored prompt leaves D2 as it was.
    stored = dict(store.entries)
    monkeypatch.setattr(mt, "sample_prompts", lambda requests, n, temperature: [[""] * n for _ in requests])
    assert run_rollouts(mt, task, examples, P0, factors, store, n=2, temperature=1.0, p0_candidate=False).improved == 0
    assert {k: v["prompt"] for k, v in store.entries.items()} == {k: v["prompt"] for k, v in stored.items()}


def test_d2_with_p0_keeps_todays_behaviour(setup, monkeypatch):
    """samples_and_p0: p0 is stored for a query whose samples all score below it."""
    mt, task, examples = setup
    written = mt.write_prompts(mt.rewrite_requests([P0] * 2, [e.question for e in examples[:2]]), False)
    monkeypatch.setattr(mt, "sample_prompts", lambda requests, n, temperature: [[""] * n for _ in requests])
    store = ExpertPromptStore()
    run_rollouts(mt, task, examples[:2], P0, mt.hyper(written.h).detach(), store, n=2, temperature=1.0)
    assert [e["prompt"] for e in store.entries.values()] == [P0, P0] and store.from_samples_share(P0) == 0.0


def test_reject_leaks_never_stores_a_prompt_that_states_the_gold_answer(setup, monkeypatch):
    """Fails if a sampled prompt that gives away the answer can win D2. The leaking prompt is made to win on merit
    here: under the likelihood reward, stating the gold answer raises its likelihood (checked without the guard)."""
    mt, task, examples = setup
    examples = examples[:3]
    written = mt.write_prompts(mt.rewrite_requests([P0] * 3, [e.question for e in examples]), False)
    factors = mt.hyper(written.h).detach()
    leaking = {e.question: f"The answer is {e.answer}." for e in examples}
    monkeypatch.setattr(mt, "sample_prompts", lambda requests, n, temperature: [
        [leaking[q], "Add the numbers."] for q in (next(e.question for e in examples if e.question in r)
                                                   for r in requests)])
    monkeypatch.setattr(mt, "score", lambda chats, targets, factors, batch_size: [
        (0.0 if any(leak in c for leak in leaking.values()) else -5.0, 1) for c in chats])  # the leak scores best

    unguarded = ExpertPromptStore()
    result = run_rollouts(mt, task, examples, P0, factors, unguarded, n=2, temperature=1.0, p0_candidate=False)
    assert result.leaks == 0 and [e["prompt"] for e in unguarded.entries.values()] == list(leaking.values())

    guarded = ExpertPromptStore()
    result = run_rollouts(mt, task, examples, P0, factors, guarded, n=2, temperature=1.0, p0_candidate=False,
                          reject_leaks=True)
    assert [e["prompt"] for e in guarded.entries.values()] == ["Add the numbers."] * 3
    assert (result.leaks, result.sampled) == (3, 6)


def _two_rounds(mt, task, examples, bf16: bool, reward: str):
    torch.manual_seed(5)
    store = ExpertPromptStore()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        written = mt.write_prompts(mt.rewrite_requests([P0] * len(examples), [e.question for e in examples]), False)
        factors = mt.hyper(written.h).detach()
        results = [run_rollouts(mt, task, examples, P0, factors, store, n=3, temperature=1.2, reward=reward,
                                p0_candidate=False) for _ in range(2)]
    return written.prompts, json.dumps(store.entries), results


@pytest.mark.parametrize("bf16,reward", [(False, "likelihood"), (True, "likelihood"), (True, "exact_match")])
def test_rollouts_select_what_the_former_decoding_selected(setup, monkeypatch, bf16, reward):
    """Same seed, same written prompts, samples, scores and D2 as before the KV buffer, the kept weight casts, the
    sampler's own draw (test_generation.former_decoding) and, under the checker's reward, scoring and answering
    from one prefill (the likelihood that breaks ties then differs by float rounding only)."""
    from test_generation import former_decoding

    mt, task, examples = setup
    prompts, entries, results = _two_rounds(mt, task, examples, bf16, reward)
    former_decoding(monkeypatch)
    former_prompts, former_entries, former_results = _two_rounds(mt, task, examples, bf16, reward)
    assert (prompts, results) == (former_prompts, former_results)
    entries, former_entries = json.loads(entries), json.loads(former_entries)
    assert len(entries) == len(examples)
    if reward == "likelihood":
        assert entries == former_entries
        return
    for key, entry in entries.items():
        former = former_entries[key]
        assert entry["prompt"] == former["prompt"] and entry["score"][0] == former["score"][0]
        assert entry["score"] == pytest.approx(former["score"], rel=1e-3)  # bf16 rounds at about 4e-3

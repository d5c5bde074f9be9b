"""Candidate prompts, their rewards, and the expert-prompt store D2.

For each training query: sample n prompts from the current G, add the best prompt stored so far (and, with
`p0_candidate`, p0), score every candidate through M with the query's own LoRA, and keep the best. D2 changes only
when a candidate beats the stored prompt's score under the current model, so it never gets worse as training goes
on. p0 is always scored, as the reference of the diagnostics (how far the best sample is above it).

    store = ExpertPromptStore.load(path) if path else ExpertPromptStore()
    result = run_rollouts(mt, task, examples, p0, factors, store, n=4, temperature=0.8, reward="exact_match",
                          p0_candidate=False, reject_leaks=True)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .checkpoint import atomic_write_text
from .diagnostics import is_p0
from .generation import task_chats
from .hyperlora import LoraFactors
from .tasks.base import Example, Task


class ExpertPromptStore:
    """D2: the best prompt found so far for each training query, with the score it had when found."""

    def __init__(self, entries: dict[str, dict] | None = None):
        self.entries: dict[str, dict] = dict(entries or {})

    def best(self, example_id: str, default: str | None) -> str | None:
        entry = self.entries.get(example_id)
        return entry["prompt"] if entry else default

    def offer(self, example_id: str, prompt: str, score, baseline) -> bool:
        """Record the winner of one scoring round; True when it changed D2 (it beat the stored prompt, scored in
        the same round, or the query had no entry: `baseline` None).

        The caller puts the stored prompt first among the candidates so that ties keep it; the stored score is
        refreshed to the current model's, so later rounds compare like with like.
        """
        self.entries[example_id] = {"prompt": prompt, "score": score}
        return baseline is None or score > baseline

    def from_samples_share(self, p0: str) -> float:
        """Share of the entries that are something other than p0 or p0 cut short; 0 when D2 is empty."""
        if not self.entries:
            return 0.0
        return sum(not is_p0(e["prompt"], p0) for e in self.entries.values()) / len(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Written beside the file, synced, then renamed: a crash mid-write leaves the previous file whole.
        atomic_write_text(path, json.dumps(self.entries, ensure_ascii=False, indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "ExpertPromptStore":
        path = Path(path)
        try:
            entries = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"cannot read expert prompts {path}: {err}") from err
        if not isinstance(entries, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("prompt"), str) and _is_score(v.get("score"))
            for v in entries.values()
        ):
            raise ValueError(f"{path}: expected {{id: {{prompt: str, score: number}}}}")
        return cls(entries)


def _is_score(value) -> bool:
    # likelihood rewards are numbers; exact-match rewards are [exact match, likelihood] pairs
    if isinstance(value, list):
        return all(isinstance(v, (int, float)) for v in value)
    return isinstance(value, (int, float))


@dataclass
class RolloutResult:
    mean_reward: float
    best_reward: float
    improved: int  # queries whose stored prompt changed
    scored: int  # candidates scored
    beats_p0: int = 0  # queries whose best candidate scored above p0 (in the reward's order)
    gap_over_p0: float = 0.0  # mean over queries of the best candidate's reward minus p0's (first component)
    leaks: int = 0  # sampled prompts set aside because they state the gold answer (reject_leaks)
    sampled: int = 0  # non-empty sampled prompts


def run_rollouts(
    mt,
    task: Task,
    examples: Sequence[Example],
    p0: str,
    factors: LoraFactors | None,
    store: ExpertPromptStore,
    *,
    n: int,
    temperature: float,
    reward: str = "likelihood",
    batch_size: int = 16,
    p0_candidate: bool = True,
    reject_leaks: bool = False,
) -> RolloutResult:
    """Sample, score and keep the best prompt per query; `factors` are the queries' LoRA (None: M without one).

    `p0_candidate=False` keeps D2 to G's own samples: p0 is scored only as a reference (the diagnostics' gap over
    p0) and can never be stored unless G samples it; a query's first rollout stores its best sample whatever it
    scores, and later samples must beat it. With True, p0 is a candidate and the default stored prompt.

    `reject_leaks=True` sets aside every sample that states the gold answer (`Task.states_answer`: the checker
    scores it as a right answer, or it names the gold number where the question does not): M copies a stated
    answer, so such a prompt wins every round by leaking the label, and G, which cannot know the label at test
    time, learns to write guesses.
    """
    requests = mt.rewrite_requests([p0] * len(examples), [ex.question for ex in examples])
    sampled = mt.sample_prompts(requests, n=n, temperature=temperature)
    candidates, eligible, leaks, n_sampled = [], [], 0, 0
    for ex, samples in zip(examples, sampled):
        samples = [p for p in samples if p]
        n_sampled += len(samples)
        if reject_leaks:
            kept = [p for p in samples if not task.states_answer(p, ex)]
            leaks += len(samples) - len(kept)
            samples = kept
        stored = store.best(ex.id, p0 if p0_candidate else None)
        # The stored prompt comes first so that ties keep it.
        pool = ([stored] if stored is not None else []) + [
            p for p in dict.fromkeys(([p0] if p0_candidate else []) + samples) if p != stored]
        eligible.append(len(pool))
        if p0 not in pool:
            pool.append(p0)  # scored as the reference only
        candidates.append(pool)
    owners = [i for i, pool in enumerate(candidates) for _ in pool]
    flat = [p for pool in candidates for p in pool]
    chats = task_chats(mt.m_tok, task, flat, [examples[i] for i in owners])
    row_factors = factors.detach().index_select(owners) if factors is not None else None
    scores = candidate_scores(mt, task, [examples[i] for i in owners], chats, row_factors, reward, batch_size)

    improved, beats_p0, gaps, best_rewards, all_rewards, k = 0, 0, [], [], [], 0
    for i, pool in enumerate(candidates):
        pool_scores = scores[k : k + len(pool)]
        k += len(pool)
        reference = pool_scores[pool.index(p0)]
        if eligible[i] == 0:  # no sample survived (empty or leaked) and nothing is stored yet
            continue
        j = max(range(eligible[i]), key=lambda c: pool_scores[c])
        has_stored = p0_candidate or examples[i].id in store.entries
        baseline = _jsonable(pool_scores[0]) if has_stored else None
        improved += store.offer(examples[i].id, pool[j], _jsonable(pool_scores[j]), baseline=baseline)
        beats_p0 += pool_scores[j] > reference
        gaps.append(_first(pool_scores[j]) - _first(reference))
        best_rewards.append(_first(pool_scores[j]))
        all_rewards.extend(_first(s) for s in pool_scores[: eligible[i]])
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return RolloutResult(mean(all_rewards), mean(best_rewards), improved, len(flat), beats_p0, mean(gaps), leaks,
                         n_sampled)


def _first(score) -> float:
    return score[0] if isinstance(score, tuple) else score


def _jsonable(score):
    return list(score) if isinstance(score, tuple) else score


def candidate_scores(mt, task, examples, chats, factors, reward, batch_size):
    """Per candidate: a float (likelihood) or (exact match, likelihood) compared in that order."""
    targets = [ex.target for ex in examples]
    if reward == "likelihood":
        return _mean_logprobs(mt.score(chats, targets, factors, batch_size=batch_size))
    # The checker needs M's answer too: scored and answered from one prefill of each candidate's chat.
    logprobs, answers = mt.score_and_answer(chats, targets, factors, max_new_tokens=task.max_new_tokens,
                                            stop_strings=task.stop_strings, batch_size=batch_size)
    return [(task.reward(out, ex), ll) for out, ex, ll in zip(answers.texts, examples, _mean_logprobs(logprobs))]


def _mean_logprobs(logprobs) -> list[float]:
    return [s / max(c, 1) for s, c in logprobs]  # minus the mean NLL of the gold answer

"""Candidate prompts, their rewards, and the expert-prompt store D2.

For each training query: sample n prompts from the current G, add p0 and the best prompt stored so far, score every
candidate through M with the query's own LoRA, and keep the best. D2 changes only when a candidate beats the stored
prompt's score under the current model, so D2 is never worse than p0 and never gets worse as training goes on.

    store = ExpertPromptStore.load_or_new(path)
    result = run_rollouts(mt, task, examples, p0, factors, store, n=4, temperature=0.8, reward="likelihood")
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .generation import chat_prompt
from .hyperlora import LoraFactors
from .tasks.base import Example, Task


class ExpertPromptStore:
    """D2: the best prompt found so far for each training query, with the score it had when found."""

    def __init__(self, entries: dict[str, dict] | None = None):
        self.entries: dict[str, dict] = dict(entries or {})

    def best(self, example_id: str, default: str) -> str:
        entry = self.entries.get(example_id)
        return entry["prompt"] if entry else default

    def offer(self, example_id: str, prompt: str, score, baseline) -> bool:
        """Record the winner of one scoring round; True when it beat the stored prompt (scored in the same round).

        The caller puts the stored prompt first among the candidates so that ties keep it; the stored score is
        refreshed to the current model's, so later rounds compare like with like.
        """
        self.entries[example_id] = {"prompt": prompt, "score": score}
        return score > baseline

    def __len__(self) -> int:
        return len(self.entries)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a crash mid-write leaves the previous file whole.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".d2-", suffix=".json")
        with os.fdopen(fd, "w") as f:
            json.dump(self.entries, f, ensure_ascii=False, indent=1)
        os.replace(tmp, path)

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
) -> RolloutResult:
    """Sample, score and keep the best prompt per query; `factors` are the queries' LoRA (None: M without one)."""
    requests = mt.rewrite_requests([p0] * len(examples), [ex.question for ex in examples])
    sampled = mt.sample_prompts(requests, n=n, temperature=temperature)
    candidates = []
    for ex, samples in zip(examples, sampled):
        stored = store.best(ex.id, p0)
        # The stored prompt comes first so that ties keep it; p0 is always a candidate.
        pool = [stored] + [p for p in dict.fromkeys([p0] + samples) if p and p != stored]
        candidates.append(pool)
    owners = [i for i, pool in enumerate(candidates) for _ in pool]
    flat = [p for pool in candidates for p in pool]
    chats = [chat_prompt(mt.m_tok, task.messages(p, examples[i])) for p, i in zip(flat, owners)]
    row_factors = factors.detach().index_select(owners) if factors is not None else None
    scores = candidate_scores(mt, task, [examples[i] for i in owners], chats, row_factors, reward, batch_size)

    improved, best_rewards, all_rewards, k = 0, [], [], 0
    for i, pool in enumerate(candidates):
        pool_scores = scores[k : k + len(pool)]
        k += len(pool)
        j = max(range(len(pool)), key=lambda c: pool_scores[c])
        improved += store.offer(examples[i].id, pool[j], _jsonable(pool_scores[j]), baseline=_jsonable(pool_scores[0]))
        best_rewards.append(pool_scores[j][0] if isinstance(pool_scores[j], tuple) else pool_scores[j])
        all_rewards.extend(s[0] if isinstance(s, tuple) else s for s in pool_scores)
    return RolloutResult(sum(all_rewards) / len(all_rewards), sum(best_rewards) / len(best_rewards), improved, len(flat))


def _jsonable(score):
    return list(score) if isinstance(score, tuple) else score


def candidate_scores(mt, task, examples, chats, factors, reward, batch_size):
    """Per candidate: a float (likelihood) or (exact match, likelihood) compared in that order."""
    logprobs = mt.score(chats, [ex.target for ex in examples], factors, batch_size=batch_size)
    likelihood = [s / max(c, 1) for s, c in logprobs]  # minus the mean NLL of the gold answer
    if reward == "likelihood":
        return likelihood
    answers = mt.answer(chats, factors, max_new_tokens=task.max_new_tokens, stop_strings=task.stop_strings,
                        batch_size=batch_size)
    return [(task.reward(out, ex), ll) for out, ex, ll in zip(answers.texts, examples, likelihood)]

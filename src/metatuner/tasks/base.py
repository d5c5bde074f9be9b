"""The one Task interface: loading, prompting, answer extraction and checking.

Every consumer of a task (evaluation, the rewards of rollouts, SFT targets, the baselines) goes through this
interface, so there is exactly one extractor and one checker per task:

    task = get_task("gsm8k")
    examples = task.load("test", path="data/gsm8k/test.jsonl", limit=8)
    messages = task.messages(task.default_prompt, examples[0])   # chat messages for the model
    scores = task.score(model_output, examples[0])                # {"strict": 1.0, "flexible": 1.0}
    reward = task.reward(model_output, examples[0])               # the primary metric as a float
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from .answers import is_number, normalize_number, numbers_in


@dataclass
class Example:
    """One task item.

    `question` is the query x exactly as the model sees it after the instruction (for multiple choice it already
    holds the context and the lettered options). `target` is the supervised completion y used by SFT and the task
    loss (a rationale ending in the task's answer line where the data has one). `answer` is the gold final answer
    that the checker compares against.
    """

    id: str
    question: str
    answer: str
    target: str
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    #: (file or hub split, line or row number, "line"/"row") for examples read from data; errors found later
    #: (an example longer than the context) name this place.
    origin: tuple[str, int, str] | None = field(default=None, compare=False)


class Task(ABC):
    """A task: data, prompt template, extraction and checking. Subclasses are small and stateless."""

    name: str
    #: The hand-written initial instruction p0.
    default_prompt: str
    #: Metric names returned by `score`, the first one being the primary metric used as the reward.
    metrics: tuple[str, ...] = ("accuracy",)
    #: Generation limits that suit the task's answers.
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    @abstractmethod
    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        """Load a split. `path` (a local JSONL/CSV file) overrides the default source (the Hugging Face hub)."""

    def render(self, prompt: str, example: Example) -> str:
        """The user turn: the instruction p followed by the query x."""
        prompt = prompt.strip()
        return f"{prompt}\n\n{example.question}" if prompt else example.question

    def messages(self, prompt: str, example: Example) -> list[dict[str, str]]:
        """Chat messages for the answering model (the tokenizer's chat template is applied by the caller)."""
        return [{"role": "user", "content": self.render(prompt, example)}]

    @abstractmethod
    def extract(self, output: str) -> dict[str, str | None]:
        """The answer(s) found in a model output, one per metric that needs extraction (None when absent)."""

    @abstractmethod
    def score(self, output: str, example: Example) -> dict[str, float]:
        """Per-metric scores in [0, 1] of one output against the example's gold answer."""

    def reward(self, output: str, example: Example) -> float:
        """The primary metric as a scalar reward (rollouts use this, evaluation reports `score`)."""
        return float(self.score(output, example)[self.primary_metric])

    def states_answer(self, text: str, example: Example) -> bool:
        """Whether `text` (a prompt G wrote, not an answer) gives the gold answer away: the checker scores it as a
        right answer, or the gold answer is a number that the text names and the question does not ("58 + 26 is
        84. The answer is N." for 58 + 26 states 84 without the answer line the checker reads)."""
        if self.reward(text, example) > 0:
            return True
        gold = normalize_number(example.answer)
        return is_number(gold) and gold in numbers_in(text) and gold not in numbers_in(example.question)

    def choice_targets(self, example: Example) -> list[str] | None:
        """For multiple-choice tasks: the completions whose likelihoods rank the options; None otherwise."""
        return None

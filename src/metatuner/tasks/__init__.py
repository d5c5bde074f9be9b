"""The task registry: every task by name, with its options as keyword arguments.

    from metatuner.tasks import get_task, list_tasks
    task = get_task("gsm8k")
    task = get_task("rg:chain_sum", size=2000, seed=0)      # any reasoning-gym dataset
    task = get_task("custom", path="my.jsonl", question_field="input", answer_field="output")
    list_tasks()        # ["cosmosqa", "custom", "gsm8k", "gsm_symbolic", "hotpotqa", "math", "rg:ab", ...]

Register your own with `register_task("name", factory)` (or as a decorator, `@register_task("name")`), where
`factory(**options)` returns a Task. Small data files for tests and examples ship in `fixture_path(...)`.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from pathlib import Path

from .base import Example, Task
from .cosmosqa import CosmosQATask
from .custom import CustomTask
from .data_io import DataError, DataWarning, check_lengths, read_csv, read_jsonl, token_counter
from .gsm8k import GSM8KTask
from .hotpotqa import HotpotQATask
from .math import MATHTask
from .reasoning_gym_task import ReasoningGymTask, reasoning_gym_names

__all__ = [
    "CosmosQATask",
    "CustomTask",
    "DataError",
    "DataWarning",
    "Example",
    "GSM8KTask",
    "HotpotQATask",
    "MATHTask",
    "ReasoningGymTask",
    "Task",
    "check_lengths",
    "check_task_options",
    "fixture_path",
    "get_task",
    "list_tasks",
    "read_csv",
    "read_jsonl",
    "register_task",
    "task_option_names",
    "token_counter",
]

TaskFactory = Callable[..., Task]

RG_PREFIX = "rg:"
_REGISTRY: dict[str, TaskFactory] = {}
_ALIASES: dict[str, str] = {"gsm_symbolic": "rg:gsm_symbolic"}
FIXTURES = Path(__file__).parent / "fixtures"


def register_task(name: str, factory: TaskFactory | None = None, *, overwrite: bool = False):
    """Register `factory` under `name`; without a factory, return a decorator that registers its argument."""

    def register(factory: TaskFactory) -> TaskFactory:
        if name.startswith(RG_PREFIX) or name in _ALIASES:
            raise ValueError(f"task name {name!r} is reserved")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"task {name!r} is already registered (pass overwrite=True to replace it)")
        _REGISTRY[name] = factory
        return factory

    return register if factory is None else register(factory)


def get_task(name: str, /, **options) -> Task:
    """The task called `name`, built with `options` (each task module's docstring lists its options)."""
    name = _ALIASES.get(name, name)
    if name.startswith(RG_PREFIX):
        return ReasoningGymTask(name[len(RG_PREFIX):], **options)
    if name not in _REGISTRY:
        known = ", ".join(sorted([*_REGISTRY, *_ALIASES]))
        raise ValueError(f"unknown task {name!r}; known tasks: {known}, and rg:<name> for any reasoning-gym dataset")
    return _REGISTRY[name](**options)


def task_option_names(name: str, /) -> list[str] | None:
    """The options `get_task(name, ...)` accepts (None: the factory takes any keyword)."""
    name = _ALIASES.get(name, name)
    if name.startswith(RG_PREFIX):
        return ReasoningGymTask.option_names(name[len(RG_PREFIX):])
    if name not in _REGISTRY:
        get_task(name)  # raises, listing the known tasks
    factory = _REGISTRY[name]
    params = inspect.signature(factory.__init__ if inspect.isclass(factory) else factory).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.name != "self" and p.kind is not inspect.Parameter.VAR_POSITIONAL]


def check_task_options(name: str, options: dict) -> None:
    """Raise ValueError naming the first option `name` does not take, the valid ones and the closest match."""
    valid = task_option_names(name)
    if valid is None:
        return
    for key in options:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean `{close[0]}`?" if close else ""
            raise ValueError(f"task {name!r} has no option `{key}`{hint} (its options: {', '.join(valid)})")


def list_tasks(include_reasoning_gym: bool = True) -> list[str]:
    """Registered task names and aliases, then (optionally) every "rg:<name>"."""
    names = sorted([*_REGISTRY, *_ALIASES])
    if include_reasoning_gym:
        names += [RG_PREFIX + dataset for dataset in reasoning_gym_names()]
    return names


def fixture_path(name: str) -> Path:
    """A small data file shipped with the package (gsm8k.jsonl, cosmosqa.csv, hotpotqa.jsonl, math.jsonl, ...)."""
    path = FIXTURES / name
    if not path.is_file():
        have = ", ".join(sorted(p.name for p in FIXTURES.iterdir()))
        raise FileNotFoundError(f"no fixture {name!r} in {FIXTURES} (have: {have})")
    return path


register_task("gsm8k", GSM8KTask)
register_task("math", MATHTask)
register_task("hotpotqa", HotpotQATask)
register_task("cosmosqa", CosmosQATask)
register_task("custom", CustomTask)

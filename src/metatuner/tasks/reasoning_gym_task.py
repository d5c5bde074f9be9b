"""Any reasoning-gym procedural dataset as a task, offline and unlimited: `rg:<name>`.

    task = get_task("rg:chain_sum", size=2000, test_size=500, seed=0, min_terms=2, max_terms=4)
    train, test = task.load("train"), task.load("test")
    task.score("4 + 5 = 9. The answer is 9.", test[0])        # {"accuracy": ..., "score": ...}

Options: `size` (train items, default 2000), `test_size` (default 500), `seed` (default 0), `numeric` (whether
answers are numbers; None detects it from a few generated items), `on_bad_row` (for `path` files),
`max_new_tokens` (default 256 for gsm_symbolic's chains of thought, 64 for one-line answers), and any field
of the dataset's own config (e.g. `difficulty`, `min_terms`), passed to `reasoning_gym.create_dataset`.

How train and test stay apart: reasoning-gym builds item i of a dataset from `Random(seed + i)`. The train split
uses seed `seed` (items 0..size-1); the test split uses seed `seed + TEST_SEED_OFFSET` (10,000,000), so no test
item shares a random stream with a train item as long as size <= 10,000,000. Small generators can still produce
the same question twice, so test items whose question also appears in the train split are dropped and more test
items are drawn (from a pool of 2 * test_size + 100) until test_size are found. Ids are f"{split}-{i}" with i the
generator index, so they are stable under `limit`.

`path` loads a JSONL/CSV file with `question` and `answer` (and, optionally, `metadata` as a JSON object and
`id`) instead; scoring then still uses the dataset's scorer.

Scoring: the one extractor takes the text after "The answer is" (or "Answer:"), else the last number (numeric
datasets) or the last line; the dataset's own `score_answer` scores it. `score` is that raw score (some scorers
give partial credit), `accuracy` (the reward) is 1 only for a full score. A numeric answer equal to the gold as a
number ("1,000.0" vs "1000") is passed to the scorer in the gold's own spelling.

Targets: gsm_symbolic's chain of thought (`metadata["answer_cot"]`) ending in "The answer is N."; for other
datasets "The answer is {answer}.", or "The answer is:" with the answer on the lines below when it spans lines
or ends in a period (the extractor reads such a block verbatim). Datasets that check answers instead of giving
one (answer None, e.g. graph_color) get empty answer and target strings.

Model output is never executed. Some reasoning-gym scorers hand the answer to Python's `eval` (string_insertion,
spiral_matrix, binary_matrix, n_queens, number_sorting) or to sympy's `parse_expr`, which is `eval` too
(simple_integration, intermediate_integration, polynomial_multiplication, puzzle24, countdown). For the first
group `eval` is replaced, for the length of the scoring call, by `ast.literal_eval` (lists and strings still read,
nothing runs); for the second the answer goes to the scorer only if it is a plain arithmetic expression
(`is_plain_math`: numbers, one-letter symbols, a few math functions, small literal exponents), else it scores 0.
"""

from __future__ import annotations

import ast
import contextlib
import sys
import threading
from typing import Any

from .answers import answer_span, clean_span, is_number, last_line, last_number, normalize_number
from .base import Example, Task
from .data_io import OnBadRow, RowError, read_table
from .gsm8k import rationale_to_target
from .hub import check_split

TEST_SEED_OFFSET = 10_000_000
# Datasets whose scorer calls `eval` on the answer (or on the gold answer), and those that call sympy's
# `parse_expr` on it. tests/test_reliability.py scans reasoning-gym's source so that a new one cannot slip by.
EVAL_SCORERS = frozenset({"string_insertion", "spiral_matrix", "binary_matrix", "n_queens", "number_sorting"})
SYMPY_SCORERS = frozenset(
    {"simple_integration", "intermediate_integration", "polynomial_multiplication", "puzzle24", "countdown"}
)
_MATH_FUNCTIONS = frozenset({"sqrt", "exp", "log", "ln", "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh",
                             "tanh", "Abs", "pi", "oo", "E", "I"})
_MATH_OPERATORS = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow, ast.BitXor, ast.USub, ast.UAdd)
_MAX_EXPONENT = 100
# Scoring threads take turns while a module's `eval` is replaced, so none can restore it under another's feet.
_EVAL_LOCK = threading.Lock()
_MAX_MATH_CHARS = 1000
# Items looked at to decide whether a dataset's answers are numbers.
_NUMERIC_PROBE = 8


def reasoning_gym_names() -> list[str]:
    """All registered reasoning-gym dataset names."""
    import reasoning_gym  # deferred: importing every generator takes about a second

    return sorted(reasoning_gym.factory.DATASETS)


class ReasoningGymTask(Task):
    max_new_tokens = 256

    @staticmethod
    def option_names(dataset: str) -> list[str]:
        """This task's own options and the dataset config's fields (its seed and size are set from ours)."""
        import dataclasses

        import reasoning_gym

        if dataset not in reasoning_gym.factory.DATASETS:
            raise ValueError(f"unknown reasoning-gym dataset {dataset!r}; available: {', '.join(reasoning_gym_names())}")
        config = reasoning_gym.factory.DATASETS[dataset][1]
        own = ["size", "test_size", "seed", "numeric", "on_bad_row", "max_new_tokens"]
        return own + [f.name for f in dataclasses.fields(config) if f.name not in ("seed", "size")]

    def __init__(
        self,
        name: str,
        size: int = 2000,
        test_size: int = 500,
        seed: int = 0,
        numeric: bool | None = None,
        on_bad_row: OnBadRow = "error",
        max_new_tokens: int | None = None,
        **config: Any,
    ) -> None:
        import reasoning_gym

        self.dataset = name.removeprefix("rg:")
        self.name = f"rg:{self.dataset}"
        if self.dataset not in reasoning_gym.factory.DATASETS:
            raise ValueError(
                f"unknown reasoning-gym dataset {self.dataset!r}; available: {', '.join(reasoning_gym_names())}"
            )
        if not 0 < size <= TEST_SEED_OFFSET or test_size <= 0:
            raise ValueError(f"need 0 < size <= {TEST_SEED_OFFSET} and test_size > 0, got {size}, {test_size}")
        self.size, self.test_size, self.seed, self.config = size, test_size, seed, config
        self.on_bad_row = on_bad_row
        # Chain-of-thought targets need room; one-line answers ("The answer is 7.") do not.
        self.max_new_tokens = max_new_tokens or (256 if self.dataset == "gsm_symbolic" else 64)
        self._train = self._create(seed, size)  # also validates the config options early
        self._train_questions: set[str] | None = None
        if numeric is None:
            probe = [self._train[i]["answer"] for i in range(min(_NUMERIC_PROBE, size))]
            numeric = all(a is not None and is_number(str(a)) for a in probe)
        self.numeric = numeric
        self.metrics = ("accuracy", "score")
        self.default_prompt = (
            "Solve the problem step by step. End with 'The answer is N.' where N is the final number."
            if numeric
            else "Solve the problem. End with 'The answer is X.' where X is your final answer."
        )

    def _create(self, seed: int, size: int):
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(self.dataset, seed=seed, size=size, **self.config)
        except (TypeError, ValueError, AssertionError) as e:  # an unknown option, or a value its config rejects
            raise ValueError(f"bad option for reasoning-gym dataset {self.dataset!r}: {e}") from None

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        if path is not None:
            rows = read_table(path, ("question", "answer"), self.on_bad_row, validate=_validate)
            return [
                self._example(str(row.get("id", f"{split}-{i}")), {"question": row["question"], "answer": row["answer"],
                                                                   "metadata": row.get("metadata") or {}}, row.origin)
                for i, row in enumerate(rows[:limit])
            ]
        elif check_split(split) == "train":
            count = self.size if limit is None else min(limit, self.size)
            entries = [(f"train-{i}", self._train[i]) for i in range(count)]
        else:
            entries = self._test_entries(self.test_size if limit is None else min(limit, self.test_size))
        return [self._example(id_, entry) for id_, entry in entries]

    def _test_entries(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        if self._train_questions is None:
            self._train_questions = {self._train[i]["question"] for i in range(self.size)}
        # The pool depends on test_size only, never on `limit`, so a limited load is a prefix of the full one.
        pool = 2 * self.test_size + 100
        test = self._create(self.seed + TEST_SEED_OFFSET, pool)
        entries = []
        for i in range(pool):
            if len(entries) == count:
                break
            entry = test[i]
            if entry["question"] not in self._train_questions:
                entries.append((f"test-{i}", entry))
        if len(entries) < count:
            raise ValueError(
                f"{self.name}: only {len(entries)} of {pool} generated test questions are absent from the "
                f"{self.size} train questions; lower test_size or size, or widen the dataset's config"
            )
        return entries

    def _example(self, id_: str, entry: dict[str, Any], origin: tuple[str, int, str] | None = None) -> Example:
        answer = "" if entry["answer"] is None else str(entry["answer"])
        return Example(id=id_, question=entry["question"], answer=answer, target=self._target(entry, answer),
                       meta={"entry": entry}, origin=origin or (f"{self.name} item {id_}", None, "item"))

    def _target(self, entry: dict[str, Any], answer: str) -> str:
        cot = (entry.get("metadata") or {}).get("answer_cot")
        if isinstance(cot, str):
            try:
                return rationale_to_target(cot)[0]
            except ValueError:
                pass  # a chain of thought without a final "#### N": fall back to the bare answer
        if not answer:
            return ""
        # The one-line form loses a final period or emphasis-like characters to `clean_span`; the block form
        # is read back verbatim.
        if "\n" in answer.strip() or clean_span(answer) != answer.strip():
            return f"The answer is:\n{answer.strip()}"
        return f"The answer is {answer.strip()}."

    def extract(self, output: str) -> dict[str, str | None]:
        found = answer_span(output)
        if found is None:
            found = last_number(output) if self.numeric else last_line(output)
        return {"accuracy": found}

    def score(self, output: str, example: Example) -> dict[str, float]:
        found = self.extract(output)["accuracy"]
        gold = example.answer
        if found is not None and gold and is_number(found) and is_number(gold):
            if normalize_number(found) == normalize_number(gold):
                found = gold
        entry = example.meta.get("entry") or {"question": example.question, "answer": gold, "metadata": {}}
        source = (entry.get("metadata") or {}).get("source_dataset", self.dataset)  # composite: the item's own
        if source in SYMPY_SCORERS and found is not None and not is_plain_math(found):
            raw = 0.0  # parse_expr would run it as Python
        else:
            try:
                with _literal_eval_only(source):
                    raw = float(self._train.score_answer(found, entry))
            except Exception:  # a dataset scorer that chokes on odd text scores it as wrong
                raw = 0.0
        raw = min(max(raw, 0.0), 1.0)
        return {"accuracy": float(raw >= 1.0), "score": raw}


def _validate(row: dict[str, Any]) -> None:
    if "metadata" in row and row["metadata"] is not None and not isinstance(row["metadata"], dict):
        raise RowError("metadata", f"expected a JSON object, got {type(row['metadata']).__name__}")


@contextlib.contextmanager
def _literal_eval_only(dataset: str):
    """Within the block, the dataset's module resolves `eval` to `ast.literal_eval` (module globals come before
    builtins), so its scorer can still read "['a', 'b']" but never runs an answer."""
    if dataset not in EVAL_SCORERS:
        yield
        return
    import reasoning_gym

    module = sys.modules[reasoning_gym.factory.DATASETS[dataset][0].__module__]
    missing = object()
    with _EVAL_LOCK:
        previous = module.__dict__.get("eval", missing)
        module.eval = ast.literal_eval
        try:
            yield
        finally:
            if previous is missing:
                del module.eval
            else:
                module.eval = previous


def is_plain_math(text: str) -> bool:
    """Whether `text` is an arithmetic expression that sympy can evaluate without running code or hanging: numbers,
    one-letter symbols, calls of a few math functions, + - * / // % ^, and powers whose exponent is a symbol or
    a literal of at most 100 that are not stacked on another numeric power (9**9**9 would take hours)."""
    if len(text) > _MAX_MATH_CHARS:
        return False
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return False

    def numeric_power(node) -> bool:
        return any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow) and not _symbolic(n.right)
                   for n in ast.walk(node))

    try:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Expression, ast.Load, *_MATH_OPERATORS)):
                continue
            if isinstance(node, ast.Constant):
                if type(node.value) not in (int, float):
                    return False
            elif isinstance(node, ast.Name):
                if not (len(node.id) == 1 and node.id.isascii() or node.id in _MATH_FUNCTIONS):
                    return False
            elif isinstance(node, ast.Call):
                if not (isinstance(node.func, ast.Name) and node.func.id in _MATH_FUNCTIONS) or node.keywords:
                    return False
            elif isinstance(node, ast.BinOp):
                if isinstance(node.op, ast.Pow) and not _symbolic(node.right):
                    exponent = _literal_number(node.right)
                    if exponent is None or abs(exponent) > _MAX_EXPONENT or numeric_power(node.left):
                        return False
            elif not isinstance(node, ast.UnaryOp):
                return False
    except RecursionError:
        return False
    return True


def _symbolic(node) -> bool:
    return isinstance(node, ast.Name)


def _literal_number(node) -> float | None:
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    return None

"""HotpotQA (distractor setting): multi-hop questions over ten Wikipedia paragraphs, scored by EM and F1.

    task = get_task("hotpotqa", max_context_chars=4000)
    test = task.load("test")            # hotpotqa/hotpot_qa, config "distractor", validation split
    test = task.load("test", path="hotpot_dev_distractor.jsonl")
    task.score("The answer is the Eiffel Tower.", test[0])       # {"em": 1.0, "f1": 1.0}

Rows have `id` (or `_id`, as in the original release), `question`, `answer` and `context`, either in the hub's
form {"title": [...], "sentences": [[...], ...]} or the original [[title, [sentence, ...]], ...];
`supporting_facts` (either form) is optional. The Example's `question` is the paragraphs, each headed by its
title, then the question. Options: `max_context_chars` (default 4000) truncates the paragraphs (cutting the last
one that does not fit, marked "..."), and `paragraphs="supporting"` keeps only the gold paragraphs (an oracle
setting; the default "all" is the distractor setting). From the hub "test" is the validation split, since the
hub's test split has no answers.

EM and F1 follow the official HotpotQA script (SQuAD normalisation: lowercase, drop punctuation and the articles
a/an/the, collapse whitespace; a yes/no/noanswer mismatch scores F1 0). The extractor takes the text after the
last "The answer is" or "Answer:", else the first non-empty line.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any, Literal

from .answers import answer_span, first_line
from .base import Example, Task
from .data_io import OnBadRow, RowError, read_table
from .hub import check_split, hub_split_rows

_ARTICLES_RE = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES_RE.sub(" ", text).split())


def exact_match(prediction: str | None, gold: str) -> float:
    return float(prediction is not None and normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str | None, gold: str) -> float:
    if prediction is None:
        return 0.0
    pred, truth = normalize_answer(prediction), normalize_answer(gold)
    # The official script gives no partial credit on yes/no questions.
    if (pred in ("yes", "no", "noanswer") or truth in ("yes", "no", "noanswer")) and pred != truth:
        return 0.0
    pred_tokens, truth_tokens = pred.split(), truth.split()
    same = sum((Counter(pred_tokens) & Counter(truth_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def extract_short_answer(output: str) -> str | None:
    span = answer_span(output)
    return span if span is not None else first_line(output)


class HotpotQATask(Task):
    name = "hotpotqa"
    default_prompt = (
        "Answer the question using the paragraphs. End with 'The answer is X.' where X is a short answer "
        "(a name, a phrase, yes or no)."
    )
    metrics = ("em", "f1")
    max_new_tokens = 64
    stop_strings = ("\n\nQuestion:",)

    HUB_ID, HUB_CONFIG = "hotpotqa/hotpot_qa", "distractor"
    HUB_SPLITS = {"train": "train", "test": "validation"}

    def __init__(
        self,
        max_context_chars: int = 4000,
        paragraphs: Literal["all", "supporting"] = "all",
        on_bad_row: OnBadRow = "error",
    ) -> None:
        if paragraphs not in ("all", "supporting"):
            raise ValueError(f"paragraphs must be 'all' or 'supporting', not {paragraphs!r}")
        self.max_context_chars, self.paragraphs, self.on_bad_row = max_context_chars, paragraphs, on_bad_row

    def load(self, split: str, path: str | None = None, limit: int | None = None) -> list[Example]:
        if path is not None:
            rows = read_table(path, ("question", "answer"), self.on_bad_row, id_field="id", validate=_validate)
        else:
            hub_split = self.HUB_SPLITS[check_split(split)]
            rows = hub_split_rows(self.HUB_ID, self.HUB_CONFIG, hub_split, ("question", "answer"), self.on_bad_row,
                                  id_field="id", validate=_validate)
        return [self._example(row) for row in rows[:limit]]

    def _example(self, row: dict[str, Any]) -> Example:
        paragraphs = row["context"]
        if self.paragraphs == "supporting" and row["supporting_titles"]:
            paragraphs = [p for p in paragraphs if p[0] in row["supporting_titles"]]
        context = format_context(paragraphs, self.max_context_chars)
        answer = row["answer"].strip()
        return Example(
            id=row["id"],
            question=f"{context}\n\nQuestion: {row['question'].strip()}",
            answer=answer,
            target=f"The answer is {answer}.",
            meta={key: row[key] for key in ("type", "level") if key in row} | {"supporting": row["supporting_titles"]},
            origin=getattr(row, "origin", None),
        )

    def extract(self, output: str) -> dict[str, str | None]:
        found = extract_short_answer(output)
        return {"em": found, "f1": found}

    def score(self, output: str, example: Example) -> dict[str, float]:
        found = self.extract(output)["em"]
        return {"em": exact_match(found, example.answer), "f1": f1_score(found, example.answer)}


def format_context(paragraphs: list[tuple[str, list[str]]], max_chars: int) -> str:
    text = "\n\n".join(f"{title}: {''.join(sentences).strip()}" for title, sentences in paragraphs)
    return text if len(text) <= max_chars else text[:max_chars].rstrip() + " ..."


def _validate(row: dict[str, Any]) -> None:
    if "id" not in row and "_id" in row:
        row["id"] = row["_id"]
    row["context"] = _paragraphs(row.get("context"))
    row["supporting_titles"] = _supporting_titles(row.get("supporting_facts"))


def _paragraphs(context: Any) -> list[tuple[str, list[str]]]:
    if context is None:
        raise RowError("context", "missing field")
    if isinstance(context, dict):  # the hub's columnar form
        titles, sentences = context.get("title"), context.get("sentences")
        if not isinstance(titles, list) or not isinstance(sentences, list) or len(titles) != len(sentences):
            raise RowError("context", "expected {'title': [...], 'sentences': [[...], ...]} of equal lengths")
        pairs = list(zip(titles, sentences))
    elif isinstance(context, list):  # the original [[title, [sentence, ...]], ...]
        if not all(isinstance(p, list) and len(p) == 2 for p in context):
            raise RowError("context", "expected a list of [title, [sentence, ...]] pairs")
        pairs = [(p[0], p[1]) for p in context]
    else:
        raise RowError("context", f"expected a list or an object, got {type(context).__name__}")
    for title, sentences in pairs:
        if not (isinstance(title, str) and isinstance(sentences, list) and all(isinstance(s, str) for s in sentences)):
            raise RowError("context", "each paragraph needs a string title and a list of string sentences")
    if not pairs:
        raise RowError("context", "no paragraphs")
    return pairs


def _supporting_titles(facts: Any) -> list[str]:
    if facts is None:
        return []
    if isinstance(facts, dict) and isinstance(facts.get("title"), list):
        titles = facts["title"]
    elif isinstance(facts, list) and all(isinstance(f, list) and f for f in facts):
        titles = [f[0] for f in facts]
    else:
        raise RowError("supporting_facts", "expected {'title': [...], 'sent_id': [...]} or [[title, sent_id], ...]")
    # Keep first-seen order without repeats: a title appears once per supporting sentence.
    return list(dict.fromkeys(t for t in titles if isinstance(t, str)))

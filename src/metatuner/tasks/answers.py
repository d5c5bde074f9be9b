"""Text helpers that the task checkers share: finding an answer in a model output and normalising it.

    answer_span("Some work.\\nThe answer is $1,000.")   # "$1,000"
    normalize_number("$1,000.00")                        # "1000"
    last_number("3 + 4 = 7, so 7.")                      # "7"
    numbers_in("add 1,000 and 7.")                        # {"1000", "7"}
    last_boxed("\\\\boxed{\\\\frac{1}{2}}")                  # "\\\\frac{1}{2}"

Every function takes arbitrary text and never raises; the finders return None when nothing is found.
"""

from __future__ import annotations

import re

# "The answer is", "the final answer is", "Answer:" (case-insensitive); the answer follows on the same line,
# or on the next lines when the marker ends its line ("The answer is:\n<a grid>").
_ANSWER_MARKER_RE = re.compile(r"(?:\banswer[ \t]+is[ \t]*:?|\banswer[ \t]*:)[ \t]*", re.IGNORECASE)
# lm-eval's "flexible-extract" number pattern for GSM8K.
FLEXIBLE_NUMBER_RE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
_PLAIN_NUMBER_RE = re.compile(r"(-?)(\d*)(?:\.(\d*))?")
_BOX_COMMANDS = ("\\boxed", "\\fbox")


def answer_span(output: str) -> str | None:
    """The text after the last answer marker: the rest of its line (cleaned with `clean_span`), else the block
    below it up to a blank line (verbatim, stripped of surrounding whitespace)."""
    last = None
    for last in _ANSWER_MARKER_RE.finditer(output):
        pass
    if last is None:
        return None
    line, _, below = output[last.end():].partition("\n")
    span = clean_span(line)
    if not span:
        # A block answer (a grid, a sentence that ends in a period) is taken verbatim.
        span = below.strip("\n").split("\n\n", 1)[0].strip()
    return span or None


def clean_span(text: str) -> str:
    """Strip whitespace, markdown emphasis, enclosing quotes and one sentence-final period ("**Paris**." -> "Paris")."""
    previous = None
    while text != previous:  # the wrappers nest in any order, so peel until nothing changes
        previous = text
        text = text.strip().strip("*`").strip()
        # Quotes and "_" (italics, but also a legitimate first character) only go in pairs.
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'_":
            text = text[1:-1]
        if text.endswith(".") and not text.endswith(".."):
            text = text[:-1]
    return text


def first_line(output: str) -> str | None:
    for line in output.split("\n"):
        if line.strip():
            return clean_span(line) or None
    return None


def last_line(output: str) -> str | None:
    for line in reversed(output.split("\n")):
        if line.strip():
            return clean_span(line) or None
    return None


def normalize_number(text: str) -> str:
    """Canonical text of a number ("$1,000.50" -> "1000.5", "18.00" -> "18", "-0" -> "0").

    Commas, dollar signs, surrounding space and trailing periods go first (as lm-eval's GSM8K filters do); text
    that is then not a plain decimal number is returned in that stripped form, so it can still compare as text.
    Equal numbers get equal strings, so numeric equality is string equality, with no float rounding.
    """
    # Trailing periods and space in any order ("5. ." too), so that the result is its own normal form.
    text = re.sub(r"[\s.]+$", "", text.replace(",", "").replace("$", "")).strip()
    match = _PLAIN_NUMBER_RE.fullmatch(text)
    if match is None or not (match.group(2) or match.group(3)):
        return text
    sign, whole, fraction = match.group(1), match.group(2).lstrip("0") or "0", (match.group(3) or "").rstrip("0")
    number = f"{whole}.{fraction}" if fraction else whole
    return number if number == "0" else sign + number  # "-0" is 0


def is_number(text: str) -> bool:
    """Whether `normalize_number(text)` is a plain decimal number."""
    normalized = normalize_number(text)
    return bool(normalized) and _PLAIN_NUMBER_RE.fullmatch(normalized) is not None


def _numbers(text: str) -> list[str]:
    """lm-eval's flexible-extract matches in order, without those with no digit (lm-eval would also take "..." or
    "$,"; a match without a digit is never a number that was meant)."""
    found = (match.group(1) or match.group(2) for match in FLEXIBLE_NUMBER_RE.finditer(text))
    return [n for n in found if any(c.isdigit() for c in n)]


def last_number(output: str) -> str | None:
    """The last number in the text, normalised (lm-eval's flexible extract, skipping matches with no digit)."""
    found = _numbers(output)
    return normalize_number(found[-1]) if found else None


def numbers_in(text: str) -> set[str]:
    """Every number in the text, normalised ("add 1,000 and 7." -> {"1000", "7"}); a minus sign counts only when it
    touches the digits ("38 - 57" -> {"38", "57"}, "is -19" -> {"-19"})."""
    return {normalize_number(n) for n in _numbers(text)}


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (or \\fbox{...}) with nested braces; "\\boxed 5" also counts."""
    starts = sorted(i for command in _BOX_COMMANDS for i in _find_all(text, command))
    for start in reversed(starts):
        content = _box_content(text, start + len("\\boxed" if text.startswith("\\boxed", start) else "\\fbox"))
        if content:
            return content
    return None


def _box_content(text: str, i: int) -> str | None:
    if text.startswith("{", i):
        depth = 0
        for j in range(i, len(text)):
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip() or None
        return None  # unbalanced: the output was cut off inside the box
    if text.startswith(" ", i):
        match = re.match(r" +([^\s$]+)", text[i:])
        return match.group(1) if match else None
    return None


def _find_all(text: str, needle: str) -> list[int]:
    found, i = [], text.find(needle)
    while i != -1:
        found.append(i)
        i = text.find(needle, i + 1)
    return found

"""Answers and choices as the reference layouts spell them, brought to one form: `choices`
is a list of texts and `answer` is the gold text (a choice's text when there are choices;
numbers written one way, so that "32", "32.0" and "32.00" are the same answer)."""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[-+]?\.\d+")
_EMBEDDED = re.compile(r"\s*Answer Choices:\s*\n")
_CHOICE_LINE = re.compile(r"([A-Z])\. (.*)")
_LETTER_ANSWER = re.compile(r"\(?([A-Za-z])\)?(?:[.:]?\s+(.*))?", re.S)


def normalize_number(text: str) -> str | None:
    """The canonical spelling of a number ("1,080" -> "1080", "32.0" -> "32",
    "2.50" -> "2.5"), or None when `text` is not a number."""
    text = text.strip()
    if not _NUMBER.fullmatch(text):
        return None
    try:
        value = Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def gold_answer(raw: str, choices: list[str] = ()) -> tuple[str, dict[str, str]]:
    """The answer to store and the meta to keep. With choices the answer is a choice's text
    and stays as written; without, numbers are normalised and the original spelling is
    kept in meta["answer_raw"] when it changed."""
    if choices:
        return raw, {}
    number = normalize_number(raw)
    answer = raw.strip() if number is None else number
    return answer, ({"answer_raw": raw} if answer != raw else {})


def split_embedded_choices(text: str) -> tuple[str, list[str]] | None:
    """`Q? Answer Choices:\\nA. x\\nB. y\\n` -> ("Q?", ["x", "y"]); None unless every line
    after the marker is a lettered choice in order A, B, C..."""
    parts = _EMBEDDED.split(text, maxsplit=1)
    if len(parts) != 2:
        return None
    question, block = parts
    lines = [ln for ln in block.split("\n") if ln.strip()]
    choices = []
    for i, line in enumerate(lines):
        m = _CHOICE_LINE.fullmatch(line.strip())
        if not m or m.group(1) != chr(ord("A") + i):
            return None
        choices.append(m.group(2).strip())
    return (question.strip(), choices) if choices else None


def letter_answer(raw: str, choices: list[str]) -> str | None:
    """The choice text a lettered answer names ("A. ignore", "A", "(a)"), or None when it
    names no choice or its text contradicts the choice at that letter."""
    m = _LETTER_ANSWER.fullmatch(raw.strip())
    if not m:
        return None
    index = ord(m.group(1).lower()) - ord("a")
    if not 0 <= index < len(choices):
        return None
    said = (m.group(2) or "").strip().rstrip(".")
    if said and said.casefold() != choices[index].casefold():
        return None
    return choices[index]


def split_context(question: str) -> tuple[str | None, str]:
    """PubMedQA writes the abstract's sections and then the question, separated by " \\n ":
    the last paragraph is the question, the rest the context."""
    parts = question.split(" \n ")
    if len(parts) < 2:
        return None, question
    return "\n".join(p.strip() for p in parts[:-1]), parts[-1].strip()


def same_text(a: str, b: str) -> bool:
    """Equal up to case and runs of whitespace."""
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()

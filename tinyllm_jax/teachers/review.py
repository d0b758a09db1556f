"""Peer review (FAIR): a teacher's reply to the review prompt read as a 1-5 score, and the
committee's verdict on a rationale.

How a reply is read (`parse_score`):

    "[4]", "Score: [5]."          4, 5: the number in the LAST pair of square brackets
    "[4/5]", "[ 4 / 5 ]"          4: a fraction's numerator (a score out of 5)
    "[3] ... final: [5]"          5: two bracketed scores, the last one is the verdict
    "I give it 4"                 unparseable: the prompt asks for brackets, and a bare
                                  number may be one the rationale itself contains
    "[7]", "[0]"                  out of range: not a 1-5 score
    "[3.5]"                       3.5: a decimal score is kept
    "", "  "                      empty: the reviewer answered nothing (a content filter,
                                  a reasoning model out of tokens)

Empty, unparseable and out-of-range replies are counted and reported; they are never a
silent 0 and never drop the reviewer from the verdict. A reviewer asked for several review
samples scores the mean of its valid ones (`combine`). A rationale is accepted when the mean
of its reviewers' valid scores is above the threshold (the reference's 3: "(4, 3)" passes),
and rejected when it has no valid score at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_SCORE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(?:/\s*\d+(?:\.\d+)?\s*)?$")

MIN_SCORE, MAX_SCORE = 1.0, 5.0


@dataclass(frozen=True)
class Score:
    value: float | None  # None when the reply gives no valid score
    status: str  # "ok", "empty", "unparseable" or "out of range"


def parse_score(reply: str) -> Score:
    """The reviewer's 1-5 score from its reply (see the module docstring)."""
    if not (reply or "").strip():
        return Score(None, "empty")
    scored = [m.group(1) for m in _BRACKETS.finditer(reply or "") if _SCORE.match(m.group(1))]
    if not scored:
        return Score(None, "unparseable")
    value = float(_SCORE.match(scored[-1]).group(1))
    if not MIN_SCORE <= value <= MAX_SCORE:
        return Score(None, "out of range")
    return Score(value, "ok")


def accepted(scores: Sequence[Score], threshold: float = 3.0) -> bool:
    """Accepted when the mean of the valid scores is above `threshold`."""
    valid = [s.value for s in scores if s.value is not None]
    return bool(valid) and sum(valid) / len(valid) > threshold


def combine(replies: Sequence[Score]) -> Score:
    """One reviewer's score from its replies (one a review sample): the mean of the valid
    ones, else the status of its first reply (e.g. "empty")."""
    valid = [s.value for s in replies if s.value is not None]
    if valid:
        return Score(sum(valid) / len(valid), "ok")
    return replies[0] if replies else Score(None, "empty")

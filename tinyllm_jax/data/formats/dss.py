"""Distilling step-by-step layout (google-research/distilling-step-by-step): `{d}/{d}_{split}.json`
gold rows (CQA adds CoS-E's `abstractive_explanation` and `extractive_explanation`, kept in
meta) and `{d}/llm/{split}_CoT_{k}.json` raw PaLM few-shot continuations joined by position:

    <rationale> So the answer is (d) <choice>.\\n\\nQ: <a question PaLM made up>...

The rationale is the text before `So the answer is`; what follows the first `Q:` is PaLM
continuing the few-shot pattern and is dropped. Teacher: "palm". The continuation does not
repeat the gold question, so the join is checked by the choice text the teacher names.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tinyllm_jax.data.formats import positional
from tinyllm_jax.data.formats.answers import same_text, split_context
from tinyllm_jax.data.formats.build import add_rationale
from tinyllm_jax.data.formats.report import SplitReport
from tinyllm_jax.data.records import make_record

PALM = "palm"
_SO = "So the answer is"
_NEXT_Q = re.compile(r"(?:^|\n)Q:")
_STATED = re.compile(r"\s*\(([a-z])\)\s*(.*?)\.?\s*")
_EXPLANATIONS = ("abstractive_explanation", "extractive_explanation")


def parse_palm(text: str) -> tuple[str, list[str], str | None]:
    """(rationale, stated letters, stated choice text when exactly one choice is named)."""
    m = _NEXT_Q.search(text)
    head = text[: m.start()] if m else text
    before, so, after = head.partition(_SO)
    stated = after.split("\n")[0] if so else ""
    letters = re.findall(r"\(([a-z])\)", stated)
    single = _STATED.fullmatch(stated)
    return before.strip(), letters, (single.group(2) or None) if single and len(letters) == 1 else None


def convert(root: Path) -> list[tuple[SplitReport, list[dict[str, Any]]]]:
    return positional.convert_all(root, "distilling step-by-step", convert_split)


def convert_split(root: Path, folder: Path, split: str) -> tuple[SplitReport, list[dict[str, Any]]]:
    d = folder.name
    rep, gold, strings, counts = positional.open_split(root, folder, split)
    palm = rep.teacher(PALM)
    palm.read = len(strings)
    if not gold:
        return rep, []
    counts.update(stated_choice_matches_row=0, stated_choice_is_another=0, stated_text_not_a_choice=0,
                  stated_choice_unverifiable=0)
    palm.agree_gold = 0
    records = []
    for i, row in enumerate(gold):
        source_id, question, choices, answer = positional.choice_row(row)
        context, short_question = split_context(question)
        meta = {"format": "dss", "dataset": d, "split": split, "source_id": source_id}
        meta |= {k: row.value[k] for k in _EXPLANATIONS if isinstance(row.value.get(k), str)}
        record = make_record(f"{d}-{split}-{i}", short_question, answer, choices, context, meta=meta)
        if i < len(strings):
            rationale, letters, text = parse_palm(strings[i].value)
            index = ord(letters[0]) - ord("a") if len(letters) == 1 else -1
            said = choices[index] if 0 <= index < len(choices) else None
            verdict = _check(text, said, choices)
            counts[verdict] += 1
            if verdict not in ("stated_choice_matches_row", "stated_choice_unverifiable"):
                said = None  # the letter and the text disagree: no answer can be read
            palm.agree_gold += said == answer
            if rationale:
                add_rationale(record, PALM, rationale, {"where": positional.relative(strings[i].where, root)}, said)
            else:
                palm.drop("empty")
        records.append(record)
    return rep, records


def _check(text: str | None, said: str | None, choices: list[str]) -> str:
    """Which alignment count a teacher string adds to: does the choice text it names match
    this gold row's choice at the letter it names?"""
    if text is None or said is None:
        return "stated_choice_unverifiable"  # several letters, none, or no text after it
    if same_text(text, said):
        return "stated_choice_matches_row"
    if any(same_text(text, c) for c in choices):
        return "stated_choice_is_another"
    return "stated_text_not_a_choice"

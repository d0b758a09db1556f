"""TinyLLM layout (YikunHan42/TinyLLM): `{d}/{d}_{split}.json` gold rows and
`{d}/llm/{split}_CoT_{k}.json` teacher strings joined by position. Each string holds both
teachers:

    <Flan-T5 rationale> Thus, the answer is (c) <choice>\\n\\nQ: <question>\\nAnswer Choices:
    (a) ...  llama rationale: Let's think step by step. <LLaMA-2 rationale>

The `llama rationale:` part is optional (PIQA's strings have none). Teachers: "flan-t5",
"llama". The question inside the string is checked against the gold row's question.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyllm_jax.data.formats import positional
from tinyllm_jax.data.formats.answers import same_text, split_context
from tinyllm_jax.data.formats.build import add_rationale
from tinyllm_jax.data.formats.report import SplitReport
from tinyllm_jax.data.formats.source import Row
from tinyllm_jax.data.records import make_record

FLAN, LLAMA = "flan-t5", "llama"
STEP = "Let's think step by step."
_LLAMA_MARK = "llama rationale:"
_THUS = "Thus, the answer is"
_NEXT_Q = re.compile(r"(?:^|\n)Q:")
_QUESTION = re.compile(r"(?:^|\n)Q: (.*?)\nAnswer Choices:", re.S)
_LETTER = re.compile(r"Thus, the answer is \(([a-z])\)")


@dataclass
class TeacherString:
    flan: str  # "" when there is none
    llama: str | None  # None: no `llama rationale:` part; "": a part with no text
    question: str | None  # the question the string repeats, if it does
    letter: str | None  # Flan-T5's stated choice letter


def parse_teacher_string(text: str) -> TeacherString:
    """Splits one TinyLLM teacher string into its two rationales."""
    head, mark, tail = text.partition(_LLAMA_MARK)
    cuts = [i for i in (head.find(_THUS), _find(_NEXT_Q, head)) if i >= 0]
    flan = clean_rationale(head[: min(cuts)] if cuts else head)
    question = _QUESTION.search(head)
    letter = _LETTER.search(head)
    llama = None
    if mark:
        # a second "Q:" line is the model inventing the next exercise, not reasoning
        llama = clean_rationale(tail)
        if (cut := _find(_NEXT_Q, llama)) >= 0:
            llama = llama[:cut].strip()
    return TeacherString(
        flan, llama, question.group(1) if question else None, letter.group(1) if letter else None
    )


def clean_rationale(text: str) -> str:
    """Drops the prompt's "Let's think step by step." from a rationale; a rationale that is
    only (a cut-off piece of) that phrase, or pandas' "nan", is no rationale."""
    text = text.strip()
    if STEP.startswith(text) or text == "nan":
        return ""
    return text.removeprefix(STEP).strip()


def convert(root: Path) -> list[tuple[SplitReport, list[dict[str, Any]]]]:
    return positional.convert_all(root, "TinyLLM", convert_split)


def convert_split(root: Path, folder: Path, split: str) -> tuple[SplitReport, list[dict[str, Any]]]:
    d = folder.name
    rep, gold, strings, counts = positional.open_split(root, folder, split)
    rep.teacher(FLAN).read = rep.teacher(LLAMA).read = len(strings)
    if not gold:
        return rep, []
    counts.update(question_agrees=0, question_differs=0, question_absent=0)
    rep.teacher(FLAN).agree_gold = 0
    records = []
    for i, row in enumerate(gold):
        source_id, question, choices, answer = positional.choice_row(row)
        context, short_question = split_context(question)
        meta = {"format": "tinyllm", "dataset": d, "split": split, "source_id": source_id}
        record = make_record(f"{d}-{split}-{i}", short_question, answer, choices, context, meta=meta)
        if i < len(strings):
            _attach(record, question, strings[i], rep, counts, positional.relative(strings[i].where, root))
        records.append(record)
    if strings and not any(LLAMA in r["rationales"] for r in records):
        rep.notes.append("no teacher string carries a `llama rationale:` part")
    return rep, records


def _attach(record: dict[str, Any], question: str, string: Row, rep: SplitReport, counts: dict[str, Any],
            where: str) -> None:
    """Adds the two rationales of one teacher string to its gold record, if it is about
    the same question."""
    ts = parse_teacher_string(string.value)
    texts = {FLAN: ts.flan, LLAMA: ts.llama}
    if ts.question is None:
        counts["question_absent"] += 1
    elif same_text(ts.question, question):
        counts["question_agrees"] += 1
    else:
        # a string about another question would teach the wrong reasoning
        counts["question_differs"] += 1
        for teacher, text in texts.items():
            if text is not None:
                rep.teacher(teacher).drop("question differs")
        return
    said = _choice(ts.letter, record["choices"])
    rep.teacher(FLAN).agree_gold += bool(ts.flan) and said == record["answer"]  # of the rationales kept
    for teacher, text in texts.items():
        if text:
            add_rationale(record, teacher, text, {"where": where}, said if teacher == FLAN else None)
        elif text is not None:
            rep.teacher(teacher).drop("empty")


def _choice(letter: str | None, choices: list[str]) -> str | None:
    index = ord(letter) - ord("a") if letter else -1
    return choices[index] if 0 <= index < len(choices) else None


def _find(pattern: re.Pattern, text: str) -> int:
    m = pattern.search(text)
    return -1 if m is None else m.start()

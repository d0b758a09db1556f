"""Mentor-KD layout (2hojae/mentor-kd):

    skeleton/{d}_{split}.json              gold rows {input, answer}
    main/{d}_{n}_{split}.json              teacher chains {input, chain, answer, initial_correct},
                                           up to n a question (main/{d}_{split}.json: the same,
                                           or a bare copy of the gold rows)
    aug/{mentor}/{d}_rand{k}_aug{m}.json   mentor samples on the training questions
                                           {input, chain, completion, answer, initial_correct}

Chains join the gold rows by their question text. Teachers: "teacher" (the LLM's chains)
and "mentor" (the fine-tuned mentor's samples); only chains whose answer was correct
(`initial_correct`) are kept, and the report counts the others. A chain file published
empty means no chains for that dataset and is reported as such. A chain's `completion` (the
answer it ends with: " (F).", " B.", ' "yajo".', " probably no.", "32.0") is read the same
way in every file, as the gold of its dataset is written: a choice's text or letter, a
number, Yes/No, or the bare text; one that states none is counted, not kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyllm_jax.data.formats.answers import gold_answer, letter_answer, normalize_number, split_embedded_choices
from tinyllm_jax.data.formats.build import add_rationale
from tinyllm_jax.data.formats.report import SplitReport, split_rank
from tinyllm_jax.data.formats.source import FormatError, Row, field, is_empty, read_rows
from tinyllm_jax.data.records import make_record

TEACHER, MENTOR = "teacher", "mentor"
_GOLD = re.compile(r"(.+)_([^_]+)\.json")


def convert(root: Path) -> list[tuple[SplitReport, list[dict[str, Any]]]]:
    gold_files = sorted(
        ((m.group(1), m.group(2), p) for p in root.glob("skeleton/*.json") if (m := _GOLD.fullmatch(p.name))),
        key=lambda f: (f[0], split_rank(f[1])),
    )
    if not gold_files:
        raise FormatError(f"{root}: no Mentor-KD data found: expected skeleton/{{d}}_{{split}}.json")
    return [convert_split(root, d, split, path) for d, split, path in gold_files]


@dataclass(frozen=True)
class ChainFile:
    teacher: str
    path: Path
    mentor_model: str | None = None
    may_be_gold_copy: bool = False  # main/{d}_{split}.json: chains, or a bare copy of the gold rows


def chain_files(root: Path, d: str, split: str) -> list[ChainFile]:
    """Every chain file of a dataset split."""
    main = re.compile(rf"{re.escape(d)}_(\d+_)?{re.escape(split)}\.json")
    found = [
        ChainFile(TEACHER, p, may_be_gold_copy=m.group(1) is None)
        for p in sorted(root.glob("main/*.json")) if (m := main.fullmatch(p.name))
    ]
    if split == "train":
        aug = re.compile(rf"{re.escape(d)}_rand\d+_aug\d+\.json")
        found += [
            ChainFile(MENTOR, p, p.parent.name) for p in sorted(root.glob("aug/*/*.json")) if aug.fullmatch(p.name)
        ]
    return found


def gold_record(row: Row, d: str, split: str, index: int) -> dict[str, Any]:
    """A record from a skeleton row: CSQA's embedded choices parsed, letters mapped to the
    choice text, numbers normalised; the original answer kept in meta when it changed."""
    raw_question = field(row, "input")
    raw = str(field(row, "answer", (str, int, float)))
    question, choices = split_embedded_choices(raw_question) or (raw_question.strip(), [])
    if choices:
        text = letter_answer(raw, choices)
        answer, extra = (text, {"answer_raw": raw}) if text is not None and text != raw else (raw, {})
    else:
        answer, extra = gold_answer(raw)
    meta = {"format": "mentor-kd", "dataset": d, "split": split, "source_id": str(index)} | extra
    return make_record(f"{d}-{split}-{index}", question, answer, choices, meta=meta)


def convert_split(root: Path, d: str, split: str, gold_path: Path) -> tuple[SplitReport, list[dict[str, Any]]]:
    rep = SplitReport(d, split, gold_file=str(gold_path.relative_to(root)))
    if is_empty(gold_path):
        rep.status = f"not written: gold file {gold_path.name} is empty"
        return rep, []
    gold = read_rows(gold_path)
    rep.rows_read = len(gold)
    records = [gold_record(row, d, split, i) for i, row in enumerate(gold)]
    by_question = {}
    for i, row in enumerate(gold):
        by_question.setdefault(_key(row.value["input"]), i)
    if len(by_question) < len(gold):
        rep.notes.append(f"{len(gold) - len(by_question)} gold questions repeat: their chains join the first")
    for source in chain_files(root, d, split):
        _join_chains(root, rep, records, by_question, source)
    return rep, records


def _join_chains(root: Path, rep: SplitReport, records: list[dict[str, Any]], by_question: dict[str, int],
                 source: ChainFile) -> None:
    """Adds the correct chains of one file to the records their question names."""
    label = str(source.path.relative_to(root))
    if is_empty(source.path):
        rep.teacher(source.teacher)
        rep.alignment[label] = {"join": "question text", "rows": 0}
        rep.notes.append(f"{label} is empty: no {source.teacher} chains for this split")
        return
    rows = read_rows(source.path)
    if source.may_be_gold_copy and isinstance(rows[0].value, dict) and "chain" not in rows[0].value:
        rep.notes.append(f"{label} holds no chains (a copy of the gold rows): not used")
        return
    count = rep.teacher(source.teacher)
    counts = {"join": "question text", "rows": len(rows), "rows_without_gold_row": 0, "answer_differs_from_gold": 0,
              "completion_unreadable": 0}
    for row in rows:
        question, chain = field(row, "input"), field(row, "chain")
        said = str(field(row, "answer", (str, int, float)))
        correct = field(row, "initial_correct", bool)
        count.read += 1
        index = by_question.get(_key(question))
        if index is None:
            counts["rows_without_gold_row"] += 1
            continue
        record = records[index]
        if not _same_answer(said, record):
            counts["answer_differs_from_gold"] += 1
        if not correct:
            count.drop("incorrect")
        elif not chain.strip():
            count.drop("empty")
        elif chain.strip() in record["rationales"].get(source.teacher, ()):
            count.drop("duplicate")  # a sample repeated word for word adds nothing
        else:
            # only initial_correct chains are kept: say so, for the recipes that filter on it
            origin = {"where": f"{label}:{row.where.rsplit(':', 1)[1]}", "correct": True}
            if source.mentor_model:
                origin["model"] = source.mentor_model
            completion = row.value.get("completion")
            stated = stated_answer(completion, record) if isinstance(completion, str) else None
            counts["completion_unreadable"] += isinstance(completion, str) and stated is None
            add_rationale(record, source.teacher, chain, origin, stated)
    counts["questions_with_rows"] = len({_key(r.value["input"]) for r in rows})
    rep.alignment[label] = counts


_EDGES = " \t\n.\"'\u201c\u201d\u2018\u2019"
_A_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_YES_NO = re.compile(r"\b(yes|no)\b", re.I)
_BARE_LETTER = re.compile(r"\(?([A-Za-z])\)?")
_NOT_IN_A_WORD = re.compile(r"[\s.\"'\u201c\u201d\u2018\u2019]")  # what Mentor-KD's evaluator strips (and curly quotes)


def stated_answer(completion: str, record: dict[str, Any]) -> str | None:
    """A chain's completion in the form of the record's gold answer, or None when it states
    none: " (F)." -> "F" (letter gold) or the choice's text (CSQA), "32.0" -> "32",
    " probably no." -> "No", ' "yajo".' -> "yajo", ' "y a a n".' or "YAAN" -> "yaan" (gold "yaan")."""
    text = completion.strip(_EDGES)
    gold = record["answer"]
    raw = record["meta"].get("answer_raw", gold)
    if record["choices"]:
        return letter_answer(text, record["choices"]) or next(
            (c for c in record["choices"] if c.casefold() == text.casefold()), None)
    if re.fullmatch(r"[A-Z]", raw):  # lettered choices written inside the question
        m = _BARE_LETTER.fullmatch(text)
        return m.group(1).upper() if m else None
    if normalize_number(gold) is not None:
        m = _A_NUMBER.search(text)
        return normalize_number(m.group(0)) if m else None
    if gold.casefold() in ("yes", "no"):
        m = _YES_NO.search(text)
        return None if m is None else (m.group(1).capitalize() if gold[:1].isupper() else m.group(1).lower())
    if gold and not re.search(r"\s", gold):  # one word (last-letter concatenation): read as Mentor-KD's evaluator
        word = _NOT_IN_A_WORD.sub("", text)  # reads it, "y a a n" -> "yaan", and compared regardless of case
        return gold if word.casefold() == gold.casefold() else word or None
    return text or None


def _same_answer(said: str, record: dict[str, Any]) -> bool:
    """Does a chain file's `answer` agree with the gold record (as raw text, letter or number)?"""
    raw = record["meta"].get("answer_raw", record["answer"])
    return said in (raw, record["answer"]) or normalize_number(said) == record["answer"]


def _key(question: str) -> str:
    return " ".join(question.split())

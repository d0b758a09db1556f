"""FAIR layout (zhuochunli/Learn-from-Committee), one group of three files per student,
dataset and round, joined by `id`:

    {student}_{d}_false_round{r}.json      the student's wrong answers: the gold rows
                                           {id, question, gold_answer, student_wrong_pred, ...}
    {student}_{d}_feedback_round{r}.json   + {t}_feedback for each teacher t
    {student}_{d}_rationale_round{r}.json  + {t}_rationale: [text, peer score, peer score]
                                           and correct_rationale: [the texts judged correct]

Teachers are named by the fields ("gpt", "gemini", "mistral"). A teacher's rationale is
kept only when it is among `correct_rationale`; its peer scores go to provenance, the
feedback to `feedback`, the student's wrong answer to meta. Round 0 is split "train",
round r > 0 "train_round{r}". The student's name is read up to the first underscore.

The repository publishes round 0 for gsm8k, svamp, strategyQA and logiQA, each with its own
gold (as its `infer_student_wrong.py` writes them), read here per dataset:

    gsm8k       the worked solution ending "#### 72": the number is the answer, the solution
                before it is kept as meta["gold_rationale"]
    strategyQA  "false.\tfact. fact.": the verdict is the answer ("no" / "yes"), the facts go
                to meta["facts"] (not to context: they would hand the student the answer)
    logiQA      {context, question, options, gold_answer: the option's index}: the passage
                goes to context, the options to choices, the answer is the option's text
    svamp       a number
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

from tinyllm_jax.data.formats.answers import gold_answer, normalize_number, same_text
from tinyllm_jax.data.formats.build import add_rationale
from tinyllm_jax.data.formats.report import SplitReport
from tinyllm_jax.data.formats.source import FormatError, Row, field, is_empty, read_rows
from tinyllm_jax.data.records import make_record

FILE_NAME = re.compile(r"(?P<student>[^_]+)_(?P<d>.+)_(?P<kind>false|feedback|rationale)_round(?P<round>\d+)\.json")
_STUDENT_FIELDS = ("student_wrong_pred", "student_wrong_final_answer")


def convert(root: Path) -> list[tuple[SplitReport, list[dict[str, Any]]]]:
    groups: dict[tuple[str, int], dict[str, Path]] = defaultdict(dict)
    students: dict[tuple[str, int], str] = {}
    for path in sorted(root.glob("*.json")):
        if not (m := FILE_NAME.fullmatch(path.name)):
            continue
        key = (m["d"], int(m["round"]))
        if students.setdefault(key, m["student"]) != m["student"]:
            raise FormatError(
                f"{path}: a second student ({m['student']}, after {students[key]}) for {key[0]} round {key[1]}: "
                "convert each student's files from a folder of their own"
            )
        groups[key][m["kind"]] = path
    if not groups:
        raise FormatError(
            f"{root}: no FAIR data found: expected {{student}}_{{d}}_{{false,feedback,rationale}}_round{{r}}.json"
        )
    return [convert_group(root, d, r, students[d, r], files) for (d, r), files in sorted(groups.items())]


def convert_group(root: Path, d: str, round_: int, student: str,
                  files: dict[str, Path]) -> tuple[SplitReport, list[dict[str, Any]]]:
    split = "train" if round_ == 0 else f"train_round{round_}"
    gold_path = files.get("false", root / f"{student}_{d}_false_round{round_}.json")
    rep = SplitReport(d, split, gold_file=gold_path.name)
    if not gold_path.exists() or is_empty(gold_path):
        rep.status = f"not written: gold file {gold_path.name} is {'missing' if not gold_path.exists() else 'empty'}"
        return rep, []
    gold = read_rows(gold_path)
    rep.rows_read = len(gold)
    records = [_gold_record(row, d, split, i, student, round_) for i, row in enumerate(gold)]
    by_id = {r["meta"]["source_id"]: r for r in records}
    if len(by_id) < len(records):
        raise FormatError(f"{gold_path}: {len(records) - len(by_id)} ids repeat: rows cannot be joined by id")
    for kind in ("feedback", "rationale"):
        if kind not in files:
            rep.notes.append(f"no {kind} file for {student} {d} round {round_}")
        else:
            _join(rep, files[kind], kind, by_id)
    bare = sum(1 for r in records if not r["rationales"])
    if bare and "rationale" in files:
        rep.notes.append(f"{bare} records have no correct teacher rationale: written with the answer only")
    return rep, records


def _gold_record(row: Row, d: str, split: str, index: int, student: str, round_: int) -> dict[str, Any]:
    source_id = str(field(row, "id", (str, int)))
    raw = str(field(row, "gold_answer", (str, int, float)))
    reader = _GOLD_READERS.get(d.casefold(), _plain_gold)
    answer, choices, context, extra = reader(row, raw)
    meta = {"format": "fair", "dataset": d, "split": split, "source_id": source_id, "student": student, "round": round_}
    meta |= {k: row.value[k] for k in _STUDENT_FIELDS if k in row.value} | extra
    return make_record(f"{d}-{split}-{index}", field(row, "question"), answer, choices, context, meta=meta)


def _plain_gold(row: Row, raw: str):
    answer, extra = gold_answer(raw)
    return answer, [], None, extra


def _gsm8k_gold(row: Row, raw: str):
    solution, mark, final = raw.rpartition("####")
    number = normalize_number(final) if mark else None
    if number is None:
        raise FormatError(f"{row.where}: field 'gold_answer': expected a GSM8K solution ending '#### <number>', "
                          f"found {raw[-60:]!r}")
    return number, [], None, {"answer_raw": final.strip(), "gold_rationale": solution.strip()}


def _strategyqa_gold(row: Row, raw: str):
    verdict, _, facts = raw.partition("\t")
    verdict = verdict.strip().rstrip(".").strip().casefold()
    if verdict not in _VERDICTS:
        raise FormatError(f"{row.where}: field 'gold_answer': expected 'true.' or 'false.' then the facts, "
                          f"found {raw[:60]!r}")
    return _VERDICTS[verdict], [], None, {"answer_raw": verdict, **({"facts": facts.strip()} if facts.strip() else {})}


def _logiqa_gold(row: Row, raw: str):
    options = field(row, "options", list)
    if not options or not all(isinstance(o, str) for o in options):
        raise FormatError(f"{row.where}: field 'options': expected a list of texts, found {options!r:.80}")
    if not raw.strip().isdigit() or int(raw) >= len(options):
        raise FormatError(f"{row.where}: field 'gold_answer': expected an option index 0-{len(options) - 1}, found {raw!r}")
    context = row.value.get("context")
    return options[int(raw)], options, context.strip() if isinstance(context, str) and context.strip() else None, \
        {"answer_raw": raw}


_VERDICTS = {"true": "yes", "false": "no", "yes": "yes", "no": "no"}
_GOLD_READERS = {"gsm8k": _gsm8k_gold, "strategyqa": _strategyqa_gold, "logiqa": _logiqa_gold}


def _join(rep: SplitReport, path: Path, kind: str, by_id: dict[str, dict[str, Any]]) -> None:
    """Adds one file's feedback or rationales to the records with the same id."""
    rows = read_rows(path)
    counts: dict[str, Any] = {"join": "id", "rows": len(rows), "rows_without_gold_row": 0, "question_differs": 0}
    seen = set()
    for row in rows:
        record = by_id.get(str(field(row, "id", (str, int))))
        if record is None:
            counts["rows_without_gold_row"] += 1
            continue
        seen.add(record["id"])
        if not same_text(field(row, "question"), record["question"]):
            counts["question_differs"] += 1  # same id, another question: not this record's
            continue
        if kind == "feedback":
            _add_feedback(row, record, counts)
        else:
            _add_rationales(row, record, rep, path.name)
    counts["gold_rows_without_row"] = len(by_id) - len(seen)
    rep.alignment[path.name] = counts


def _add_feedback(row: Row, record: dict[str, Any], counts: dict[str, Any]) -> None:
    for key in row.value:
        if key.endswith("_feedback"):
            teacher, text = key.removesuffix("_feedback"), field(row, key)
            counts.setdefault(f"{teacher}_feedback", 0)
            if text.strip():
                record.setdefault("feedback", {})[teacher] = text.strip()
                counts[f"{teacher}_feedback"] += 1


def _add_rationales(row: Row, record: dict[str, Any], rep: SplitReport, name: str) -> None:
    correct = field(row, "correct_rationale", list)
    if not all(isinstance(c, str) for c in correct):
        raise FormatError(f"{row.where}: field 'correct_rationale': expected a list of texts, found {correct!r:.80}")
    for key in row.value:
        if not key.endswith("_rationale") or key == "correct_rationale":
            continue
        teacher, value = key.removesuffix("_rationale"), field(row, key, list)
        if not value or not isinstance(value[0], str) or not all(isinstance(s, (int, float)) for s in value[1:]):
            raise FormatError(f"{row.where}: field {key!r}: expected [text, peer score, ...], found {value!r:.80}")
        count = rep.teacher(teacher)
        count.read += 1
        text, scores = value[0], value[1:]
        if not text.strip():
            count.drop("empty")
        elif text not in correct:
            count.drop("incorrect")
        else:
            origin = {"where": f"{name}:{row.where.rsplit(':', 1)[1]}", "peer_scores": scores}
            add_rationale(record, teacher, text, origin)

"""Mentor-KD layout (2hojae/mentor-kd), the files of its `data/` folder:

    skeleton/{d}_{split}.json              gold rows {input, answer}
    main/{d}_{n}_{split}.json              teacher chains {input, chain, answer, initial_correct},
                                           up to n a question (main/{d}_{split}.json: the same,
                                           or a bare copy of the gold rows)
    aug/{mentor}/{d}_rand{k}_aug{m}.json   mentor samples on the training questions
                                           {input, chain, completion, answer, initial_correct}
    prompt/{d}_{n}.json                    n raw teacher outputs a training question
                                           {instruction, output: [text, ...], label}

A dataset split is converted when any of these files has it (aug/ and prompt/ hold train),
and its files are joined by question text. The gold answer is skeleton/'s; without it, each
question's first `answer` (or `label`) in main/, aug/, prompt/, in that order: every one of
those files carries the gold. Answers that disagree with the gold are counted.

Teachers: "teacher" (the LLM's chains) and "mentor" (the fine-tuned mentor's samples). Only
correct chains are kept: `initial_correct` ones from main/ and aug/, and prompt/ outputs
whose final answer (read below) is the gold one. main/'s chains are the reference's pick of
prompt/'s outputs (3 of 6, all correct), so prompt/'s outputs become teacher chains only for
a split that main/ gives no chains; otherwise they are checked against the gold, noted, and
not added twice. A chain file published empty means no chains for that dataset and is
reported as such. A chain's `completion` (" (F).", " B.", ' "yajo".', " probably no.",
"32.0") and a raw output's last answer are read the same way in every file, as the gold of
its dataset is written: a choice's text or letter, a number, Yes/No, or one word (read as
Mentor-KD's evaluator reads last-letter answers); one that states none is counted, not kept.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from dataclasses import field as dc_field
from pathlib import Path
from typing import Any

from tinyllm_jax.data.formats.answers import gold_answer, letter_answer, normalize_number, split_embedded_choices
from tinyllm_jax.data.formats.build import add_rationale
from tinyllm_jax.data.formats.report import SplitReport, split_rank
from tinyllm_jax.data.formats.source import FormatError, Row, field, is_empty, read_rows
from tinyllm_jax.data.records import make_record

TEACHER, MENTOR = "teacher", "mentor"
LAYOUT_FOLDERS = ("skeleton", "main", "aug", "prompt")
_SPLIT_FILE = re.compile(r"(.+?)_(?:(\d+)_)?([^_]+)\.json")  # {d}_{split} or {d}_{n}_{split}
_AUG_FILE = re.compile(r"(.+)_rand\d+_aug\d+\.json")
_PROMPT_FILE = re.compile(r"(.+)_\d+\.json")


def data_folder(root: Path) -> Path | None:
    """The folder holding the layout: `root`, or the repository's `root/data`; None if neither."""
    for folder in (root, root / "data"):
        if any(p.suffix == ".json" for sub in LAYOUT_FOLDERS for p in (folder / sub).rglob("*.json")):
            return folder
    return None


@dataclass(frozen=True)
class ChainFile:
    teacher: str
    path: Path
    mentor_model: str | None = None
    may_be_gold_copy: bool = False  # main/{d}_{split}.json: chains, or a bare copy of the gold rows


@dataclass
class SplitFiles:
    """Every file of one dataset split."""

    gold: Path | None = None  # skeleton/
    chains: list[ChainFile] = dc_field(default_factory=list)  # main/, then aug/
    prompts: list[Path] = dc_field(default_factory=list)


def discover(root: Path) -> dict[tuple[str, str], SplitFiles]:
    """(dataset, split) -> its files, for every file of a known name."""
    found: dict[tuple[str, str], SplitFiles] = {}
    for p in sorted(root.glob("skeleton/*.json")):
        if m := _SPLIT_FILE.fullmatch(p.name):
            found.setdefault((m.group(1), m.group(3)), SplitFiles()).gold = p
    for p in sorted(root.glob("main/*.json")):
        if m := _SPLIT_FILE.fullmatch(p.name):
            chain = ChainFile(TEACHER, p, may_be_gold_copy=m.group(2) is None)
            found.setdefault((m.group(1), m.group(3)), SplitFiles()).chains.append(chain)
    for p in sorted(root.glob("aug/*/*.json")):
        if m := _AUG_FILE.fullmatch(p.name):
            found.setdefault((m.group(1), "train"), SplitFiles()).chains.append(ChainFile(MENTOR, p, p.parent.name))
    for p in sorted(root.glob("prompt/*.json")):
        if m := _PROMPT_FILE.fullmatch(p.name):
            found.setdefault((m.group(1), "train"), SplitFiles()).prompts.append(p)
    return found


def convert(root: Path) -> list[tuple[SplitReport, list[dict[str, Any]]]]:
    folder = data_folder(root)
    found = discover(folder) if folder is not None else {}
    if not found:
        raise FormatError(f"{root}: no Mentor-KD data found: expected skeleton/{{d}}_{{split}}.json, "
                          "main/{d}_3_train.json, aug/{model}/{d}_rand3_aug3.json or prompt/{d}_6.json "
                          "(the repository's data/ folder)")
    order = sorted(found, key=lambda k: (k[0], split_rank(k[1])))
    return [convert_split(folder, d, split, found[(d, split)]) for d, split in order]


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


def convert_split(root: Path, d: str, split: str, files: SplitFiles) -> tuple[SplitReport, list[dict[str, Any]]]:
    rows = _Rows()
    if files.gold is not None and is_empty(files.gold):
        rep = SplitReport(d, split, gold_file=_relative(files.gold, root))
        rep.status = f"not written: gold file {files.gold.name} is empty"
        return rep, []
    gold, gold_path = (rows(files.gold), files.gold) if files.gold is not None else _gold_from_chain_files(files, rows)
    rep = SplitReport(d, split, gold_file=_relative(gold_path, root))
    if files.gold is None:
        rep.layout = "no skeleton/: questions and gold answers from the chain files"
    rep.rows_read = len(gold)
    records = [gold_record(row, d, split, i) for i, row in enumerate(gold)]
    by_question = {}
    for i, row in enumerate(gold):
        by_question.setdefault(_key(row.value["input"]), i)
    if len(by_question) < len(gold):
        rep.notes.append(f"{len(gold) - len(by_question)} gold questions repeat: their chains join the first")
    main_chains = 0
    for source in files.chains:
        chains = _join_chains(root, rep, records, by_question, source, rows, gold_path)
        main_chains += chains if source.teacher == TEACHER else 0
    for path in files.prompts:
        _join_outputs(root, rep, records, by_question, path, rows, add=not main_chains)
    return rep, records


class _Rows:
    """Each file read once, though the gold and the chains may come from the same one."""

    def __init__(self):
        self._read: dict[Path, list[Row]] = {}

    def __call__(self, path: Path) -> list[Row]:
        if path not in self._read:
            self._read[path] = [] if is_empty(path) else read_rows(path)
        return self._read[path]


def _gold_from_chain_files(files: SplitFiles, rows: _Rows) -> tuple[list[Row], Path]:
    """Without skeleton/: each question once, with the first answer (main/, aug/, then
    prompt/'s label) given for it, in the order the files give them."""
    gold: dict[str, Row] = {}
    first: Path | None = None
    sources = [(c.path, "input", "answer") for c in files.chains] + [(p, "instruction", "label") for p in files.prompts]
    for path, q_key, a_key in sources:
        for row in rows(path):
            question = field(row, q_key)
            if _key(question) not in gold:
                gold[_key(question)] = Row(row.where, {"input": question,
                                                       "answer": field(row, a_key, (str, int, float))})
                first = first or path
    if first is None:
        raise FormatError(f"{sources[0][0].parent}: the files of this dataset hold no rows, so no gold answers")
    return list(gold.values()), first


def _relative(path: Path, root: Path) -> str:
    return str(path.relative_to(root))


def _join_chains(root: Path, rep: SplitReport, records: list[dict[str, Any]], by_question: dict[str, int],
                 source: ChainFile, read: _Rows, gold_path: Path) -> int:
    """Adds the correct chains of one file to the records their question names; returns
    how many chain rows it read."""
    label = _relative(source.path, root)
    if is_empty(source.path):
        rep.teacher(source.teacher)
        rep.alignment[label] = {"join": "question text", "rows": 0}
        rep.notes.append(f"{label} is empty: no {source.teacher} chains for this split")
        return 0
    rows = read(source.path)
    if source.may_be_gold_copy and isinstance(rows[0].value, dict) and "chain" not in rows[0].value:
        used = "the gold rows of this split" if source.path == gold_path else "not used"
        rep.notes.append(f"{label} holds no chains (a copy of the gold rows): {used}")
        return 0
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
    return len(rows)


def _join_outputs(root: Path, rep: SplitReport, records: list[dict[str, Any]], by_question: dict[str, int],
                  path: Path, read: _Rows, add: bool) -> None:
    """prompt/'s raw teacher outputs: checked against the gold by question, and, with `add`,
    those whose final answer is the gold one kept as teacher chains."""
    label = _relative(path, root)
    rows = read(path)
    counts = {"join": "question text", "rows": len(rows), "rows_without_gold_row": 0, "answer_differs_from_gold": 0}
    if not add:
        rep.notes.append(f"{label}: raw outputs of the questions whose chosen chains main/ holds: checked "
                         "against the gold, not added twice")
    count = rep.teacher(TEACHER) if add else None
    for row in rows:
        question, outputs = field(row, "instruction"), field(row, "output", list)
        index = by_question.get(_key(question))
        if index is None:
            counts["rows_without_gold_row"] += 1
            continue
        record = records[index]
        if "label" in row.value and not _same_answer(str(field(row, "label", (str, int, float))), record):
            counts["answer_differs_from_gold"] += 1
        for k, text in enumerate(outputs if count is not None else ()):
            if not isinstance(text, str):
                raise FormatError(f"{row.where}: field 'output': expected a list of strings, found {text!r:.60}")
            count.read += 1
            stated = output_answer(text, record) if text.strip() else None
            if not text.strip():
                count.drop("empty")
            elif stated is None:
                count.drop("no answer")
            elif not _is_gold(stated, record):
                count.drop("incorrect")
            elif text.strip() in record["rationales"].get(TEACHER, ()):
                count.drop("duplicate")
            else:
                where = f"{label}:{row.where.rsplit(':', 1)[1]}"
                add_rationale(record, TEACHER, text, {"where": where, "output": k, "correct": True}, stated)
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


_LETTER_IN_PARENS = re.compile(r"\(([A-Za-z])\)")
_QUOTED = re.compile(r"[\"\u201c]([^\"\u201c\u201d\n]*)[\"\u201d]|(?<!\w)'(\w+)'(?!\w)")  # "ya", 'ya'
_WORD_AFTER = re.compile(r":|=|\bis\b")  # "we get: ya", "y + a = ya", "the result is ya"


def output_answer(text: str, record: dict[str, Any]) -> str | None:
    """The answer a raw teacher output ends with, in the form of the record's gold (as
    `stated_answer`), or None when it states none: the last lettered choice "(B)", the last
    number, the last yes/no; a one-word gold from the last line: the word alone on it, its
    last quoted word, or what follows its last ":", "=" or "is"."""
    gold = record["answer"]
    raw = record["meta"].get("answer_raw", gold)
    if record["choices"] or re.fullmatch(r"[A-Z]", raw):
        letters = _LETTER_IN_PARENS.findall(text)
        said = letters[-1] if letters else None
    elif normalize_number(gold) is not None:
        said = (_A_NUMBER.findall(text) or [None])[-1]
    elif gold.casefold() in ("yes", "no"):
        said = (_YES_NO.findall(text) or [None])[-1]
    elif not re.search(r"\s", gold):
        said = _last_word(text)
    else:
        said = None  # a free-text gold: no telling where a raw output states it
    return stated_answer(said, record) if said else None


def _last_word(text: str) -> str | None:
    last = [line for line in text.strip().split("\n") if line.strip()][-1]
    if len(last.split()) == 1:  # the answer on a line of its own
        return last
    quoted = [a or b for a, b in _QUOTED.findall(last)]
    if quoted:
        return quoted[-1]
    after = _WORD_AFTER.split(last)
    if len(after) > 1:
        return after[-1]
    quoted = [a or b for a, b in _QUOTED.findall(text)]
    return quoted[-1] if quoted else None


def _is_gold(stated: str, record: dict[str, Any]) -> bool:
    number = normalize_number(stated)
    return stated == record["answer"] or number is not None and number == normalize_number(record["answer"])


def _same_answer(said: str, record: dict[str, Any]) -> bool:
    """Does a chain file's `answer` agree with the gold record (as raw text, letter or number)?"""
    raw = record["meta"].get("answer_raw", record["answer"])
    return said in (raw, record["answer"]) or normalize_number(said) == record["answer"]


def _key(question: str) -> str:
    return " ".join(question.split())

"""Distilling step-by-step layout (google-research/distilling-step-by-step): one folder a
dataset, gold rows in `{d}/{d}_{split}.json` (JSON Lines, as `datasets` writes them) and raw
PaLM few-shot continuations in `{d}/llm/{split}_CoT_{k}.json`, joined by position. Each
dataset has its own loader there, and so its own layout here, told by the gold rows' fields:

    choice   CQA: {id, question, choices, answer, abstractive_explanation, extractive_explanation};
             "<rationale> So the answer is (d) <choice>.\\n\\nQ: <a question PaLM made up>..."
    nli      e-SNLI {premise, hypothesis, label 0-2, explanation_1..3} and ANLI {uid, premise,
             hypothesis, label, reason}; e-SNLI strings "<rationale>\\nAnswer: neutral\\n\\nPremise: ...",
             ANLI strings "<rationale> So the answer is contradiction.\\n\\nPremise: ..."
    svamp    SVAMP {input, label: "( 10.0 * 45.0 )"}: "<rationale> The answer is ( 10.0 * 45.0 ). Q: ...";
             or only `svamp/SVAMP.json` (the published source): split as that loader splits it,
             a permutation with seed 0, its first 800 rows train and the rest test, in that order

Splits are the loader's: train and test (CQA and SVAMP, whose validation the reference draws
from train: `data.validation_from_train`), plus valid for e-SNLI and ANLI. The rationale is
the text before the answer sentence, never the answer itself; what follows the next few-shot
question is dropped. Strings cut off before any answer, or caught in a repetition loop, are
dropped with that reason. The answer PaLM states goes to `teacher_answers["palm"]`, read for
the dataset's answer type: a choice's text, an NLI label, or an SVAMP equation or number.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from tinyllm_jax.data.formats import positional
from tinyllm_jax.data.formats.answers import normalize_number, same_text, split_context
from tinyllm_jax.data.formats.build import add_rationale
from tinyllm_jax.data.formats.report import SplitReport
from tinyllm_jax.data.formats.source import FormatError, Row, field, read_rows
from tinyllm_jax.data.records import make_record

PALM = "palm"
NLI_LABELS = ["entailment", "neutral", "contradiction"]  # the loaders' 0, 1, 2
SVAMP_SOURCE = "SVAMP.json"
SVAMP_TRAIN_ROWS, SVAMP_SEED = 800, 0  # the reference loader's split of SVAMP.json
_EXPLANATIONS = ("abstractive_explanation", "extractive_explanation")
_NLI_META = ("uid", "reason", "explanation_1", "explanation_2", "explanation_3")


# --------------------------------------------------------------------------- PaLM strings


@dataclass(frozen=True)
class Palm:
    """One PaLM string read: the rationale, the raw answer it states, or why it is dropped."""

    rationale: str = ""
    stated: str = ""
    dropped: str | None = None


_NEXT_Q = re.compile(r"(?:^|\s)Q:")  # CQA's next question starts a line, SVAMP's a sentence
_NEXT_PREMISE = re.compile(r"(?:^|\s)Premise:")
_SO = re.compile(r"(?:So t|T)he answer is")
_ANSWER_COLON = re.compile(r"(?:^|\n)\s*Answer:")
# A trailing "answer: 226." or "so the answer is 7" left before the answer sentence.
_TRAILING_ANSWER = re.compile(r"(?:^|(?<=[.!?\n]))\s*(?:so\s+)?(?:the\s+)?answer(?:\s+is|\s*:)[^.\n]*\.?\s*$", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n+")


def parse_palm(text: str, continuation: re.Pattern = _NEXT_Q, answer: re.Pattern = _SO) -> Palm:
    """Splits one few-shot continuation into its rationale and stated answer."""
    m = continuation.search(text)
    own = text[: m.start()] if m else text
    phrases = list(answer.finditer(own))
    if not phrases:
        return Palm(dropped="no answer (cut off)")
    stated = own[phrases[-1].end():].strip().split("\n")[0].strip()
    rationale = own[: phrases[0].start()].strip()
    while (cut := _TRAILING_ANSWER.search(rationale)) and cut.start() < len(rationale):
        rationale = rationale[: cut.start()].strip()
    if not rationale:
        return Palm(stated=stated, dropped="empty")
    if _loops(rationale):
        return Palm(stated=stated, dropped="repetition loop")
    return Palm(rationale, stated)


def _loops(text: str, times: int = 3, ngram: int = 12) -> bool:
    """A sentence of three or more words said `times` times in a row, or a run of `ngram`
    words repeated `times` times: a decoding loop, not reasoning. Parallel steps that repeat
    a sentence between others ("She already put in 5 cups." once a step) are reasoning."""
    sentences = [" ".join(s.split()).lower() for s in _SENTENCE.split(text) if s.strip()]
    run = 1
    for before, s in zip(sentences, sentences[1:]):
        run = run + 1 if s == before and len(s.split()) >= 3 else 1
        if run >= times:
            return True
    words = text.lower().split()
    grams: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - ngram + 1):
        g = tuple(words[i: i + ngram])
        grams[g] = grams.get(g, 0) + 1
        if grams[g] >= times:
            return True
    return False


# --------------------------------------------------------------------------- stated answers

_LETTERED = re.compile(r"\s*\(([a-z])\)\s*(.*?)\.?\s*", re.S)
_PARENS = re.compile(r"\(.*\)")  # the loader's greedy pattern for SVAMP
_ARITHMETIC = re.compile(r"[\d.\s+\-*/()]*\d[\d.\s+\-*/()]*")
_A_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def stated_choice(stated: str, choices: list[str], counts: dict[str, int]) -> str | None:
    """CQA: the choice PaLM names, when its letter and its text agree (counted either way)."""
    letters = re.findall(r"\(([a-z])\)", stated)
    single = _LETTERED.fullmatch(stated) if len(letters) == 1 else None
    index = ord(letters[0]) - ord("a") if single else -1
    said = choices[index] if 0 <= index < len(choices) else None
    text = single.group(2) if single else None
    if not text or said is None:
        verdict = "stated_choice_unverifiable"  # several letters, none, or no text after it
    elif same_text(text, said):
        verdict = "stated_choice_matches_row"
    elif any(same_text(text, c) for c in choices):
        verdict = "stated_choice_is_another"
    else:
        verdict = "stated_text_not_a_choice"
    counts[verdict] += 1
    return said if verdict in ("stated_choice_matches_row", "stated_choice_unverifiable") else None


def stated_label(stated: str, choices: list[str], counts: dict[str, int]) -> str | None:
    """NLI: the label word PaLM ends with ("contradiction." -> "contradiction")."""
    word = stated.strip().rstrip(".").strip().lower()
    return word if word in NLI_LABELS else None


def stated_equation(stated: str, choices: list[str], counts: dict[str, int]) -> str | None:
    """SVAMP: an equation ("( 10.0 * 45.0 )", kept as written) or else a number ("210")."""
    text = stated.strip().rstrip(".").strip()
    for candidate in ((m.group(0) if (m := _PARENS.search(text)) else None), text):
        if candidate and _ARITHMETIC.fullmatch(candidate) and _balanced(candidate) and re.search(r"[-+*/]", candidate):
            return " ".join(candidate.split())
    numbers = _A_NUMBER.findall(text.rsplit("=", 1)[-1])
    return normalize_number(numbers[0]) if len(numbers) == 1 else None


def _balanced(text: str) -> bool:
    depth = 0
    for c in text:
        depth += {"(": 1, ")": -1}.get(c, 0)
        if depth < 0:
            return False
    return depth == 0


# --------------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class Layout:
    name: str
    what: str  # for the report: "CQA (question, choices, answer)"
    gold: Callable[[Row, str], tuple[str, str, list[str], str | None, dict[str, Any]]]
    continuation: re.Pattern
    answer: re.Pattern
    stated: Callable[[str, list[str], dict[str, int]], str | None]
    counts: tuple[str, ...] = ()


def _choice_gold(row: Row, d: str):
    source_id, question, choices, answer = positional.choice_row(row)
    context, short = split_context(question)
    meta = {k: row.value[k] for k in _EXPLANATIONS if isinstance(row.value.get(k), str)}
    return source_id, short, choices, context, {"answer": answer, **meta}


def _nli_gold(row: Row, d: str):
    premise, hypothesis = field(row, "premise"), field(row, "hypothesis")
    label = field(row, "label", (int, str))
    if isinstance(label, int):
        if not 0 <= label < len(NLI_LABELS):
            raise FormatError(f"{row.where}: field 'label': expected 0, 1 or 2, found {label}")
        label = NLI_LABELS[label]
    elif label not in NLI_LABELS:
        raise FormatError(f"{row.where}: field 'label': expected one of {NLI_LABELS}, found {label!r:.40}")
    meta = {k: row.value[k] for k in _NLI_META if isinstance(row.value.get(k), str)}
    source_id = meta.pop("uid", None)
    question = f"Premise: {premise.strip()}\nHypothesis: {hypothesis.strip()}"
    return source_id, question, list(NLI_LABELS), None, {"answer": label, **meta}


def _svamp_gold(row: Row, d: str):
    question, label = field(row, "input"), field(row, "label", (str, int, float))
    meta = {k: row.value[k] for k in ("source_id", "answer_number") if k in row.value}
    return meta.pop("source_id", None), question.strip(), [], None, {"answer": str(label).strip(), **meta}


LAYOUTS = {
    "choice": Layout("choice", "CQA (id, question, choices, answer)", _choice_gold, _NEXT_Q, _SO, stated_choice,
                     ("stated_choice_matches_row", "stated_choice_is_another", "stated_text_not_a_choice",
                      "stated_choice_unverifiable")),
    "esnli": Layout("esnli", "e-SNLI (premise, hypothesis, label, explanation_1..3)", _nli_gold, _NEXT_PREMISE,
                    _ANSWER_COLON, stated_label),
    "anli": Layout("anli", "ANLI (uid, premise, hypothesis, label, reason)", _nli_gold, _NEXT_PREMISE, _SO, stated_label),
    "svamp": Layout("svamp", "SVAMP (input, label)", _svamp_gold, _NEXT_Q, _SO, stated_equation),
}


def layout_of(row: Row) -> Layout:
    """The layout a gold row's fields name; an unknown one is an error that lists them."""
    keys = set(row.value) if isinstance(row.value, dict) else set()
    if {"question", "choices", "answer"} <= keys:
        return LAYOUTS["choice"]
    if {"premise", "hypothesis", "label"} <= keys:
        return LAYOUTS["esnli" if "explanation_1" in keys else "anli"]
    if {"input", "label"} <= keys:
        return LAYOUTS["svamp"]
    found = ", ".join(sorted(keys)) if keys else type(row.value).__name__
    raise FormatError(
        f"{row.where}: not a distilling step-by-step gold row: found fields {found}; expected CQA "
        "{id, question, choices, answer}, e-SNLI/ANLI {premise, hypothesis, label} or SVAMP {input, label}"
    )


# --------------------------------------------------------------------------- conversion


def convert(root: Path) -> list[tuple[SplitReport, list[dict[str, Any]]]]:
    out = []
    for folder in positional.dataset_folders(root, "distilling step-by-step", extra=(SVAMP_SOURCE,)):
        source = folder / SVAMP_SOURCE
        if source.is_file() and not list(folder.glob(f"{folder.name}_*.json")):
            out += convert_svamp_source(folder.parent, folder, source)
        else:
            out += [convert_split(folder.parent, folder, split) for split in positional.split_names(folder)]
    return out


def convert_split(root: Path, folder: Path, split: str) -> tuple[SplitReport, list[dict[str, Any]]]:
    gold_path = folder / f"{folder.name}_{split}.json"
    if not gold_path.exists():
        found = ", ".join(sorted(p.name for p in folder.glob("*.json"))) or "no JSON files"
        raise FormatError(
            f"{folder}: teacher shards llm/{split}_CoT_*.json but no gold file {gold_path.name} "
            f"(found: {found}): not a distilling step-by-step layout this converter knows"
        )
    rep, gold, strings, counts = positional.open_split(root, folder, split)
    return rep, join(root, folder.name, split, rep, gold, strings, counts)


def convert_svamp_source(root: Path, folder: Path, source: Path) -> list[tuple[SplitReport, list[dict[str, Any]]]]:
    """SVAMP published as one file: split as the reference loader splits it, then joined to
    the teacher shards of each split by position, in the loader's row order."""
    rows = read_rows(source)
    order = np.random.RandomState(seed=SVAMP_SEED).permutation(len(rows))
    members = {"train": order[:SVAMP_TRAIN_ROWS], "test": order[SVAMP_TRAIN_ROWS:]}
    out = []
    others = [s for s in positional.split_names(folder) if s not in members]
    if others:
        raise FormatError(f"{folder}/llm: teacher shards for split {others[0]!r}, but {source.name} splits into train and test")
    for split in members:
        rep = SplitReport(folder.name, split, gold_file=str(source.relative_to(root)))
        gold = [_svamp_row(rows[i], int(i)) for i in members[split]]
        rep.rows_read = len(gold)
        strings, label = positional.read_strings(folder, split, rep)
        counts = positional.align_by_position(rep, label, gold, strings)
        rep.notes.append(f"{source.name}: {len(rows)} rows split as the reference loader does "
                         f"(permutation, seed {SVAMP_SEED}, first {SVAMP_TRAIN_ROWS} train)")
        out.append((rep, join(root, folder.name, split, rep, gold, strings, counts)))
        rep.layout = f"SVAMP ({source.name}, split by the reference loader)"
    return out


def _svamp_row(row: Row, index: int) -> Row:
    """A SVAMP.json row {ID, Body, Question, Equation, Answer} as the loader's {input, label}."""
    body, question = field(row, "Body"), field(row, "Question")
    value = {"input": f"{body.strip()}\n{question.strip()}", "label": field(row, "Equation"),
             "source_id": str(row.value.get("ID", index))}
    if "Answer" in row.value:
        value["answer_number"] = normalize_number(str(row.value["Answer"])) or str(row.value["Answer"])
    return Row(row.where, value)


def join(root: Path, d: str, split: str, rep: SplitReport, gold: list[Row], strings: list[Row],
         counts: dict[str, Any]) -> list[dict[str, Any]]:
    """Records from the gold rows, each with the PaLM rationale at its position."""
    palm = rep.teacher(PALM)
    palm.read = len(strings)
    if not gold:
        return []
    layout = layout_of(gold[0])
    rep.layout = layout.what
    counts.update({k: 0 for k in layout.counts} or {"answer_unreadable": 0})
    palm.agree_gold = 0
    records = []
    for i, row in enumerate(gold):
        if layout_of(row) is not layout:
            raise FormatError(f"{row.where}: a {layout_of(row).what} row among {layout.what} rows")
        source_id, question, choices, context, extra = layout.gold(row, d)
        answer = extra.pop("answer")
        meta = {"format": "dss", "dataset": d, "split": split, "source_id": str(source_id if source_id is not None else i)}
        record = make_record(f"{d}-{split}-{i}", question, answer, choices, context, meta=meta | extra)
        if i < len(strings):
            _attach(record, strings[i], layout, rep, counts, positional.relative(strings[i].where, root))
        records.append(record)
    return records


def _attach(record: dict[str, Any], string: Row, layout: Layout, rep: SplitReport, counts: dict[str, Any],
            where: str) -> None:
    palm = rep.teacher(PALM)
    parsed = parse_palm(string.value, layout.continuation, layout.answer)
    said = layout.stated(parsed.stated, record["choices"], counts) if parsed.stated or layout.counts else None
    if parsed.stated and said is None and "answer_unreadable" in counts:
        counts["answer_unreadable"] += 1
    if parsed.dropped:
        palm.drop(parsed.dropped)
        return
    palm.agree_gold += said is not None and _agrees(said, record["answer"], layout)  # of the rationales kept
    add_rationale(record, PALM, parsed.rationale, {"where": where}, said)


def _agrees(said: str, gold: str, layout: Layout) -> bool:
    if layout.name != "svamp":
        return said == gold
    return " ".join(said.split()) == " ".join(gold.split()) or normalize_number(said) == normalize_number(gold)

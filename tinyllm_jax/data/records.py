"""The one record format: one question a row, in JSON Lines (or a JSON list).

    {"id": "obqa-train-17",             # unique within a file
     "question": "...",                  # required
     "choices": ["...", "..."],          # may be empty (free-form answers)
     "answer": "...",                    # gold answer text (a choice's text when choices exist)
     "context": "...",                   # optional long passage (PubMedQA abstract)
     "rationales": {"flan-t5": ["..."], "llama": ["...", "..."]},   # several samples allowed
     "teacher_answers": {"flan-t5": ["..."]},   # optional: each teacher's parsed answer(s)
     "provenance": {...},                # optional: where rationales came from
     "feedback": {"gpt": "..."},         # optional: FAIR teacher feedback
     "meta": {...}}                      # optional: anything else kept from the source

A teacher with no rationale for a record is simply absent from `rationales`; an empty
string is never stored as a rationale.

JSON files are read here rather than through `datasets`: its JSON loader can neither name
the line of a bad row nor skip one, and both are promised to users (`lenient`).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from tinyllm_jax.errors import UserError

REQUIRED = ("id", "question", "answer")
OPTIONAL = ("choices", "context", "rationales", "teacher_answers", "provenance", "feedback", "meta")

# Bytes that are not UTF-8 survive decoding with "surrogateescape" as these code points,
# so a bad row can be named and skipped without losing its neighbours.
UNDECODABLE = re.compile("[\udc80-\udcff]")


def undecodable(text: str, start: int = 0, end: int | None = None) -> str | None:
    """"not valid UTF-8 (byte 0x..)" for the first byte `decode_text` could not decode in
    text[start:end], else None."""
    bad = UNDECODABLE.search(text, start, len(text) if end is None else end)
    return f"not valid UTF-8 (byte 0x{ord(bad.group()) - 0xDC00:02x})" if bad else None


class RecordError(UserError, ValueError):
    """A record file or row is malformed. The message names the file and line."""


def make_record(
    id: str,
    question: str,
    answer: str,
    choices: Iterable[str] = (),
    context: str | None = None,
    rationales: dict[str, list[str]] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Builds a valid record, dropping empty rationales (never an empty training target)."""
    rec: dict[str, Any] = {"id": str(id), "question": question, "choices": list(choices), "answer": answer}
    if context:
        rec["context"] = context
    clean = {t: [r for r in rs if r and r.strip()] for t, rs in (rationales or {}).items()}
    rec["rationales"] = {t: rs for t, rs in clean.items() if rs}
    for k, v in extra.items():
        if v is not None:
            rec[k] = v
    return rec


def validate_record(obj: Any, where: str) -> dict[str, Any]:
    """Checks one decoded row; raises RecordError naming `where` (file:line)."""
    if not isinstance(obj, dict):
        raise RecordError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    for k in REQUIRED:
        if k not in obj:
            raise RecordError(f"{where}: missing required field {k!r}")
    obj["answer"] = _answer_text(obj["answer"], where)
    if not isinstance(obj["question"], str):
        raise RecordError(f"{where}: field 'question': expected a string, found {obj['question']!r:.60}")
    obj["id"] = str(obj["id"])
    if obj.get("context") is None:
        obj.pop("context", None)
    elif not isinstance(obj["context"], str):
        raise RecordError(f"{where}: field 'context': expected a string, found {obj['context']!r:.60}")
    choices = obj.setdefault("choices", [])
    if choices is None:
        choices = obj["choices"] = []
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise RecordError(f"{where}: field 'choices': expected a list of strings")
    obj["rationales"] = _texts_by_teacher(obj, "rationales", where)
    if "teacher_answers" in obj:
        obj["teacher_answers"] = _texts_by_teacher(obj, "teacher_answers", where)
    return obj


def _answer_text(value: Any, where: str) -> str:
    """The gold answer as text; a JSON number (SVAMP's 13.0, GSM8K-style 72) is its decimal
    text, a whole number without a fraction ("13")."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        raise RecordError(f"{where}: field 'answer': expected a string, found {json.dumps(value)} "
                          '(write "yes" or "no" for a yes/no question, with eval.task: yesno)')
    if isinstance(value, (int, float)) and math.isfinite(value):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    raise RecordError(f"{where}: field 'answer': expected a string or a number, found {value!r:.60}")


def _texts_by_teacher(obj: dict[str, Any], key: str, where: str) -> dict[str, list[str]]:
    """`{teacher: [text, ...]}` with a lone string taken as one sample, blanks removed."""
    value = obj.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecordError(f"{where}: field {key!r}: expected {{teacher: [text, ...]}}")
    out = {}
    for t, texts in value.items():
        if isinstance(texts, str):
            texts = [texts]
        if texts is None:
            continue
        if not isinstance(texts, list) or not all(isinstance(r, str) for r in texts):
            raise RecordError(f"{where}: field '{key}.{t}': expected a list of strings")
        kept = [r for r in texts if r.strip()]
        if kept:
            out[str(t)] = kept
    return out


def map_fields(obj: Any, fields: Mapping[str, str] | None, where: str) -> Any:
    """Renames source fields to record fields: `fields` maps record field -> source field.

    A record field written `rationales.<teacher>` (or `teacher_answers.<teacher>`) takes its
    value from a source column, e.g. {"rationales.gpt": "gpt_rationale"}."""
    if not fields or not isinstance(obj, dict):
        return obj
    values = {}
    for rec_field, src_field in fields.items():
        if src_field in obj:
            values[rec_field] = obj[src_field]
        elif rec_field in REQUIRED:
            raise RecordError(
                f"{where}: missing field {src_field!r} (mapped to {rec_field!r} by data.fields); "
                f"fields present: {', '.join(map(str, obj)) or 'none'}"
            )
    for src_field in fields.values():
        obj.pop(src_field, None)
    for rec_field, value in values.items():
        group, dot, teacher = rec_field.partition(".")
        if dot:
            obj.setdefault(group, {})[teacher] = value
        else:
            obj[rec_field] = value
    return obj


def iter_records(
    path: str | Path,
    lenient: bool = False,
    skipped: list[str] | None = None,
    fields: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields validated records from a JSON Lines file or a file holding one JSON list.

    A bad row (malformed JSON, missing field, bytes that are not UTF-8) raises RecordError
    naming file:line; with `lenient` it is skipped and described in `skipped` instead. An
    empty file is an error too (with `lenient`, one entry in `skipped`). A JSON list broken
    mid-way cannot be resynchronised, so that raises even with `lenient`. `fields` maps
    record fields to the file's own field names (see `map_fields`)."""
    for _, rec in iter_located_records(path, lenient, skipped, fields):
        yield rec


def iter_located_records(
    path: str | Path,
    lenient: bool = False,
    skipped: list[str] | None = None,
    fields: Mapping[str, str] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """As `iter_records`, each record with where it starts ("file:line")."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    skipped = skipped if skipped is not None else []
    try:
        text = decode_text(path.read_bytes(), path)
    except OSError as e:  # no read permission, a file system error
        raise RecordError(f"{path}: cannot read: {e.strerror or e}") from None
    if not text.strip():
        err = RecordError(f"{path}: empty file: no records")
        if not lenient:
            raise err
        skipped.append(str(err))
        return
    rows = _list_rows(text, path) if text.lstrip().startswith("[") else _line_rows(text, path)
    seen = 0
    for lineno, column, row in rows:
        where = f"{path}:{lineno}"
        try:
            if isinstance(row, json.JSONDecodeError):
                raise RecordError(f"{where}: malformed JSON: {row.msg} (column {row.colno})")
            bad = undecodable(text, *column)
            if bad:
                raise RecordError(f"{where}: {bad}")
            obj = validate_record(map_fields(row, fields, where), where)
        except RecordError as err:
            if not lenient:
                raise
            skipped.append(str(err))
            continue
        seen += 1
        yield where, obj
    if seen == 0 and not lenient:
        raise RecordError(f"{path}: no records")


def decode_text(data: bytes, path: Path) -> str:
    """The file's text: UTF-8, its byte-order mark dropped (Windows editors write one); UTF-16
    where a UTF-16 byte-order mark says so (PowerShell's `>` writes it). Bytes that are not
    UTF-8 are kept as surrogates, so that the row holding them is named."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise RecordError(f"{path}: UTF-16 (by its byte-order mark) but not valid UTF-16 at byte {e.start}; "
                              "expected UTF-8 JSON Lines") from None
    return data.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def _line_rows(text: str, path: Path) -> Iterator[tuple[int, tuple[int, int], Any]]:
    """(line number, (start, end) offsets, decoded row or the decode error) per JSON line."""
    start = 0
    for lineno, line in enumerate(text.split("\n"), 1):
        span = (start, start + len(line))
        start += len(line) + 1
        if not line.strip():
            continue
        try:
            yield lineno, span, json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, span, e


def _list_rows(text: str, path: Path) -> Iterator[tuple[int, tuple[int, int], Any]]:
    """The elements of a top-level JSON list, each with the line it starts on."""
    decoder = json.JSONDecoder()
    ws = re.compile(r"\s*")
    pos = ws.match(text, text.index("[") + 1).end()
    line, counted = 1, 0

    def line_of(offset: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, offset)
        counted = offset
        return line

    if text.startswith("]", pos):
        pos = ws.match(text, pos + 1).end()
    else:
        while True:
            try:
                obj, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                raise RecordError(
                    f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno}); "
                    "a broken JSON list cannot be read past this point, even with lenient"
                ) from None
            yield line_of(pos), (pos, end), obj
            pos = ws.match(text, end).end()
            if text.startswith(",", pos):
                pos = ws.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos = ws.match(text, pos + 1).end()
                break
            else:
                raise RecordError(f"{path}:{line_of(pos)}: malformed JSON: expected ',' or ']' after a row")
    if pos != len(text):
        raise RecordError(f"{path}:{line_of(pos)}: malformed JSON: unexpected text after the closing ']'")


def iter_jsonl(
    path: str | Path,
    lenient: bool = False,
    skipped: list[str] | None = None,
    fields: Mapping[str, str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Yields validated records. Bad rows raise RecordError, or with `lenient` are skipped
    and described in `skipped` (file:line: reason). See `iter_records`."""
    return iter_records(path, lenient, skipped, fields)


def read_jsonl(path: str | Path, lenient: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """All records of `path` and the list of skipped rows (empty unless `lenient`)."""
    skipped: list[str] = []
    return list(iter_records(path, lenient, skipped)), skipped


def write_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> int:
    """Writes records atomically (temp file then rename); returns the count."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n

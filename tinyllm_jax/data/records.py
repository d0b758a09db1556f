"""The one record format: JSON Lines, one question a line.

    {"id": "obqa-train-17",             # unique within a file
     "question": "...",                  # required
     "choices": ["...", "..."],          # may be empty (free-form answers)
     "answer": "...",                    # gold answer text (a choice's text when choices exist)
     "context": "...",                   # optional long passage (PubMedQA abstract)
     "rationales": {"flan-t5": ["..."], "llama": ["...", "..."]},   # several samples allowed
     "provenance": {...},                # optional: where rationales came from
     "feedback": {"gpt": "..."},         # optional: FAIR teacher feedback
     "meta": {...}}                      # optional: anything else kept from the source

A teacher with no rationale for a record is simply absent from `rationales`; an empty
string is never stored as a rationale.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Iterator

from tinyllm_jax.errors import UserError

REQUIRED = ("id", "question", "answer")
OPTIONAL = ("choices", "context", "rationales", "provenance", "feedback", "meta")


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
    for k in ("question", "answer"):
        if not isinstance(obj[k], str):
            raise RecordError(f"{where}: field {k!r}: expected a string, found {obj[k]!r:.60}")
    obj["id"] = str(obj["id"])
    choices = obj.setdefault("choices", [])
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise RecordError(f"{where}: field 'choices': expected a list of strings")
    rats = obj.setdefault("rationales", {})
    if not isinstance(rats, dict):
        raise RecordError(f"{where}: field 'rationales': expected {{teacher: [text, ...]}}")
    for t, rs in rats.items():
        if isinstance(rs, str):
            rats[t] = rs = [rs]
        if not isinstance(rs, list) or not all(isinstance(r, str) for r in rs):
            raise RecordError(f"{where}: field 'rationales.{t}': expected a list of strings")
        rats[t] = [r for r in rs if r.strip()]
    obj["rationales"] = {t: rs for t, rs in rats.items() if rs}
    return obj


def iter_jsonl(path: str | Path, lenient: bool = False, skipped: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Yields validated records. Bad rows raise RecordError, or with `lenient` are skipped
    and described in `skipped` (file:line: reason)."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"{path}: file not found")
    seen = 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                err = RecordError(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})")
                if not lenient:
                    raise err from None
                (skipped if skipped is not None else []).append(str(err))
                continue
            if not line.strip():
                continue
            try:
                obj = validate_record(json.loads(line), where)
            except json.JSONDecodeError as e:
                err = RecordError(f"{where}: malformed JSON: {e.msg} (column {e.colno})")
                if not lenient:
                    raise err from None
                (skipped if skipped is not None else []).append(str(err))
                continue
            except RecordError as err:
                if not lenient:
                    raise
                (skipped if skipped is not None else []).append(str(err))
                continue
            seen += 1
            yield obj
    if seen == 0 and not (skipped and lenient):
        raise RecordError(f"{path}: empty file: no records")


def read_jsonl(path: str | Path, lenient: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """All records of `path` and the list of skipped rows (empty unless `lenient`)."""
    skipped: list[str] = []
    return list(iter_jsonl(path, lenient, skipped)), skipped


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

"""Adding one teacher sample to a record, the same way in every converter: the text to
`rationales`, the answer the teacher stated (if the layout gives one) to `teacher_answers`,
and where it came from to `provenance[teacher]["samples"]`, in the same order."""

from __future__ import annotations

from typing import Any


def add_rationale(record: dict[str, Any], teacher: str, text: str, origin: dict[str, Any],
                  answer: str | None = None) -> None:
    """Appends a non-empty rationale; the caller has dropped (and counted) empty ones."""
    assert text.strip(), "empty rationales are dropped before they reach a record"
    record["rationales"].setdefault(teacher, []).append(text.strip())
    if answer:
        record.setdefault("teacher_answers", {}).setdefault(teacher, []).append(answer)
    provenance = record.setdefault("provenance", {}).setdefault(
        teacher, {"format": record["meta"]["format"], "samples": []}
    )
    provenance["samples"].append(origin if answer is None else {**origin, "answer": answer})

"""The final report of `tinyllm rationales`: counts per teacher and input file, as a table.

Per (teacher, file): records; requests planned; cached (answered by an earlier run); new
(answered now); failed; retries; empty (answers with no rationale left after the stop
strings); parsed (rationales whose final answer could be read) and agree (of those, the
ones that give the gold answer); error (why the file was skipped or the run stopped);
`pool` holds the same counts for the zero-shot pass that found in-context examples.
"""

from __future__ import annotations

from typing import Any


def new_counts(records: int) -> dict[str, Any]:
    return {"records": records, "requests": 0, "cached": 0, "new": 0, "failed": 0, "retries": 0,
            "empty": 0, "parsed": 0, "agree": 0, "error": "", "failures": []}


def tally_answers(counts: dict[str, Any], entries: list[dict[str, Any]]) -> None:
    """Adds the cached answers of one (teacher, file) to its empty/parsed/agree counts."""
    for e in entries:
        counts["empty"] += not e["rationale"]
        counts["parsed"] += e["answer"] is not None
        counts["agree"] += e["correct"] is True


def _row(teacher: str, label: str, c: dict[str, Any]) -> tuple:
    agreement = f"{c['agree']}/{c['parsed']}" + (f" ({c['agree'] / c['parsed']:.1%})" if c["parsed"] else "")
    return (teacher, label, c["records"], c["requests"], c["cached"], c["new"], c["failed"], c["retries"],
            c["empty"], agreement)


def format_report(report: dict[str, Any]) -> str:
    head = ("teacher", "file", "records", "requests", "cached", "new", "failed", "retries", "empty", "agreement")
    rows = [head]
    notes = []
    for teacher, per_file in report["teachers"].items():
        for name, c in per_file.items():
            for label, counts in ((f"{name} (examples)", c.get("pool")), (name, c)):
                if counts is not None:
                    rows.append(_row(teacher, label, counts))
            if c["error"]:
                notes.append(f"{teacher} {name}: {c['error']}")
            notes += [f"{teacher} {name}: failed: {f}" for f in c["failures"]]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    status = "complete" if report["complete"] else f"INCOMPLETE: {report['missing']} requests missing"
    lines.append(f"rationales {status}; outputs: {', '.join(report.get('outputs', []))}; cache: {report['cache']}")
    return "\n".join(lines + notes)

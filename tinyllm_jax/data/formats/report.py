"""The conversion report: what each split read, wrote, joined and dropped, as a dict (saved
to OUT/convert_report.json) and as a readable table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_SPLIT_RANK = {"train": 0, "valid": 1, "validation": 1, "dev": 1, "test": 3}


def split_rank(split: str) -> tuple[int, str]:
    """Sort key for split names: train first, test last, others between."""
    return _SPLIT_RANK.get(split, 2), split


@dataclass
class TeacherCount:
    """One teacher in one split. `found`/`missing` count written records with and without
    a rationale from it; `kept` counts rationales kept (several a record are allowed);
    `agree_gold` counts the kept rationales whose stated answer is the gold one (so it is
    never above `kept`: a dropped rationale's answer is not counted)."""

    read: int = 0  # teacher rows read (strings, chains, samples)
    kept: int = 0
    found: int = 0
    missing: int = 0
    dropped: dict[str, int] = field(default_factory=dict)  # reason -> rationales not kept
    agree_gold: int | None = None  # kept rationales whose stated answer equals the gold answer

    def drop(self, reason: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1


@dataclass
class SplitReport:
    dataset: str
    split: str
    gold_file: str
    status: str = "written"  # or "not written: <why>"
    layout: str | None = None  # which of the format's layouts the files were read as
    rows_read: int = 0
    rows_written: int = 0
    output: str | None = None
    teachers: dict[str, TeacherCount] = field(default_factory=dict)
    # source label -> counts of the join between gold rows and that source's rows
    alignment: dict[str, dict[str, Any]] = field(default_factory=dict)
    answers_not_in_choices: int = 0
    notes: list[str] = field(default_factory=list)

    def teacher(self, name: str) -> TeacherCount:
        return self.teachers.setdefault(name, TeacherCount())

    def count_written(self, records: list[dict[str, Any]]) -> None:
        """Fills the counts that come from the records themselves."""
        self.rows_written = len(records)
        for name, tc in self.teachers.items():
            tc.found = sum(1 for r in records if r["rationales"].get(name))
            tc.missing = len(records) - tc.found
            tc.kept = sum(len(r["rationales"].get(name, ())) for r in records)
        off = [r["id"] for r in records if r["choices"] and r["answer"] not in r["choices"]]
        self.answers_not_in_choices = len(off)
        if off:
            self.notes.append(f"{len(off)} gold answers are not among the choices, e.g. {', '.join(off[:3])}")


@dataclass
class Report:
    format: str
    src: str
    out: str
    splits: list[SplitReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["totals"] = {
            "splits_written": sum(1 for s in self.splits if s.output),
            "splits_not_written": sum(1 for s in self.splits if not s.output),
            "rows_read": sum(s.rows_read for s in self.splits),
            "rows_written": sum(s.rows_written for s in self.splits),
        }
        return d

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    def table(self) -> str:
        """The report as aligned plain text, one block a split."""
        head = ["dataset/split", "gold rows", "written",
                "teacher", "read", "found", "missing", "kept", "dropped", "agree"]
        rows: list[list[str]] = []
        for s in self.splits:
            first = [f"{s.dataset}/{s.split}", str(s.rows_read), str(s.rows_written)]
            teachers = list(s.teachers.items()) or [("-", None)]
            for i, (name, tc) in enumerate(teachers):
                left = first if i == 0 else ["", "", ""]
                if tc is None:
                    rows.append(left + ["-"] * 7)
                    continue
                dropped = ", ".join(f"{n} {why}" for why, n in sorted(tc.dropped.items())) or "0"
                agree = "-" if tc.agree_gold is None else str(tc.agree_gold)
                rows.append(left + [name, str(tc.read), str(tc.found), str(tc.missing), str(tc.kept), dropped, agree])
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        lines = [f"convert {self.format}: {self.src} -> {self.out}", fmt(head), fmt(["-" * w for w in widths])]
        lines += [fmt(r) for r in rows]
        lines.append("")
        for s in self.splits:
            where = f"{s.dataset}/{s.split}"
            lines.append(f"{where}: {s.status}" + (f" -> {s.output}" if s.output else "")
                         + (f" (layout: {s.layout})" if s.layout else ""))
            for label, counts in s.alignment.items():
                lines.append(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
            lines += [f"  note: {n}" for n in s.notes]
        d = self.to_dict()["totals"]
        lines.append(
            f"total: {d['rows_read']} gold rows read, {d['rows_written']} records written, "
            f"{d['splits_written']} splits written, {d['splits_not_written']} not written"
        )
        return "\n".join(lines)

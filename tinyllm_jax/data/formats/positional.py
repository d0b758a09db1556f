"""What the TinyLLM and distilling step-by-step layouts share: per dataset folder, gold
files `{d}_{split}.json` of `{id, question, choices, answer}` rows and teacher outputs
`llm/{split}_CoT_{k}.json` (lists of strings) joined to the gold rows by position."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tinyllm_jax.data.formats.report import SplitReport, split_rank
from tinyllm_jax.data.formats.source import FormatError, Row, field, is_empty, numbered, read_rows, text_row


def holds_dataset(folder: Path, extra: tuple[str, ...] = ()) -> bool:
    """Does `folder` hold one dataset: a gold file `{d}_*.json`, teacher shards, or `extra`?"""
    return bool(list(folder.glob(f"{folder.name}_*.json")) or list(folder.glob("llm/*_CoT_*.json"))
                or any((folder / name).is_file() for name in extra))


def dataset_folders(root: Path, layout: str, extra: tuple[str, ...] = ()) -> list[Path]:
    """`root` itself when it is one dataset's folder, else its folders that hold one;
    raises when there are none."""
    if holds_dataset(root, extra):
        return [root]
    folders = [p for p in sorted(root.iterdir()) if p.is_dir() and holds_dataset(p, extra)]
    if not folders:
        raise FormatError(
            f"{root}: no {layout} data found: expected folders {{d}}/ holding {{d}}_{{split}}.json "
            f"and llm/{{split}}_CoT_{{k}}.json"
        )
    return folders


def convert_all(root: Path, layout: str, convert_split) -> list[tuple[SplitReport, list[dict[str, Any]]]]:
    """`convert_split(folder.parent, folder, split)` over every dataset folder and split of
    `root` (paths in reports and provenance start at the dataset's folder name)."""
    return [convert_split(folder.parent, folder, split)
            for folder in dataset_folders(root, layout) for split in split_names(folder)]


def open_split(root: Path, folder: Path, split: str) -> tuple[SplitReport, list[Row], list[Row], dict[str, Any]]:
    """A split's report, gold rows, teacher strings and their positional alignment counts."""
    d = folder.name
    gold_path = folder / f"{d}_{split}.json"
    rep = SplitReport(d, split, gold_file=str(gold_path.relative_to(root)))
    gold = read_gold(gold_path, rep)
    strings, label = read_strings(folder, split, rep)
    return rep, gold, strings, align_by_position(rep, label, gold, strings)


def split_names(folder: Path) -> list[str]:
    """Splits named by gold files or by teacher shards, train first and test last."""
    gold = re.compile(rf"{re.escape(folder.name)}_(.+)\.json")
    names = {m.group(1) for p in folder.glob("*.json") if (m := gold.fullmatch(p.name))}
    shard = re.compile(r"(.+)_CoT_\d+\.json")
    names |= {m.group(1) for p in folder.glob("llm/*.json") if (m := shard.fullmatch(p.name))}
    return sorted(names, key=split_rank)


def read_gold(path: Path, rep: SplitReport) -> list[Row]:
    """The gold rows, or none with the reason in the report when the file is absent or
    empty (PIQA's published train file is empty): such a split is reported, not invented."""
    if not path.exists():
        rep.status = f"not written: gold file {path.name} is missing"
        return []
    if is_empty(path):
        rep.status = f"not written: gold file {path.name} is empty"
        return []
    rows = read_rows(path)
    rep.rows_read = len(rows)
    return rows


def read_strings(folder: Path, split: str, rep: SplitReport) -> tuple[list[Row], str]:
    """All teacher strings of a split in shard order, and the label naming those shards."""
    shards = numbered(list(folder.glob("llm/*.json")), rf"{re.escape(split)}_CoT_(\d+)\.json")
    label = f"llm/{split}_CoT_*.json"
    numbers = [int(re.search(r"_CoT_(\d+)\.json$", p.name).group(1)) for p in shards]
    if numbers != list(range(len(numbers))):
        rep.notes.append(f"teacher shards are not numbered 0..{len(numbers) - 1}: found {numbers}")
    strings = [row for shard in shards for row in read_rows(shard)]
    for row in strings:
        text_row(row)
    return strings, label


def align_by_position(rep: SplitReport, label: str, gold: list[Row], strings: list[Row]) -> dict[str, Any]:
    """Counts of the positional join; a count mismatch is reported with the extra rows on
    each side, and no gold row is ever cut."""
    counts: dict[str, Any] = {"join": "position", "gold_rows": len(gold), "teacher_strings": len(strings)}
    if len(gold) != len(strings):
        counts["gold_rows_without_string"] = max(0, len(gold) - len(strings))
        counts["strings_without_gold_row"] = max(0, len(strings) - len(gold))
        rep.notes.append(
            f"{label}: {len(strings)} teacher strings for {len(gold)} gold rows: counts differ, "
            f"{counts['gold_rows_without_string']} gold rows get no teacher string and "
            f"{counts['strings_without_gold_row']} strings match no gold row"
        )
    rep.alignment[label] = counts
    return counts


def choice_row(row: Row) -> tuple[str, str, list[str], str]:
    """(source id, question, choices, answer) of a gold row, each field checked."""
    source_id = field(row, "id", (str, int))
    question = field(row, "question")
    choices = field(row, "choices", list)
    if not all(isinstance(c, str) for c in choices):
        raise FormatError(f"{row.where}: field 'choices': expected a list of strings, found {choices!r:.80}")
    return str(source_id), question, choices, field(row, "answer")


def relative(where: str, root: Path) -> str:
    """A `path:line` with the path relative to the converted folder (for provenance)."""
    return where.removeprefix(f"{root}/")

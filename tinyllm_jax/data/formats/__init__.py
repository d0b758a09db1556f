"""Converters from the reference systems' published data to tinyllm records, one module a
layout: tinyllm.py (TinyLLM), dss.py (distilling step-by-step), mentor_kd.py (Mentor-KD),
fair.py (FAIR). Each reads the unpacked folder, and `convert` writes OUT/{dataset}/{split}.jsonl
and OUT/convert_report.json only once every file has been read without error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from tinyllm_jax.data.formats import detect, dss, fair, mentor_kd, tinyllm
from tinyllm_jax.data.formats.report import Report, SplitReport
from tinyllm_jax.data.formats.source import FormatError
from tinyllm_jax.data.records import write_jsonl

Converter = Callable[[Path], list[tuple[SplitReport, list[dict[str, Any]]]]]

FORMATS: dict[str, tuple[str, Converter]] = {
    # format -> (the archive's top folder, converter)
    "tinyllm": ("tinyllm", tinyllm.convert),
    "dss": ("dss", dss.convert),
    "mentor-kd": ("mentor-kd", mentor_kd.convert),
    "fair": ("fair", fair.convert),
}

REPORT_NAME = "convert_report.json"


def convert(format: str, src: str | Path, out: str | Path) -> Report:
    """Converts the reference data under `src` (the unpacked folder, the folder it was
    unpacked into, or one dataset's folder) and writes one JSONL a split under `out`, plus
    the report as JSON. Data of another format is refused before anything is read in full."""
    if format not in FORMATS:
        raise FormatError(f"unknown format {format!r}: expected one of {', '.join(FORMATS)}")
    top, converter = FORMATS[format]
    root = Path(src)
    if not root.is_dir():
        raise FormatError(f"{root}: not a folder (--src should be the unpacked {format} data)")
    if (root / top).is_dir():
        root = root / top
    detect.check(format, root)  # data of another format is refused, naming what it holds
    out = Path(out)
    report = Report(format, str(root), str(out))
    converted = converter(root)
    for rep, records in converted:
        if records:
            rep.count_written(records)
            rep.output = f"{rep.dataset}/{rep.split}.jsonl"
        report.splits.append(rep)
    for rep, records in converted:
        if records:
            write_jsonl(out / rep.output, records)
    report.save(out / REPORT_NAME)
    return report


def convert_command(format: str, src: str, out: str) -> dict[str, Any]:
    """`tinyllm convert`: converts, prints the report as a table, returns it as a dict."""
    report = convert(format, src, out)
    print(report.table())
    print(f"report: {Path(out) / REPORT_NAME}")
    return report.to_dict()

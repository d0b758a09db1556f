"""Reading the reference systems' files: a JSON list or JSON Lines, row by row, each row
with the line it starts on, so that every error names `file:line`.

Written by hand rather than through `datasets`: its JSON loader infers one Arrow schema a
file (FAIR's `[text, 5, 5]` lists fit none), forgets line numbers, and a join by position
needs every row in file order and a clear word about files published empty.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinyllm_jax.errors import UserError


class FormatError(UserError, ValueError):
    """A reference data file is malformed; the message names the file and line."""


@dataclass(frozen=True)
class Row:
    where: str  # "path:line", for messages and provenance
    value: Any


def is_empty(path: Path) -> bool:
    """True when the file holds no rows: nothing but whitespace, or `[]` (some published
    files are empty)."""
    return re.fullmatch(rb"(\xef\xbb\xbf)?\s*(\[\s*\])?\s*", path.read_bytes()) is not None


def read_rows(path: Path) -> list[Row]:
    """All rows of a JSON list or JSON Lines file, in order.

    Raises FormatError for non-UTF-8 bytes, malformed JSON and files with no rows."""
    text = _decode(path)
    body = text.lstrip()
    if not body:
        raise FormatError(f"{path}: empty file: expected a JSON list or JSON Lines rows")
    rows = _json_list(text, path) if body.startswith("[") else _json_lines(text, path)
    if not rows:
        raise FormatError(f"{path}: empty file: the JSON list has no rows")
    return rows


def field(row: Row, key: str, kind: type | tuple[type, ...] = str) -> Any:
    """row.value[key], checked: the row must be an object holding `key` of type `kind`."""
    obj = row.value
    if not isinstance(obj, dict):
        raise FormatError(f"{row.where}: expected a JSON object, found {type(obj).__name__}")
    if key not in obj:
        raise FormatError(f"{row.where}: missing required field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        want = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise FormatError(f"{row.where}: field {key!r}: expected {want}, found {value!r:.80}")
    return value


def text_row(row: Row) -> str:
    """A row that must be a plain string (teacher-output files are lists of strings)."""
    if not isinstance(row.value, str):
        raise FormatError(f"{row.where}: expected a string, found {type(row.value).__name__}")
    return row.value


def numbered(paths: list[Path], pattern: str) -> list[Path]:
    """Files whose names match `pattern` (one `(\\d+)` group), sorted by that number, so that
    shard 10 follows shard 9."""
    regex = re.compile(pattern)
    found = [(int(m.group(1)), p) for p in paths if (m := regex.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def _decode(path: Path) -> str:
    """UTF-8 (a byte-order mark dropped), or UTF-16 where its byte-order mark says so (a file
    re-saved by a Windows tool)."""
    data = path.read_bytes()
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            raise FormatError(f"{path}: UTF-16 (by its byte-order mark) but not valid UTF-16 at byte {e.start}") from None
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise FormatError(
            f"{path}:{line}: not valid UTF-8: byte 0x{data[e.start]:02x} at offset {e.start} ({e.reason})"
        ) from None


def _malformed(path: Path, e: json.JSONDecodeError) -> FormatError:
    return FormatError(f"{path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})")


def _json_lines(text: str, path: Path) -> list[Row]:
    rows = []
    for lineno, line in enumerate(text.split("\n"), 1):
        if line.strip():
            try:
                rows.append(Row(f"{path}:{lineno}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise FormatError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    return rows


_SPACE = re.compile(r"\s*")


def _json_list(text: str, path: Path) -> list[Row]:
    """Decodes `[v, v, ...]` one element at a time to learn the line each starts on."""
    decoder = json.JSONDecoder()
    rows: list[Row] = []
    pos = _SPACE.match(text, text.index("[") + 1).end()
    line, counted = 1, 0
    if text.startswith("]", pos):
        return _closed(text, pos, path, rows)
    while True:
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            raise _malformed(path, e) from None
        line += text.count("\n", counted, pos)
        counted = pos
        rows.append(Row(f"{path}:{line}", value))
        pos = _SPACE.match(text, end).end()
        if text.startswith(",", pos):
            pos = _SPACE.match(text, pos + 1).end()
        elif text.startswith("]", pos):
            return _closed(text, pos, path, rows)
        else:
            raise _malformed(path, json.JSONDecodeError("expected ',' or ']'", text, pos))


def _closed(text: str, pos: int, path: Path, rows: list[Row]) -> list[Row]:
    rest = _SPACE.match(text, pos + 1).end()
    if rest != len(text):
        raise _malformed(path, json.JSONDecodeError("extra data after the list", text, rest))
    return rows

"""The append-only result cache that makes `tinyllm rationales` resumable.

One complete JSON object a line, written with a single write and flushed as each answer
arrives, so a crash or a SIGKILL loses at most the requests in flight. An entry's key is
(dataset, record id, teacher, sample index, request hash); a rerun skips every key already
present. A torn last line (the process died mid-write) is ignored on reading, and the next
append starts on a fresh line. Written by hand: it is twenty lines of JSON Lines, and no
library keeps an append-only keyed log with these guarantees any simpler.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

KEY_FIELDS = ("dataset", "record_id", "teacher", "sample", "request_hash")


def entry_key(entry: dict[str, Any]) -> str:
    return "\x1f".join(str(entry[k]) for k in KEY_FIELDS)


class ResultCache:
    """Entries by key; `add` appends one line and flushes before returning."""

    def __init__(self, path: str | Path, read_only: bool = False):
        self.path = Path(path)
        self.entries: dict[str, dict[str, Any]] = {}
        self.torn_lines = 0  # lines that were cut short by a killed process
        if self.path.exists():
            for entry in self._read():
                self.entries.setdefault(entry_key(entry), entry)  # first answer wins
        self._file = None
        if read_only:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        if self._file.tell() > 0 and not self._ends_with_newline():
            self._file.write("\n")
            self._file.flush()

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def add(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            raise RuntimeError(f"{self.path}: opened read-only")
        key = entry_key(entry)
        if key in self.entries:
            return
        self._file.write(json.dumps(entry, ensure_ascii=False) + "\n")
        self._file.flush()
        self.entries[key] = entry

    def close(self) -> None:
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "ResultCache":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _read(self) -> Iterator[dict[str, Any]]:
        with open(self.path, "rb") as f:
            for raw in f:
                try:
                    entry = json.loads(raw.decode("utf-8"))
                    entry_key(entry)
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                    if raw.strip():
                        self.torn_lines += 1
                    continue
                yield entry

    def _ends_with_newline(self) -> bool:
        with open(self.path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

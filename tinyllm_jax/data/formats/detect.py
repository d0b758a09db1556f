"""Which reference layout a folder holds, read from a few of its files, so that data of one
format given to another's converter is refused with a word about what was found.

TinyLLM and distilling step-by-step share their file names (`{d}/{d}_{split}.json`,
`{d}/llm/{split}_CoT_{k}.json`), so those two are told apart by what the files say: TinyLLM's
teacher strings end "Thus, the answer is" and may carry "llama rationale:"; PaLM's say
"So the answer is", "The answer is" or "Answer:", and step-by-step's gold rows carry fields
TinyLLM's never do (CoS-E explanations, premise/hypothesis, SVAMP's input/label).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from tinyllm_jax.data.formats import mentor_kd, positional
from tinyllm_jax.data.formats.fair import FILE_NAME as FAIR_FILE
from tinyllm_jax.data.formats.source import FormatError, read_rows

_TINYLLM_STRING = re.compile(r"Thus, the answer is|llama rationale:")
_PALM_STRING = re.compile(r"(?:So t|T)he answer is|(?:^|\n)\s*Answer:")
_DSS_FIELDS = {"abstractive_explanation", "premise", "hypothesis", "label", "input"}


@dataclass(frozen=True)
class Found:
    path: Path
    format: str | None  # None: could be either of the formats that share the layout
    what: str


def detect(root: Path) -> list[Found]:
    """What `root` holds, one entry a dataset folder (or one for a whole Mentor-KD or FAIR
    folder); empty when nothing known is there."""
    if (folder := mentor_kd.data_folder(root)) is not None:
        return [Found(folder, "mentor-kd", "skeleton/, main/, aug/ or prompt/ files")]
    if any(FAIR_FILE.fullmatch(p.name) for p in root.glob("*.json")):
        return [Found(root, "fair", "{student}_{d}_{false,feedback,rationale}_round{r}.json files")]
    try:
        folders = positional.dataset_folders(root, "", extra=("SVAMP.json",))
    except FormatError:
        return []
    return [_positional(folder) for folder in folders]


def _positional(folder: Path) -> Found:
    if (folder / "SVAMP.json").is_file():
        return Found(folder, "dss", "SVAMP.json, split by the step-by-step loader")
    golds = sorted(folder.glob(f"{folder.name}_*.json"))
    keys = set()
    for path in golds[:1]:
        row = _first_row(path)
        keys = set(row) if isinstance(row, dict) else set()
    if keys & _DSS_FIELDS:
        return Found(folder, "dss", f"gold rows with fields {', '.join(sorted(keys))}")
    shards = sorted(folder.glob("llm/*_CoT_*.json"))
    text = _first_row(shards[0]) if shards else None
    if isinstance(text, str) and _TINYLLM_STRING.search(text):
        return Found(folder, "tinyllm", 'teacher strings "... Thus, the answer is (x) ..." (Flan-T5 and LLaMA)')
    if isinstance(text, str) and _PALM_STRING.search(text):
        return Found(folder, "dss", 'teacher strings "... So the answer is ..." (PaLM)')
    return Found(folder, None, "gold rows {id, question, choices, answer}")


def _first_row(path: Path):
    """The first row of a JSON Lines or JSON list file, or None when it cannot be read (the
    converter then says why)."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            first = f.readline()
        if first.strip() and not first.lstrip().startswith("["):
            return json.loads(first)
        rows = read_rows(path)
        return rows[0].value if rows else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def check(format: str, root: Path) -> list[Found]:
    """Raises when `root` holds data of another format than `format`."""
    found = detect(root)
    for f in found:
        if f.format is not None and f.format != format:
            raise FormatError(
                f"{f.path}: this is {f.format} data ({f.what}), not {format}: "
                f"convert it with `tinyllm convert {f.format} --src {f.path}`"
            )
    return found

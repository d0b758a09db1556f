"""The stage plumbing every recipe shares, written once: run stages in order, skip the
ones already done, resume the one that was killed, rerun what a changed setting touches.

A stage writes under RUN_DIR/<stage name>/ and leaves there `stage.json`:

    {"stage": ..., "status": "running" | "done", "fingerprint": ..., "settings": {...}, ...}

Its fingerprint hashes its settings, the previous stage's fingerprint (so a change reruns
that stage and every stage after it), and the content of the user's files it reads. A
stage is done when its record says "done" with the current fingerprint and everything it
writes exists. A record with another fingerprint means a setting (or an earlier stage)
changed: the stage reruns, says which settings changed, and, if it is `fresh_on_change`,
starts from an empty folder (training), its old output moved aside to

    RUN_DIR/previous/<stage name>/<old fingerprint>/

and taken back, not recomputed, when the settings return to those; a stage that is not
`fresh_on_change` keeps its folder (the teacher cache: answers already paid for are never
thrown away).
A record that says "running" with the current fingerprint is a stage that was killed:
it reruns in place, and resumes (training from its checkpoint, teachers from their cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tinyllm_jax.errors import UserError

log = logging.getLogger("tinyllm.recipe")

RECORD = "stage.json"
KEPT = "previous"  # RUN_DIR/previous/<stage>/<fingerprint>/: a stage's output under other settings


class StageError(UserError):
    """A stage cannot run or failed on bad input; the message names the stage."""


@dataclass
class Stage:
    name: str  # also its folder under the run directory, e.g. "train" or "round1/mine"
    run: Callable[[], Any]  # does the work (resuming from what its folder holds)
    settings: dict[str, Any]  # what shapes its output, as JSON
    writes: list[Path]  # what it leaves behind when done
    reads: list[Path] = field(default_factory=list)  # files it needs before it starts
    # user inputs: their content is fingerprinted; path -> the config key that names it
    user_files: dict[Path, str] = field(default_factory=dict)
    fresh_on_change: bool = True
    plan: Callable[[], str] | None = None  # --dry-run: what is left to do (e.g. requests to send), even
    # before the earlier stages have run


def stage_dir(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / name


def read_record(run_dir: Path, name: str) -> dict[str, Any] | None:
    return _record_in(stage_dir(run_dir, name))


def _record_in(folder: Path) -> dict[str, Any] | None:
    path = Path(folder) / RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_record(run_dir: Path, name: str, record: dict[str, Any]) -> None:
    path = stage_dir(run_dir, name) / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(RECORD + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def file_digest(path: Path) -> str:
    """Content hash of a file, or of a folder's files (relative name, size and bytes)."""
    h = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def missing_user_files(stage: Stage) -> list[str]:
    return [f"{key} = {path}" for path, key in stage.user_files.items() if not Path(path).exists()]


def fingerprint(stage: Stage, previous: str) -> str:
    h = hashlib.sha256(json.dumps(stage.settings, sort_keys=True, default=str).encode())
    h.update(f"\x1fprevious={previous}".encode())
    for path in stage.user_files:
        h.update(f"\x1f{path}={file_digest(path) if Path(path).exists() else 'missing'}".encode())
    return h.hexdigest()[:24]


def changed_settings(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, as "key: old -> new"."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(old) | set(new), key=str):
            out += changed_settings(old.get(k), new.get(k), f"{prefix}{k}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for i, (a, b) in enumerate(zip(old, new)) for c in changed_settings(a, b, f"{prefix}{i}.")]
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


@dataclass
class StageStatus:
    name: str
    state: str  # "done", "to run", "to resume", "to rerun", "to take back"
    reason: str = ""


def kept_output(run_dir: Path, name: str, fp: str) -> Path | None:
    """The output of stage `name` under the settings of fingerprint `fp`, moved aside when
    those settings changed; None when there is none."""
    folder = Path(run_dir) / KEPT / name / fp
    return folder if (_record_in(folder) or {}).get("fingerprint") == fp else None


def _put_aside(stage: Stage, run_dir: Path) -> Path | None:
    """Moves the stage's folder to RUN_DIR/previous/<stage>/<its fingerprint>/."""
    folder = stage_dir(run_dir, stage.name)
    if not folder.is_dir():
        return None
    fp = (read_record(run_dir, stage.name) or {}).get("fingerprint") or "unrecorded"
    dest = Path(run_dir) / KEPT / stage.name / fp
    if dest.exists():  # an older copy under the same settings: the newer one wins
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    folder.rename(dest)
    return dest


def _take_back(stage: Stage, run_dir: Path, kept: Path) -> None:
    """The kept output of these settings back in place; what is there now goes aside."""
    _put_aside(stage, run_dir)
    stage_dir(run_dir, stage.name).parent.mkdir(parents=True, exist_ok=True)
    kept.rename(stage_dir(run_dir, stage.name))


def status(stage: Stage, run_dir: Path, fp: str) -> StageStatus:
    record = read_record(run_dir, stage.name)
    if (record is None or record.get("fingerprint") != fp) and stage.fresh_on_change:
        kept = kept_output(run_dir, stage.name, fp)
        if kept is not None:
            return StageStatus(stage.name, "to take back", f"its output under these settings is kept in {kept}")
    if record is None:
        return StageStatus(stage.name, "to run")
    if record.get("fingerprint") != fp:
        changed = changed_settings(record.get("settings"), stage.settings)
        why = "; ".join(changed[:6]) + (" ..." if len(changed) > 6 else "") if changed else "an earlier stage's output changed"
        return StageStatus(stage.name, "to rerun", why)
    if record.get("status") == "done" and all(Path(p).exists() for p in stage.writes):
        return StageStatus(stage.name, "done")
    return StageStatus(stage.name, "to resume", "interrupted" if record.get("status") == "running" else "outputs missing")


def run_stages(stages: Sequence[Stage], run_dir: str | Path, *, dry_run: bool = False,
               only: str | None = None, echo: Callable[[str], None] = print) -> list[StageStatus]:
    """Runs the stages in order (or, with `only`, that one stage, whose earlier stages
    must be done); with `dry_run` prints what each would read, write and do, runs nothing."""
    run_dir = Path(run_dir)
    names = [s.name for s in stages]
    if only is not None and only not in names:
        raise StageError(f"--only {only}: no such stage (stages: {', '.join(names)})")
    fp = ""
    statuses: list[StageStatus] = []
    for stage in stages:
        fp = fingerprint(stage, fp)
        st = status(stage, run_dir, fp)
        if st.state == "to take back" and not dry_run and (only is None or names.index(stage.name) <= names.index(only)):
            echo(f"stage {stage.name}: settings as in an earlier run: {st.reason}; taking it back")
            _take_back(stage, run_dir, kept_output(run_dir, stage.name, fp))
            st = status(stage, run_dir, fp)
        statuses.append(st)
        missing = missing_user_files(stage)
        if dry_run:
            _describe(stage, st, echo)
            if missing:
                echo(f"  MISSING: {'; '.join(missing)}")
            continue
        if missing and (only is None or stage.name == only):
            raise StageError(f"stage {stage.name}: {missing[0]} does not exist")
        if only is not None and stage.name != only:
            if names.index(stage.name) < names.index(only) and st.state != "done":
                raise StageError(f"stage {only}: needs stage {stage.name} first, which is not done ({st.state}); "
                                 f"run the recipe without --only")
            continue
        if st.state == "done":
            echo(f"stage {stage.name}: done, skipped")
            continue
        if st.state == "to rerun":
            kept = _put_aside(stage, run_dir) if stage.fresh_on_change else None
            aside = f"; its output is kept in {kept}" if kept else ""
            echo(f"stage {stage.name}: settings changed ({st.reason}){aside}: rerunning it and the stages after it")
        elif st.state == "to resume":
            echo(f"stage {stage.name}: resuming ({st.reason})")
        else:
            echo(f"stage {stage.name}: running")
        _run_one(stage, run_dir, fp)
    if not dry_run and only is None and all(s.state == "done" for s in statuses):
        echo(f"nothing to do: all {len(stages)} stages are done ({run_dir})")
    return statuses


def _run_one(stage: Stage, run_dir: Path, fp: str) -> None:
    for path in stage.reads:
        if not Path(path).exists():
            raise StageError(f"stage {stage.name}: its input {path} does not exist yet (an earlier stage writes it)")
    started = time.time()
    record = {"stage": stage.name, "status": "running", "fingerprint": fp, "settings": stage.settings,
              "reads": [str(p) for p in stage.reads], "writes": [str(p) for p in stage.writes], "started": started}
    _write_record(run_dir, stage.name, record)
    try:
        result = stage.run()
    except UserError as e:
        msg = str(e)
        raise StageError(msg if msg.startswith(f"stage {stage.name}") else f"stage {stage.name}: {msg}") from None
    missing = [str(p) for p in stage.writes if not Path(p).exists()]
    if missing:
        raise StageError(f"stage {stage.name}: finished without writing {', '.join(missing)}")
    record.update(status="done", finished=time.time(), seconds=round(time.time() - started, 1))
    if isinstance(result, dict):
        record["result"] = result
    _write_record(run_dir, stage.name, record)


def _describe(stage: Stage, st: StageStatus, echo: Callable[[str], None]) -> None:
    state = st.state + (f" ({st.reason})" if st.reason else "")
    echo(f"stage {stage.name}: {state}")
    if stage.reads:
        echo(f"  reads:  {', '.join(str(p) for p in stage.reads)}")
    echo(f"  writes: {', '.join(str(p) for p in stage.writes)}")
    if stage.plan is not None and st.state != "done":
        echo(f"  to do:  {stage.plan()}")

"""User-facing errors: the CLI prints their message (file, line or key, expected, found)
and exits with status 2, with no traceback and no partial output."""

from __future__ import annotations

import os
from pathlib import Path


class UserError(Exception):
    """Bad input from the user: a file, a config key, a model path."""


class Interrupted(Exception):
    """The run stopped on a signal (SIGINT, SIGTERM) after saving what it could; the CLI
    prints the message and exits with `status` (128 + the signal number), so that
    `tinyllm train ... && tinyllm export ...` never exports a partial run."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_dir(path: str | Path, key: str) -> None:
    """Raises UserError naming `key` when `path` cannot become a folder we write in: it is
    a file, a file stands where one of its parents should be, or the nearest existing
    parent is not writable. Creates nothing."""
    path = Path(path)
    probe = _nearest_existing(path)
    if not probe.is_dir():
        what = "is a file" if probe == path else f"cannot be created: {probe} is a file"
        raise UserError(f"{key}: {path} {what}, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        what = "is not writable" if probe == path else f"cannot be created: {probe} is not writable"
        raise UserError(f"{key}: {path} {what}")


def check_writable_file(path: str | Path, key: str) -> None:
    """As `check_writable_dir`, for a file to be written at `path`."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{key}: {path} is a folder, expected a file name")
    probe = _nearest_existing(path.parent)
    if not probe.is_dir():
        raise UserError(f"{key}: {path} cannot be written: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UserError(f"{key}: {path} cannot be written: {path if path.exists() else probe} is not writable")


def path_error(key: str, path: str | Path, err: OSError, doing: str = "cannot write") -> UserError:
    """An OSError while writing `path` (named by config key or option `key`) as one line."""
    reason = err.strerror or str(err)
    where = f" ({err.filename})" if err.filename and str(err.filename) != str(path) else ""
    return UserError(f"{key}: {doing} {path}: {reason}{where}")


def make_dir(path: str | Path, key: str) -> Path:
    """`path` created (with its parents) or one line naming `key`."""
    path = Path(path)
    check_writable_dir(path, key)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise path_error(key, path, e, "cannot create") from None
    return path

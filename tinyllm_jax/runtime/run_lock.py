"""One process at a time in a run directory.

Two `tinyllm train` (or `recipe`) commands on the same RUN_DIR, started by hand in two
terminals or by a scheduler that requeued a job whose first copy still runs, would write the
same checkpoints and interleave their metrics. The first takes an exclusive `flock` on
RUN_DIR/.tinyllm.lock for as long as it runs; the second is refused in one line that says who
holds it. The kernel drops the lock when its holder exits, however it exits (SIGKILL
included), so no stale lock is ever left to clear by hand. On a file system without locks
(some network mounts), runs go unguarded, as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from tinyllm_jax.errors import UserError

LOCK_NAME = ".tinyllm.lock"
log = logging.getLogger("tinyllm.run_lock")


class RunDirInUse(UserError):
    """Another process holds the run directory's lock."""


@contextlib.contextmanager
def hold(run_dir: Path, key: str = "run_dir") -> Iterator[None]:
    """Holds RUN_DIR's lock for the body (the directory must exist); raises RunDirInUse,
    naming `key`, the directory and the holder, when another process has it."""
    path = Path(run_dir) / LOCK_NAME
    with open(path, "a+", encoding="utf-8") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise RunDirInUse(f"{key} = {run_dir}: in use by another tinyllm command ({holder}); wait for it "
                              "to end, or stop it, then rerun this one") from None
        except OSError as e:  # no locks on this file system: unguarded, as before
            log.debug("%s: not locked (%s)", path, e)
            yield
            return
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)

"""Transparent huge pages for XLA's CPU buffers, by re-running the command once.

XLA on the CPU takes each step's activations and gradients from malloc, and glibc's malloc
hands large blocks back to the kernel when they are freed. The next step touches fresh 4 KiB
pages again: measured on the benchmark's train step (13.6M T5, 12 rows of 192/136), 195,000
page faults and 0.33 s of kernel time a step, about 14 % of its wall time. glibc >= 2.35 can
ask for transparent huge pages on its allocations (the `glibc.malloc.hugetlb=1` tunable):
815 faults a step, 0.92 -> 0.79 s. Tunables are read when a process starts, so the command
line entry points re-execute themselves once with the tunable set. It changes no result,
only where memory comes from; `TINYLLM_HUGEPAGES=0` turns it off. It does nothing where it
cannot help: not Linux, not glibc, glibc too old, or the tunable already set by the user.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Sequence

TUNABLE = "glibc.malloc.hugetlb"


def wanted(environ: dict[str, str] | None = None) -> bool:
    """Whether a re-run with the tunable would change anything here."""
    env = os.environ if environ is None else environ
    if env.get("TINYLLM_HUGEPAGES", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    if TUNABLE in env.get("GLIBC_TUNABLES", ""):
        return False
    libc, version = platform.libc_ver()
    try:
        major_minor = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return False
    return libc == "glibc" and major_minor >= (2, 35)


def reexec_with_huge_pages(module: str, argv: Sequence[str]) -> None:
    """Replaces this process by `python -m module *argv` with the tunable set (same PID, so
    signals and process managers see no difference); returns only when that is not wanted."""
    if not wanted() or not sys.executable:
        return
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    env = dict(os.environ, GLIBC_TUNABLES=f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
    except OSError:  # cannot re-run (an unusual interpreter): carry on without huge pages
        return

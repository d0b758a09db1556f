"""Stable integer seeds derived from names: the same parts give the same seed in every run,
process and Python (no `hash()` salt)."""

from __future__ import annotations

import hashlib
from typing import Any


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed (what OpenAI-compatible servers take) from the parts' text, joined by
    an unprintable separator so that ("a", "bc") and ("ab", "c") differ."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF

"""The demo teachers as a backend: they answer prompts about the embedded demo questions
(tinyllm_jax/data/demo.py) from the generator's ground truth, with no server and no model,
so that every recipe's demo config runs its teacher stages anywhere.

`model` names the style: "careful" (step by step, always right) or "terse" (one equation,
wrong for `error_rate` of its answers, 0.15 by default: the demo data's two teachers). What
a job asks is its template's kind (`info["kind"]`):

    rationale   a rationale ending "So the answer is N." / "The answer is N."
    feedback    what is wrong with the student's answer (the record's `meta.student_answer`)
    review      a 1-5 score in brackets for `meta.reviewed_rationale`: 5 when its
                arithmetic and final answer are right, 2 when not

Whether a terse answer slips is a hash of (seed, record id, sample), so reruns and
resumed runs give the same text, and the slip lands on one of the record's wrong choices.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from tinyllm_jax.config import ConfigError, TeacherConfig
from tinyllm_jax.data.demo import (TERSE_ERROR_RATE, careful_rationale, feedback_text, parse_question,
                                   terse_rationale)
from tinyllm_jax.teachers.backends import Job, OnDone, OnFail, RunStats

STYLES = {"careful": 0.0, "terse": TERSE_ERROR_RATE}  # style -> default error rate


class DemoTeacher:
    def __init__(self, teacher: TeacherConfig, seed: int = 0):
        if teacher.model not in STYLES:
            raise ConfigError(f"teacher {teacher.name!r}: backend 'demo' needs model: one of {sorted(STYLES)}, "
                              f"found {teacher.model!r}")
        self.teacher = teacher
        self.style = teacher.model
        self.error_rate = STYLES[self.style] if teacher.error_rate is None else teacher.error_rate
        if not 0.0 <= self.error_rate <= 1.0:
            raise ConfigError(f"teacher {teacher.name!r}: error_rate: expected a fraction in [0, 1], found {self.error_rate}")
        self.seed = seed

    def settings(self) -> dict[str, Any]:
        return {"backend": "demo", "model": self.style, "error_rate": self.error_rate}

    def run(self, jobs: list[Job], on_done: OnDone, on_fail: OnFail) -> RunStats:
        stats = RunStats()
        for job in jobs:
            problem = parse_question(job.record["question"]) if job.record else None
            if problem is None:
                stats.failed += 1
                on_fail(job, "the demo teacher answers demo questions only (tinyllm_jax/data/demo.py)")
                continue
            stats.done += 1
            on_done(job, self.answer(job, *problem))
        return stats

    def answer(self, job: Job, name: str, obj: str, start: int, changes: list[int]) -> str:
        truth = start + sum(changes)
        kind = job.info.get("kind", "rationale")
        meta = job.record.get("meta") or {}
        if kind == "feedback":
            return feedback_text(name, start, changes, truth, meta.get("student_answer", ""))
        if kind == "review":
            return f"Score: [{5 if _sound(meta.get('reviewed_rationale', ''), start, changes) else 2}]"
        if self.style == "careful":
            return careful_rationale(name, start, changes, truth)
        result = self._slip(job, truth) if self._slips(job) else truth
        return terse_rationale(start, changes, result)

    def _slips(self, job: Job) -> bool:
        digest = hashlib.sha256(f"{self.seed}\x1f{job.info.get('record_id')}\x1f{job.info.get('sample', 0)}"
                                f"\x1f{job.info.get('kind', 'rationale')}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.error_rate

    def _slip(self, job: Job, truth: int) -> int:
        wrong = [int(c) for c in (job.record.get("choices") or []) if c.lstrip("-").isdigit() and int(c) != truth]
        wrong = wrong or [truth + d for d in (-2, -1, 1, 2) if truth + d >= 0]
        digest = hashlib.sha256(f"{self.seed}\x1f{job.info.get('record_id')}\x1fslip".encode()).digest()
        return sorted(wrong)[digest[0] % len(wrong)]


def _sound(rationale: str, start: int, changes: list[int]) -> bool:
    """Every `a + b - c = d` step holds and the last number is the true result."""
    for left, result in re.findall(r"((?:\d+ [+-] )+\d+) = (-?\d+)", rationale):
        terms = left.split()
        value = int(terms[0])
        for op, n in zip(terms[1::2], terms[2::2]):
            value += int(n) if op == "+" else -int(n)
        if value != int(result):
            return False
    numbers = re.findall(r"-?\d+", rationale)
    return bool(numbers) and int(numbers[-1]) == start + sum(changes)

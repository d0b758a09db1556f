"""TinyLLM (arXiv:2402.04616): the student learns the answer and one rationale stream per
teacher, each with its own prefix and weight: loss = gamma * L_answer + alpha * L_t1 +
beta * L_t2 + ... Teachers explain the gold answer (teacher forcing) after two in-context
examples from the same dataset.

    data -> rationales (every teacher, unless the records already carry them) -> train
         -> evaluate (test, once, with the validation-selected checkpoint) -> export
"""

from __future__ import annotations

from pathlib import Path

from tinyllm_jax.config import ConfigError
from tinyllm_jax.recipes import common
from tinyllm_jax.recipes.config import RecipeConfig
from tinyllm_jax.recipes.stages import Stage


def stages(cfg: RecipeConfig, run_dir: Path) -> list[Stage]:
    check(cfg)
    return common.rationale_distillation_stages(cfg, run_dir)


def check(cfg: RecipeConfig) -> None:
    """Streams name the configured teachers (before anything is spent on them)."""
    answer = [s for s in cfg.data.streams if s.teacher is None]
    if len(answer) > 1 or (not answer and cfg.eval.stream is None):
        raise ConfigError(f"data.streams: TinyLLM trains one answer stream (a stream without `teacher`), found "
                          f"{len(answer)}; a student of rationales alone (a scratchpad: it answers through the "
                          "rationale it writes) needs eval.stream naming the stream it answers with")
    teachers = [t.name for t in cfg.rationales.teachers]
    for i, s in enumerate(cfg.data.streams):
        if s.teacher is not None and teachers and s.teacher not in teachers:
            raise ConfigError(f"data.streams[{i}].teacher: {s.teacher!r} is not one of rationales.teachers "
                              f"({', '.join(teachers)})")

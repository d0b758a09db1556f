"""Distilling step-by-step (arXiv:2305.02301): one teacher's few-shot chain of thought;
the student learns `predict:` -> label (gold, or the teacher's own answer with
`data.answer_source: <teacher>`) and `explain:` -> rationale, loss = alpha * L_label +
(1 - alpha) * L_rationale.

    data -> rationales (the one teacher, unless the records carry its rationales) -> train
         -> evaluate (test once, validation-selected checkpoint) -> export
"""

from __future__ import annotations

import logging
from pathlib import Path

from tinyllm_jax.config import ConfigError
from tinyllm_jax.recipes import common
from tinyllm_jax.recipes.config import RecipeConfig
from tinyllm_jax.recipes.stages import Stage

log = logging.getLogger("tinyllm.recipe")


def stages(cfg: RecipeConfig, run_dir: Path) -> list[Stage]:
    check(cfg)
    return common.rationale_distillation_stages(cfg, run_dir)


def check(cfg: RecipeConfig) -> None:
    """One label stream and one rationale stream of the same, single teacher."""
    streams = cfg.data.streams
    label = [s for s in streams if s.teacher is None]
    explain = [s for s in streams if s.teacher is not None]
    if len(label) != 1 or len(explain) != 1:
        raise ConfigError(f"data.streams: step-by-step trains one label stream and one rationale stream, found "
                          f"{len(label)} and {len(explain)}")
    if len(cfg.rationales.teachers) > 1:
        raise ConfigError(f"rationales.teachers: step-by-step distils one teacher, found {len(cfg.rationales.teachers)}")
    teacher = explain[0].teacher
    if cfg.rationales.teachers and cfg.rationales.teachers[0].name != teacher:
        raise ConfigError(f"data.streams: the rationale stream's teacher {teacher!r} is not the configured teacher "
                          f"{cfg.rationales.teachers[0].name!r}")
    if cfg.data.answer_source not in ("gold", teacher):
        raise ConfigError(f"data.answer_source: expected 'gold' or the teacher {teacher!r}, found {cfg.data.answer_source!r}")
    alpha = label[0].weight
    if abs(alpha + explain[0].weight - 1.0) > 1e-6:
        log.warning("step-by-step: stream weights %.3g and %.3g do not sum to 1 (the paper's alpha, 1 - alpha)",
                    alpha, explain[0].weight)

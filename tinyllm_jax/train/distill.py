"""The frozen teacher of online logit distillation (`distill:`).

The teacher is an HF T5 directory, a hub id or one of our training runs (its selected
checkpoint, through `runs.load_model`). It must share the student's vocabulary, since the
divergence compares the two distributions token by token; it may be larger. Its parameters
are placed on the mesh by the same logical rules as the student's, optionally in bf16, and
enter the train step as an argument that is never donated, differentiated or given
optimizer state (train/loop.py).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinyllm_jax.config import Config, ConfigError, DistillConfig
from tinyllm_jax.errors import UserError
from tinyllm_jax.model.family import family_of
from tinyllm_jax.model.t5 import T5Config
from tinyllm_jax.runtime import sharding

log = logging.getLogger("tinyllm.distill")

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model")


@dataclasses.dataclass(frozen=True)
class KDSpec:
    """What the loss needs of `distill:` (static in the jitted step)."""

    teacher_cfg: T5Config
    weight: float
    temperature: float
    divergence: str
    jsd_beta: float
    scale: float  # temperature**2 with scale_by_t2, else 1
    streams: tuple[float, ...]  # 1.0 for a KD stream, 0.0 otherwise, in stream order

    def streams_S(self) -> jax.Array:
        return jnp.asarray(self.streams, jnp.float32)


@dataclasses.dataclass
class Teacher:
    """The teacher's architecture (its compute dtype set) and its parameters on the mesh."""

    arch: T5Config
    params: Any
    shardings: Any
    source: str
    step: int | None = None


def check_distill(cfg: DistillConfig, stream_names: Sequence[str]) -> None:
    """ConfigError naming the `distill.*` key that cannot work."""
    if cfg.temperature <= 0:
        raise ConfigError(f"distill.temperature: expected a positive number, found {cfg.temperature}")
    if cfg.weight < 0:
        raise ConfigError(f"distill.weight: expected a number >= 0, found {cfg.weight}")
    if cfg.divergence == "jsd" and not 0.0 < cfg.jsd_beta < 1.0:
        raise ConfigError(f"distill.jsd_beta: expected a number strictly between 0 and 1, found {cfg.jsd_beta} "
                          "(its limits are forward_kl and reverse_kl: choose those divergences instead)")
    for i, name in enumerate(cfg.streams):
        if name not in stream_names:
            raise ConfigError(f"distill.streams[{i}]: no stream named {name!r}; data.streams: {', '.join(stream_names)}")


def kd_spec(cfg: DistillConfig, teacher_cfg: T5Config, stream_names: Sequence[str]) -> KDSpec:
    check_distill(cfg, stream_names)
    chosen = set(cfg.streams or stream_names)
    return KDSpec(teacher_cfg, float(cfg.weight), float(cfg.temperature), cfg.divergence, float(cfg.jsd_beta),
                  float(cfg.temperature) ** 2 if cfg.scale_by_t2 else 1.0,
                  tuple(1.0 if n in chosen else 0.0 for n in stream_names))


def place_teacher(arch: T5Config, host_params: Any, mesh: jax.sharding.Mesh, rules, dtype: str = "float32",
                  source: str = "", step: int | None = None) -> Teacher:
    """Host parameters -> a Teacher on `mesh`: cast to `dtype`, sharded by the logical
    `rules` exactly as a student of this architecture would be."""
    arch = arch.replace(dtype=dtype, remat="none")  # forward only: nothing to recompute
    boxed = jax.eval_shape(lambda k: family_of(arch).init(arch, k), jax.random.key(0))
    shardings = sharding.param_shardings(boxed, mesh, rules)
    cast = jax.tree.map(lambda x: np.asarray(x, jnp.dtype(dtype)), host_params)
    return Teacher(arch, jax.device_put(cast, shardings), shardings, source, step)


def check_vocabulary(teacher_cfg: T5Config, teacher_tokenizer, student_cfg: T5Config, student_tokenizer,
                     source: str) -> None:
    """UserError unless the teacher scores the student's tokens: equal vocabulary sizes and,
    where the teacher has a tokenizer, the same token for every id."""
    where = f"distill.teacher={source}"
    if teacher_cfg.vocab_size != student_cfg.vocab_size:
        raise UserError(
            f"{where}: the teacher's vocabulary has {teacher_cfg.vocab_size} entries but the student's has "
            f"{student_cfg.vocab_size}; distillation compares the two distributions token by token, so the "
            "teacher must share the student's tokenizer and vocabulary size")
    if teacher_tokenizer is None or student_tokenizer is None:
        log.warning("%s: no tokenizer to compare with the student's; only the vocabulary sizes were checked", where)
        return
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab == s_vocab:
        return
    t_by_id = {i: t for t, i in t_vocab.items()}
    s_by_id = {i: t for t, i in s_vocab.items()}
    first = min(i for i in t_by_id.keys() | s_by_id.keys() if t_by_id.get(i) != s_by_id.get(i))
    raise UserError(
        f"{where}: the teacher's tokenizer differs from the student's (token id {first} is "
        f"{t_by_id.get(first)!r} for the teacher, {s_by_id.get(first)!r} for the student; "
        f"{len(t_vocab)} vs {len(s_vocab)} tokens); the teacher must share the student's vocabulary")


def load_teacher(cfg: Config, student_cfg: T5Config, student_tokenizer, mesh: jax.sharding.Mesh) -> Teacher:
    """`cfg.distill.teacher` loaded, checked against the student and placed on `mesh`."""
    from tinyllm_jax.runs import is_run_dir, load_model

    src = cfg.distill.teacher
    check_distill(cfg.distill, [s.name for s in cfg.data.streams])
    if is_run_dir(src):
        model = load_model(src)
        tokenizer = model.tokenizer
    else:
        model = load_model(src, tokenizer=False)
        tokenizer = _hf_tokenizer_if_any(src)
    if family_of(model.arch).name != family_of(student_cfg).name:
        raise UserError(f"distill.teacher={src}: a {family_of(model.arch).name} teacher cannot teach a "
                        f"{family_of(student_cfg).name} student in one step (they read different batches); "
                        "use a teacher of the student's family")
    check_vocabulary(model.arch, tokenizer, student_cfg, student_tokenizer, src)
    teacher = place_teacher(model.arch, model.params, mesh, sharding.logical_rules(cfg.mesh), cfg.distill.dtype,
                            src, model.step)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(teacher.params))
    log.info("distill: teacher %s%s, %.1fM parameters in %s", src,
             f" (step {model.step})" if model.step is not None else "", n / 1e6, cfg.distill.dtype)
    return teacher


def _hf_tokenizer_if_any(src: str):
    from tinyllm_jax.model.hf import resolve_model_dir
    from tinyllm_jax.model.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(src)
    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        return None
    return load_tokenizer(str(model_dir))

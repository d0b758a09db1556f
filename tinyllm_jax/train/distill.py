"""The frozen teacher of online logit distillation (`distill:`).

The teacher is an HF T5 directory, a hub id or one of our training runs (its selected
checkpoint, through `runs.load_model`). It must share the student's tokenizer, checked by
content (`check_vocabulary`), since the divergence compares the two distributions token by
token; it may be larger, and have another number of padding rows. Its parameters
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
from tinyllm_jax.model.t5 import T5, T5Config
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
    vocab: int | None = None  # ids compared: the shared tokenizer's (padding rows beyond it left out); None: all

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
    vocab: int | None = None  # the token ids compared (check_vocabulary); None: every row


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


def kd_spec(cfg: DistillConfig, teacher_cfg: T5Config, stream_names: Sequence[str], vocab: int | None = None) -> KDSpec:
    check_distill(cfg, stream_names)
    chosen = set(cfg.streams or stream_names)
    return KDSpec(teacher_cfg, float(cfg.weight), float(cfg.temperature), cfg.divergence, float(cfg.jsd_beta),
                  float(cfg.temperature) ** 2 if cfg.scale_by_t2 else 1.0,
                  tuple(1.0 if n in chosen else 0.0 for n in stream_names), vocab)


def place_teacher(arch: T5Config, host_params: Any, mesh: jax.sharding.Mesh, rules, dtype: str = "float32",
                  source: str = "", step: int | None = None) -> Teacher:
    """Host parameters -> a Teacher on `mesh`: cast to `dtype`, sharded by the logical
    `rules` exactly as a student of this architecture would be."""
    arch = arch.replace(dtype=dtype, remat="none")  # forward only: nothing to recompute
    dummy = jnp.ones((1, 8), jnp.int32)
    boxed = jax.eval_shape(lambda k: T5(arch).init(k, dummy, dummy)["params"], jax.random.key(0))
    shardings = sharding.param_shardings(boxed, mesh, rules)
    cast = jax.tree.map(lambda x: np.asarray(x, jnp.dtype(dtype)), host_params)
    return Teacher(arch, jax.device_put(cast, shardings), shardings, source, step)


SPECIAL_IDS = ("pad_token_id", "eos_token_id", "unk_token_id", "bos_token_id")


def tokenizer_name(tokenizer) -> str:
    return f"{type(tokenizer).__name__}({getattr(tokenizer, 'name_or_path', '')!r})"


def tokenizer_difference(teacher_tokenizer, student_tokenizer) -> str | None:
    """Where two tokenizers differ by content (the first id whose piece differs, or a special
    id), or None when they agree: the same pieces at the same ids and the same special ids."""
    t_vocab, s_vocab = teacher_tokenizer.get_vocab(), student_tokenizer.get_vocab()
    if t_vocab != s_vocab:
        t_by_id = {i: t for t, i in t_vocab.items()}
        s_by_id = {i: t for t, i in s_vocab.items()}
        first = min(i for i in t_by_id.keys() | s_by_id.keys() if t_by_id.get(i) != s_by_id.get(i))
        return (f"token id {first} is {t_by_id.get(first)!r} for the teacher, {s_by_id.get(first)!r} for the "
                f"student ({len(t_vocab)} vs {len(s_vocab)} tokens)")
    for attr in SPECIAL_IDS:
        t_id, s_id = getattr(teacher_tokenizer, attr, None), getattr(student_tokenizer, attr, None)
        if t_id != s_id:
            return f"{attr} is {t_id} for the teacher, {s_id} for the student"
    return None


def check_vocabulary(teacher_cfg: T5Config, teacher_tokenizer, student_cfg: T5Config, student_tokenizer,
                     source: str, where: str = "distill.teacher") -> int | None:
    """How many token ids the divergence compares: the tokens of the tokenizer teacher and
    student share, or None for every row of two models of one size whose tokenizers cannot
    be compared. Teacher and student share a tokenizer when its content agrees (pieces and
    special ids), not when their embedding row counts do: a model may keep padding rows
    beyond its tokenizer (Qwen: 151,936 tokens in 152,064 rows), which the divergence
    leaves out. UserError naming both tokenizers and the first piece that differs
    otherwise: distillation across tokenizers is not supported."""
    where = f"{where}={source}"
    if teacher_tokenizer is None or student_tokenizer is None:
        if teacher_cfg.vocab_size != student_cfg.vocab_size:
            raise UserError(
                f"{where}: the teacher's vocabulary has {teacher_cfg.vocab_size} rows but the student's has "
                f"{student_cfg.vocab_size}, and the teacher has no tokenizer files to compare with the student's; "
                "distillation compares the two distributions token by token, so the teacher must share the "
                "student's tokenizer (save it beside the teacher's weights)")
        log.warning("%s: no tokenizer to compare with the student's; only the vocabulary sizes were checked", where)
        return None
    if teacher_cfg.decoder_start_token_id != student_cfg.decoder_start_token_id:
        raise UserError(f"{where}: the teacher's decoder starts with token {teacher_cfg.decoder_start_token_id}, "
                        f"the student's with {student_cfg.decoder_start_token_id}; the teacher reads the student's "
                        "decoder inputs, so the two must agree")
    differs = tokenizer_difference(teacher_tokenizer, student_tokenizer)
    if differs:
        raise UserError(
            f"{where}: the teacher's tokenizer {tokenizer_name(teacher_tokenizer)} is not the student's "
            f"{tokenizer_name(student_tokenizer)}: {differs}; distillation across tokenizers (cross-tokenizer KD) "
            "is not supported: the teacher must use the student's tokenizer")
    n = len(student_tokenizer)
    for who, cfg in (("teacher", teacher_cfg), ("student", student_cfg)):
        if cfg.vocab_size < n:
            raise UserError(f"{where}: the {who}'s vocabulary has {cfg.vocab_size} rows, fewer than the {n} tokens "
                            f"of its tokenizer {tokenizer_name(student_tokenizer)}: it cannot score every token")
    return None if n == teacher_cfg.vocab_size == student_cfg.vocab_size else n


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
    vocab = check_vocabulary(model.arch, tokenizer, student_cfg, student_tokenizer, src)
    teacher = place_teacher(model.arch, model.params, mesh, sharding.logical_rules(cfg.mesh), cfg.distill.dtype,
                            src, model.step)
    teacher.vocab = vocab
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

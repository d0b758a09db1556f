"""The frozen teachers of logit distillation (`distill:`): online models run in the train
step, and soft labels stored once by `tinyllm logits` (train/teacher_logits.py).

An online teacher is an HF T5 directory, a hub id or one of our training runs (its selected
checkpoint, through `runs.load_model`). Every teacher must share the student's tokenizer,
checked by content (`check_vocabulary`), since the divergence compares the two
distributions token by token; it may be larger, and have another number of padding rows.
An online teacher's parameters are placed on the mesh by the same logical rules as the
student's, optionally in bf16, and enter the train step as an argument that is never
donated, differentiated or given optimizer state (train/loop.py). A stored teacher's top-k
soft labels ride in the batches beside the target tokens (data/soft_labels.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tinyllm_jax.config import Config, ConfigError, DistillConfig, KDTeacherConfig
from tinyllm_jax.errors import UserError
from tinyllm_jax.model.family import family_of
from tinyllm_jax.model.t5 import T5Config
from tinyllm_jax.runtime import sharding

log = logging.getLogger("tinyllm.distill")

TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "spiece.model")


@dataclasses.dataclass(frozen=True)
class KDSpec:
    """One teacher's KD term, as the loss needs it (static in the jitted step)."""

    arch: Any  # an online teacher's architecture; None: soft labels stored, read from the batch
    weight: float
    temperature: float
    divergence: str
    jsd_beta: float
    scale: float  # temperature**2 with scale_by_t2, else 1
    streams: tuple[float, ...]  # 1.0 for a stream it teaches, 0.0 otherwise, in stream order
    vocab: int | None = None  # ids compared: the shared tokenizer's (padding rows beyond it left out); None: all
    name: str = "teacher"

    @property
    def stored(self) -> bool:
        return self.arch is None

    @property
    def prefix(self) -> str:
        """The batch keys of its stored soft labels: <prefix>.ids, .log_probs, .tail_log_prob."""
        return f"kd.{self.name}"

    def streams_S(self) -> jax.Array:
        return jnp.asarray(self.streams, jnp.float32)


@dataclasses.dataclass
class Teacher:
    """An online teacher: its architecture (its compute dtype set) and its parameters on the mesh."""

    arch: T5Config
    params: Any
    shardings: Any
    source: str
    step: int | None = None
    vocab: int | None = None  # the token ids compared (check_vocabulary); None: every row


@dataclasses.dataclass
class Distillation:
    """Every teacher of a run: its KD terms, in `distill` order, and each online teacher
    (None where the soft labels are stored)."""

    specs: tuple[KDSpec, ...]
    teachers: tuple[Teacher | None, ...]

    @property
    def online(self) -> tuple[Teacher, ...]:
        return tuple(t for t in self.teachers if t is not None)

    def params(self) -> tuple[Any, ...]:
        """The online teachers' parameters: the step's arguments after the batch."""
        return tuple(t.params for t in self.online)

    def shardings(self) -> tuple[Any, ...]:
        return tuple(t.shardings for t in self.online)


def teacher_configs(cfg: DistillConfig) -> list[KDTeacherConfig]:
    """`distill.teachers`, each named (teacher<i> by default), or the one teacher of the
    one-teacher form (`distill.teacher` and the keys beside it) as a one-item list."""
    if cfg.teachers and cfg.teacher:
        raise ConfigError("distill.teacher and distill.teachers are both set: give one teacher with distill.teacher "
                          "(and the keys beside it), or every teacher in distill.teachers")
    if cfg.teachers:
        return [dataclasses.replace(t, name=t.name or f"teacher{i}") for i, t in enumerate(cfg.teachers)]
    if cfg.teacher:
        return [KDTeacherConfig(name="teacher", model=cfg.teacher, weight=cfg.weight, temperature=cfg.temperature,
                                divergence=cfg.divergence, jsd_beta=cfg.jsd_beta, scale_by_t2=cfg.scale_by_t2,
                                streams=list(cfg.streams), dtype=cfg.dtype)]
    return []


def teacher_key(cfg: DistillConfig, i: int) -> str:
    """The config key that names teacher i, for errors."""
    return f"distill.teachers[{i}]" if cfg.teachers else "distill"


def check_distill(cfg: DistillConfig, stream_names: Sequence[str]) -> None:
    """ConfigError naming the `distill.*` key that cannot work."""
    teachers = teacher_configs(cfg)
    names = [t.name for t in teachers]
    for i, t in enumerate(teachers):
        key = teacher_key(cfg, i)
        if t.temperature <= 0:
            raise ConfigError(f"{key}.temperature: expected a positive number, found {t.temperature}")
        if t.weight < 0:
            raise ConfigError(f"{key}.weight: expected a number >= 0, found {t.weight}")
        if t.divergence == "jsd" and not 0.0 < t.jsd_beta < 1.0:
            raise ConfigError(f"{key}.jsd_beta: expected a number strictly between 0 and 1, found {t.jsd_beta} "
                              "(its limits are forward_kl and reverse_kl: choose those divergences instead)")
        for j, name in enumerate(t.streams):
            if name not in stream_names:
                raise ConfigError(f"{key}.streams[{j}]: no stream named {name!r}; data.streams: {', '.join(stream_names)}")
        if cfg.teachers and not (t.model or t.logits):
            raise ConfigError(f"{key}: name the teacher: `model` (run in the train step) or `logits` (soft labels "
                              "stored by `tinyllm logits`)")
        if t.top_k < 1:
            raise ConfigError(f"{key}.top_k: expected a number >= 1, found {t.top_k}")
        if names.count(t.name) > 1:
            raise ConfigError(f"{key}.name: {t.name!r} names two teachers; each needs its own")
    if cfg.logits_shard_examples < 1:
        raise ConfigError(f"distill.logits_shard_examples: expected a number >= 1, found {cfg.logits_shard_examples}")


def kd_spec(cfg: KDTeacherConfig | DistillConfig, arch: Any, stream_names: Sequence[str], vocab: int | None = None
            ) -> KDSpec:
    """Teacher `cfg`'s KD term (a DistillConfig: its one-teacher form); `arch` None for stored soft labels."""
    if isinstance(cfg, DistillConfig):
        check_distill(cfg, stream_names)
        cfg = teacher_configs(cfg)[0]
    chosen = set(cfg.streams or stream_names)
    return KDSpec(arch, float(cfg.weight), float(cfg.temperature), cfg.divergence, float(cfg.jsd_beta),
                  float(cfg.temperature) ** 2 if cfg.scale_by_t2 else 1.0,
                  tuple(1.0 if n in chosen else 0.0 for n in stream_names), vocab, cfg.name)


def place_teacher(arch: T5Config, host_params: Any, mesh: jax.sharding.Mesh, rules, dtype: str = "float32",
                  source: str = "", step: int | None = None) -> Teacher:
    """Host parameters -> a Teacher on `mesh`: cast to `dtype`, sharded by the logical
    `rules` exactly as a student of this architecture would be."""
    arch = arch.replace(dtype=dtype, remat="none")  # forward only: nothing to recompute
    boxed = jax.eval_shape(lambda k: family_of(arch).init(arch, k), jax.random.key(0))
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
    t_start, s_start = (getattr(c, "decoder_start_token_id", None) for c in (teacher_cfg, student_cfg))
    if t_start != s_start:  # an encoder-decoder's first decoder input
        raise UserError(f"{where}: the teacher's decoder starts with token {t_start}, the student's with {s_start}; "
                        "the teacher reads the student's decoder inputs, so the two must agree")
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
    """The one online teacher of `cfg.distill` loaded, checked against the student and placed on `mesh`."""
    check_distill(cfg.distill, [s.name for s in cfg.data.streams])
    return load_online_teacher(teacher_configs(cfg.distill)[0], teacher_key(cfg.distill, 0), cfg, student_cfg,
                               student_tokenizer, mesh)


def load_online_teacher(t: KDTeacherConfig, key: str, cfg: Config, student_cfg: Any, student_tokenizer,
                        mesh: jax.sharding.Mesh) -> Teacher:
    """Teacher `t`'s model loaded, checked against the student and placed on `mesh`."""
    from tinyllm_jax.runs import is_run_dir, load_model

    src = t.model
    if is_run_dir(src):
        model = load_model(src)
        tokenizer = model.tokenizer
    else:
        model = load_model(src, tokenizer=False)
        tokenizer = _hf_tokenizer_if_any(src)
    where = "distill.teacher" if key == "distill" else f"{key}.model"
    if family_of(model.arch).name != family_of(student_cfg).name:
        raise UserError(f"{where}={src}: a {family_of(model.arch).name} teacher cannot teach a "
                        f"{family_of(student_cfg).name} student in one step (they read different batches); "
                        "use a teacher of the student's family")
    vocab = check_vocabulary(model.arch, tokenizer, student_cfg, student_tokenizer, src, where)
    teacher = place_teacher(model.arch, model.params, mesh, sharding.logical_rules(cfg.mesh), t.dtype, src, model.step)
    teacher.vocab = vocab
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(teacher.params))
    log.info("distill: teacher %s: %s%s, %.1fM parameters in %s", t.name, src,
             f" (step {model.step})" if model.step is not None else "", n / 1e6, t.dtype)
    return teacher


def tokenizer_digest(tokenizer) -> str:
    """A digest of a tokenizer's content: its pieces and special ids (what check_vocabulary compares)."""
    h = hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([getattr(tokenizer, a, None) for a in SPECIAL_IDS]).encode())
    return h.hexdigest()[:16]


def load_distillation(cfg: Config, student_arch: Any, student_tokenizer, mesh: jax.sharding.Mesh, examples):
    """(Distillation, examples): every teacher of `cfg.distill`, online ones loaded and placed
    on `mesh`; stored ones opened and their soft labels attached to `examples` (the training
    examples) as target arrays, checked against the data and the teacher's settings."""
    from tinyllm_jax.data.soft_labels import SoftLabelStore

    stream_names = [s.name for s in cfg.data.streams]
    check_distill(cfg.distill, stream_names)
    specs, teachers = [], []
    for i, t in enumerate(teacher_configs(cfg.distill)):
        key = teacher_key(cfg.distill, i)
        if not t.logits:
            teacher = load_online_teacher(t, key, cfg, student_arch, student_tokenizer, mesh)
            specs.append(kd_spec(t, teacher.arch, stream_names, teacher.vocab))
            teachers.append(teacher)
            continue
        store = SoftLabelStore.open(t.logits, f"{key}.logits")
        stored = store.settings
        if not np.isclose(stored["temperature"], t.temperature):
            raise ConfigError(f"{key}.temperature={t.temperature}: the soft labels in {t.logits} hold the teacher's "
                              f"distribution at temperature {stored['temperature']}; set it so, or store them again")
        if stored.get("tokenizer") != tokenizer_digest(student_tokenizer):
            raise UserError(f"{key}.logits={t.logits}: stored for another tokenizer than the student's "
                            f"{tokenizer_name(student_tokenizer)}; store them again with this one")
        vocab = int(stored["vocab"])
        if vocab > student_arch.vocab_size:
            raise UserError(f"{key}.logits={t.logits}: soft labels over {vocab} tokens, but the student has "
                            f"{student_arch.vocab_size} vocabulary rows")
        chosen = set(t.streams or stream_names)
        indices = np.flatnonzero(np.isin(examples.stream_ids, [stream_names.index(n) for n in chosen]))
        spec = kd_spec(t, None, stream_names, vocab if vocab < student_arch.vocab_size else None)
        examples = store.attach(examples, indices, spec.prefix, f"{key}.logits")
        log.info("distill: teacher %s: soft labels stored in %s (top %d of %s, %d examples)", t.name, t.logits,
                 stored["top_k"], stored["teacher"], len(indices))
        specs.append(spec)
        teachers.append(None)
    return Distillation(tuple(specs), tuple(teachers)), examples


def _hf_tokenizer_if_any(src: str):
    from tinyllm_jax.model.hf import resolve_model_dir
    from tinyllm_jax.model.tokenizer import load_tokenizer

    model_dir = resolve_model_dir(src)
    if not any((Path(model_dir) / f).is_file() for f in TOKENIZER_FILES):
        return None
    return load_tokenizer(str(model_dir))

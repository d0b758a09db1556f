"""A recipe config: a training config (`tinyllm_jax.config.Config`, every section reused as
it is) plus what only a recipe has: the method, where its records come from, and the
settings of its own stages. Paths between stages are never typed by the user: a recipe
fills `data.train/validation/test`, `rationales.input/output` and the run directory of
each training stage from its earlier stages.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from tinyllm_jax.config import (COUNT, NONNEG, PROBABILITY, RANGES, Config, ConfigError, ModelConfig, OptimConfig,
                                TrainConfig, load_config, to_dict)

SPLITS = ("train", "validation", "test")


@dataclass
class ConvertSource:
    """Published reference data, converted by the recipe's first stage (`tinyllm convert`)."""

    format: Literal["tinyllm", "dss", "mentor-kd", "fair"]
    src: str  # the unpacked reference folder
    dataset: str  # the converted dataset to use, e.g. obqa
    # our split -> the converted split name; default: train, valid|validation|dev, test
    splits: dict[str, str] = field(default_factory=dict)


@dataclass
class SourceConfig:
    """Where the records come from: exactly one of `demo`, `convert`, or record files."""

    demo: Optional[dict[str, Any]] = None  # options of the embedded demo generator
    convert: Optional[ConvertSource] = None
    train: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    keep_rationales: bool = False  # demo: keep the generator's own rationales


@dataclass
class ExportConfig:
    enabled: bool = True  # write the selected checkpoint as a Hugging Face T5


@dataclass
class Sampling:
    """How one FAIR stage asks its teachers; a key left unset keeps the teacher's own
    (`rationales.teachers[i]`), except the review's num_samples, which is 1 unless set."""

    num_samples: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    max_tokens: Optional[int] = None


@dataclass
class FairConfig:
    """FAIR's rounds (recipes/fair.py). The committee is `rationales.teachers`."""

    rounds: int = 1
    # with no model.init: first train the student this many steps, so that round 1 has a
    # student whose mistakes to mine; it learns the rounds' output format, the rationale
    # stream, on the records' own rationales (gold answers where the records have none)
    warmup_steps: int = 0
    warmup_teachers: list[str] = field(default_factory=list)  # whose rationales the warm-up learns; []: all
    # each round also trains on this fraction of the other train questions, with the warm-up's
    # targets (replay: what the student knows is not overwritten by its mistakes alone);
    # 0.0: the round's mistakes only, as the paper's code does
    replay: float = 0.0
    # one learning-rate schedule over the warm-up and every round (a round continues where the
    # one before it stopped); false: each round warms up and decays again
    continue_schedule: bool = True
    # the control arm: rounds train on the replay alone (no mining, no committee) for the
    # same steps, so that FAIR minus control is what the committee's data adds
    control: bool = False
    review: bool = True  # peer review by the other teachers; false: every rationale is kept
    threshold: float = 3.0  # accepted when the mean valid review score is above it
    train_teachers: list[str] = field(default_factory=list)  # whose outputs train the student; []: all
    pick: Literal["one", "all"] = "one"  # per mistake: one feedback and one accepted rationale (seeded), or all
    carry_over: Literal["round", "accumulate"] = "round"  # train on this round's data, or every round's so far
    feedback_template: str = "fair_feedback"
    rationale_template: str = "fair_rationale"
    review_template: str = "fair_review"
    # per stage: samples a teacher and sampling settings (unset: the teacher's own; reviews: one
    # a rationale and reviewer unless review_sampling.num_samples says more)
    feedback_sampling: Sampling = field(default_factory=Sampling)
    rationale_sampling: Sampling = field(default_factory=Sampling)
    review_sampling: Sampling = field(default_factory=Sampling)
    # records of the reference's published round 0 (`tinyllm convert fair`): round 1 trains on
    # its student's mistakes, feedback and reviewed rationales; later rounds mine our student
    round1_records: Optional[str] = None
    mine_temperature: float = 0.0  # 0: greedy mining; the reference sampled at 0.3, top-p 0.9
    mine_top_p: float = 1.0
    seed: int = 0


@dataclass
class MentorConfig:
    """Mentor-KD's mentor (recipes/mentor_kd.py): its own model, optimiser and steps; it
    trains on the chains stream of `data.streams`, then samples new chains for every train
    question and gives the student soft labels (`distill:`)."""

    # the reference's mentor is flan-t5-large (init: google/flan-t5-large), lr 1e-4, weight decay 0.01
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    teachers: list[str] = field(default_factory=list)  # the records' teachers whose chains teach; []: all but "mentor"
    correct_only: bool = True  # keep a teacher chain only when its answer is the gold one
    augment: bool = True  # false: no sampling; the records' published `mentor` chains are used instead
    samples: int = 3  # chains sampled a train question (the reference's shell: 3 at temperature 0.7)
    temperature: float = 0.7
    top_k: int = 50  # transformers' default, which the reference's sampling left in place
    top_p: float = 1.0
    max_new_tokens: int = 256
    seed: int = 0
    # > 0: a `logits` stage runs the mentor once and stores its top-k soft labels for every
    # training example; the student reads them instead of running the mentor in every step
    soft_labels_top_k: int = 0


RANGES.update({
    "Sampling": {"num_samples": COUNT, "temperature": NONNEG, "top_p": PROBABILITY, "top_k": NONNEG, "max_tokens": COUNT},
    "FairConfig": {"rounds": COUNT, "warmup_steps": NONNEG, "replay": PROBABILITY, "mine_temperature": NONNEG,
                   "mine_top_p": PROBABILITY},
    # samples may be 0 with augment false; the Mentor-KD check asks for 1 when the mentor samples
    "MentorConfig": {"samples": NONNEG, "temperature": NONNEG, "top_k": NONNEG, "top_p": PROBABILITY,
                     "max_new_tokens": COUNT, "soft_labels_top_k": NONNEG},
})


@dataclass
class RecipeConfig(Config):
    method: Literal["tinyllm", "step_by_step", "fair", "mentor_kd"] = "tinyllm"
    source: SourceConfig = field(default_factory=SourceConfig)
    # the splits whose records get teacher rationales (only train's are trained on)
    rationale_splits: list[str] = field(default_factory=lambda: list(SPLITS))
    export: ExportConfig = field(default_factory=ExportConfig)
    fair: FairConfig = field(default_factory=FairConfig)
    mentor: MentorConfig = field(default_factory=MentorConfig)


def load_recipe(path: str, overrides: list[str] = ()) -> RecipeConfig:
    """Reads and checks a recipe config; the keys a recipe fills itself must be unset."""
    cfg = load_config(path, list(overrides), cls=RecipeConfig)
    check_recipe(cfg, str(path))
    return cfg


# a method's own section: set on a recipe of another method, it would do nothing
METHOD_SECTIONS = {"fair": "fair", "mentor": "mentor_kd"}


def _flat(d: dict[str, Any], prefix: str) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_method_sections(cfg: RecipeConfig, where: str) -> None:
    """`fair.*` on a TinyLLM recipe, `mentor.*` on FAIR...: refused by name, not ignored."""
    for section, method in METHOD_SECTIONS.items():
        if cfg.method == method:
            continue
        default = _flat(to_dict(type(getattr(cfg, section))()), f"{section}.")
        given = _flat(to_dict(getattr(cfg, section)), f"{section}.")
        changed = [k for k in given if given[k] != default.get(k)]
        if changed:
            raise ConfigError(f"{where}: {changed[0]}: a setting of method {method}, but this recipe's method is "
                              f"{cfg.method}; remove it (or set method: {method})")


def check_recipe(cfg: RecipeConfig, where: str) -> None:
    check_method_sections(cfg, where)
    for split in SPLITS:
        if getattr(cfg.data, split):
            raise ConfigError(f"{where}: data.{split}: set by the recipe from its data stage; give the records "
                              f"as source.{split} (or source.convert / source.demo) instead")
    if cfg.rationales.input or cfg.rationales.output:
        raise ConfigError(f"{where}: rationales.input/output: set by the recipe (its data stage's splits in, "
                          "RUN_DIR/rationales out); remove them")
    if cfg.demo:
        raise ConfigError(f"{where}: demo: a recipe takes the demo generator's options as source.demo")
    s = cfg.source
    given = [name for name, on in (("source.demo", s.demo is not None), ("source.convert", s.convert is not None),
                                   ("source.train", bool(s.train))) if on]
    if len(given) != 1:
        raise ConfigError(f"{where}: source: expected exactly one of source.demo, source.convert or record files "
                          f"(source.train, .validation, .test), found {', '.join(given) or 'none'}")
    if s.demo is not None:
        from tinyllm_jax.data.demo import check_demo_options

        check_demo_options({k: v for k, v in s.demo.items() if k != "vocab_size"}, "source.demo")
    if (s.validation or s.test) and not s.train:
        raise ConfigError(f"{where}: source.train: required with source.validation / source.test")
    bad = [x for x in cfg.rationale_splits if x not in SPLITS]
    if bad:
        raise ConfigError(f"{where}: rationale_splits: unknown split {bad[0]!r} (expected some of {list(SPLITS)})")

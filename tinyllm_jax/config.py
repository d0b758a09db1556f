"""Typed run configuration: YAML files validated against dataclasses, dotted overrides.

A config file is YAML whose keys mirror the dataclasses below. Every key is checked:
an unknown key or a value of the wrong type raises `ConfigError` naming the file, the
dotted key, what was expected and what was found, with close matches suggested.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from tinyllm_jax.errors import UserError


class ConfigError(UserError, ValueError):
    """A config key is unknown, mistyped or inconsistent."""


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    """The student. `init` names an HF checkpoint (directory or hub id) to start from;
    without it the student is built from the architecture fields, randomly initialised."""

    init: Optional[str] = None  # an HF directory (T5, Llama, Mistral, Qwen2, Qwen3), a hub id, or a training run
    # a student built from scratch (no init): t5, or a decoder-only llama | mistral | qwen2 | qwen3,
    # from the fields below (d_model: hidden size, d_ff: MLP size, num_layers, num_heads, d_kv: head size)
    family: Literal["t5", "llama", "mistral", "qwen2", "qwen3"] = "t5"
    tokenizer: Optional[str] = None  # HF dir/hub id; defaults to `init`
    # with neither init nor tokenizer: train a SentencePiece BPE tokenizer of this many
    # pieces on the training records (the demos do; saved in RUN_DIR/tokenizer)
    train_tokenizer_vocab: Optional[int] = None
    # more texts that tokenizer learns besides the records and the streams' targets (the
    # recipes add the prefixes and target forms of streams their later stages train)
    tokenizer_texts: list[str] = field(default_factory=list)
    # how that tokenizer writes numbers: "whole" (frequent numbers one piece) or "digits" (a
    # piece a digit, as Llama and Qwen do); either way the same pieces wherever a number stands
    tokenizer_numbers: Literal["digits", "whole"] = "whole"
    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_decoder_layers: Optional[int] = None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = False
    num_kv_heads: Optional[int] = None  # decoder-only: key/value heads (grouped-query attention); None: num_heads
    rope_theta: float = 10000.0  # decoder-only: rotary base
    max_position_embeddings: int = 2048  # decoder-only: the longest sequence the exported config admits
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; params stay fp32
    remat: Literal["none", "full", "dots"] = "none"


@dataclass
class StreamConfig:
    """One training stream: the answer, or one teacher's rationales."""

    name: str
    prefix: str
    weight: float = 1.0
    teacher: Optional[str] = None  # None: the answer stream; else a key of `rationales`
    # a teacher stream's target text: {rationale} (one sample) and {answer} (the record's gold
    # answer), e.g. Mentor-KD's "{rationale} --> {answer}"
    target: str = "{rationale}"
    # a teacher stream that may find no rationale in the data (it then trains nothing; FAIR's
    # streams in a round where no rationale passes review); else that is a config error
    optional: bool = False


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)
    source: Literal["files", "hf", "tfds"] = "files"
    hf_name: Optional[str] = None  # `datasets.load_dataset` name (source: hf) or TFDS name
    hf_config: Optional[str] = None  # the hub dataset's configuration (TFDS: its builder config)
    fields: dict[str, str] = field(default_factory=dict)  # record field -> source field
    streams: list[StreamConfig] = field(
        default_factory=lambda: [StreamConfig(name="answer", prefix="predict: ", weight=1.0)]
    )
    answer_source: str = "gold"  # "gold", or a teacher name whose parsed answer is the label
    max_input_length: int = 512
    max_target_length: int = 256
    encoder_length: int = 512  # packed row length, encoder side
    decoder_length: int = 256  # packed row length, decoder side
    # a decoder-only student: its packed row length (prompt + target of each example); None:
    # encoder_length + decoder_length
    sequence_length: Optional[int] = None
    prompt_suffix: str = "\n"  # a decoder-only student's prompt: prefix + input + this, then the target
    chat_template: bool = False  # a decoder-only student's prompt in its tokenizer's chat template
    max_segments_per_row: Optional[int] = None  # cap on examples packed into one row
    cache_dir: Optional[str] = None  # tokenized examples are cached here (.npz) when set
    lenient: bool = False
    shuffle_seed: int = 0
    # with no data.validation: hold out this fraction of train (by a stable hash of the
    # record id) as the validation split that selects checkpoints, e.g. 0.1 as step-by-step did
    validation_from_train: float = 0.0


@dataclass
class MeshConfig:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1
    # logical axis -> mesh axes; sharding rules are data, not code
    rules: list[list[Any]] = field(
        default_factory=lambda: [
            ["batch", ["data", "fsdp"]],
            ["embed", "fsdp"],
            ["vocab", "tensor"],
            ["heads", "tensor"],
            ["kv_heads", "tensor"],  # a decoder-only model's key/value heads (fewer with grouped queries)
            ["mlp", "tensor"],
            ["kv", None],
            ["length", None],
            ["relpos_buckets", None],
        ]
    )


@dataclass
class OptimConfig:
    name: Literal["adamw", "adafactor"] = "adamw"
    learning_rate: float = 5e-5
    schedule: Literal["linear", "cosine", "constant", "rsqrt"] = "linear"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: Optional[float] = 1.0
    grad_accum_steps: int = 1
    z_loss: float = 0.0
    label_smoothing: float = 0.0
    # a run that continues another's schedule (FAIR's rounds after the warm-up): the learning
    # rate of step s is the schedule's at schedule_offset + s, over schedule_steps in all
    # (None: schedule_offset + train.steps)
    schedule_offset: int = 0
    schedule_steps: Optional[int] = None
    # decoder positions whose vocabulary logits (the student's and every teacher's) exist at
    # once in the loss, recomputed in the backward pass; 0: the whole sequence at once
    loss_chunk_length: int = 0


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep: int = 2
    keep_best: bool = True
    best_metric: str = "eval_accuracy"
    best_mode: Literal["max", "min"] = "max"
    async_save: bool = True


@dataclass
class EvalConfig:
    every_steps: int = 500
    task: str = "choice"  # scoring type: choice, number, yesno, equation, text
    max_new_tokens: int = 64
    batch_size: int = 64
    max_examples: Optional[int] = None  # cap validation size during training
    stream: Optional[str] = None  # the stream whose prefix the student answers with; None: the answer stream


@dataclass
class KDTeacherConfig:
    """One teacher of logit distillation (an item of `distill.teachers`): a model run in the
    train step (`model`), or its top-k soft labels stored once by `tinyllm logits` (`logits`)."""

    name: str = ""  # its KD term in metrics.jsonl: loss/kd/<name> (default: teacher<i>)
    model: Optional[str] = None  # an HF T5 directory, a hub id or a training run directory
    # a directory of stored soft labels: the step reads them instead of running `model`, which
    # `tinyllm logits` runs once to write them
    logits: Optional[str] = None
    top_k: int = 64  # `tinyllm logits`: the ids kept for each target token
    logits_dtype: Literal["float32", "float16"] = "float32"  # stored log-probabilities
    weight: float = 0.3
    temperature: float = 2.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"
    jsd_beta: float = 0.5
    scale_by_t2: bool = False
    streams: list[str] = field(default_factory=list)  # the streams it teaches; empty: all
    dtype: Literal["float32", "bfloat16"] = "float32"  # an online teacher's parameters and compute


@dataclass
class DistillConfig:
    """Logit distillation from frozen teachers (Mentor-KD's soft labels): loss = sum_s w_s *
    CE_s + sum_t weight_t * KD_t, KD_t a token mean over the target tokens of teacher t's
    streams. One teacher: `teacher` and the keys below; several: `teachers`, each with its
    own settings (KDTeacherConfig). Off while both are empty."""

    teacher: Optional[str] = None  # an HF T5 directory, a hub id or a training run directory
    weight: float = 0.3  # Mentor-KD's lambda (its CE weight 1 - lambda is the stream's weight)
    temperature: float = 2.0
    divergence: Literal["forward_kl", "reverse_kl", "jsd"] = "forward_kl"  # forward: KL(teacher || student)
    jsd_beta: float = 0.5  # jsd: beta KL(p_t || m) + (1 - beta) KL(p_s || m), m = beta p_t + (1 - beta) p_s
    scale_by_t2: bool = False  # multiply KD by temperature**2 (Hinton et al.); the reference does not
    streams: list[str] = field(default_factory=list)  # the streams KD applies to; empty: all
    dtype: Literal["float32", "bfloat16"] = "float32"  # the teacher's parameters and compute
    teachers: list[KDTeacherConfig] = field(default_factory=list)  # several teachers, online or stored
    logits_shard_examples: int = 512  # `tinyllm logits`: examples a shard (the unit a rerun resumes by)


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # packed rows per global batch
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    # PRNG behind dropout: "threefry2x32" (JAX's default) or "rbg"/"unsafe_rbg", much faster
    # to draw on CPU and TPU; every choice is deterministic from seed and step.
    prng_impl: Literal["threefry2x32", "rbg", "unsafe_rbg"] = "rbg"
    # resuming a run on other training records (their content digest differs from the one
    # the run started on) is refused unless this is true
    allow_data_change: bool = False
    # with model.init one of our runs: start from that run's optimizer state (Adam's moments)
    # at its selected checkpoint, not from zero moments; the learning-rate schedule is this
    # run's own (optim.schedule_offset places it). FAIR's rounds set it with fair.continue_schedule.
    continue_optimizer: bool = False


@dataclass
class TeacherConfig:
    """One teacher LLM for `tinyllm rationales`: an OpenAI-compatible server or a local T5."""

    name: str
    backend: Literal["openai", "local", "local-t5", "demo"] = "openai"  # local: our JAX models (local-t5, its old name)
    # served model name (openai), an HF T5 directory / hub id / run directory (local-t5),
    # or the style of a demo teacher (demo: careful or terse)
    model: str = ""
    base_url: str = "http://127.0.0.1:8000/v1"
    endpoint: Literal["completions", "chat"] = "completions"
    api_key_env: Optional[str] = None  # the key is read from this variable, never stored
    system_prompt: Optional[str] = None  # chat endpoint only
    template: str = "teacher_forcing"  # a built-in template or a key of `rationales.templates`
    num_samples: int = 1
    temperature: float = 0.0
    top_k: int = 0  # 0: off (and not sent: OpenAI's own API rejects it)
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # added to the template's stop strings
    extra_body: dict[str, Any] = field(default_factory=dict)  # merged into each request
    concurrency: int = 8
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_s: float = 1.0  # first retry delay; doubles each time, with jitter
    max_backoff_s: float = 30.0
    max_consecutive_failures: int = 50  # then the run stops (the server is down)
    batch_size: int = 16  # local-t5: prompts a decode call
    max_input_tokens: int = 1024  # local-t5: longer prompts lose their beginning
    error_rate: Optional[float] = None  # demo: fraction of wrong answers (default: careful 0, terse 0.15)


@dataclass
class RationalesConfig:
    input: list[str] = field(default_factory=list)  # record JSONL files
    output: str = ""  # directory: one JSONL an input file (same name), report.json, cache
    teachers: list[TeacherConfig] = field(default_factory=list)
    templates: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {example, ...}
    num_examples: int = 2  # in-context examples per prompt
    examples_file: Optional[str] = None  # records with rationales; else a zero-shot pass
    zero_shot_pool: int = 16  # records of each input given a zero-shot pass for examples
    task: Optional[str] = None  # answer parsing (choice, number, ...); default: eval.task
    cache: Optional[str] = None  # default: OUTPUT/cache.jsonl
    seed: int = 0
    progress: bool = True


@dataclass
class Config:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rationales: RationalesConfig = field(default_factory=RationalesConfig)
    demo: dict[str, Any] = field(default_factory=dict)  # options of the embedded demo data


# --------------------------------------------------------------------------- ranges

# The numbers a key admits, beyond its type: (lowest, highest, highest included). A negative
# learning rate or stream weight trains the wrong way without a word; a batch, a row length or
# a checkpoint interval of 0 failed deep inside the run. Keys not listed take any value of
# their type (mesh.data's -1 means "the rest of the devices").
ANY = float("inf")
COUNT, NONNEG, FRACTION, PROBABILITY = (1, ANY, True), (0, ANY, True), (0, 1, False), (0, 1, True)
RANGES: dict[str, dict[str, tuple[float, float, bool]]] = {
    "ModelConfig": {k: COUNT for k in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                                        "num_heads", "relative_attention_num_buckets",
                                        "relative_attention_max_distance", "num_kv_heads", "max_position_embeddings",
                                        "train_tokenizer_vocab")}
                   | {"dropout_rate": FRACTION, "layer_norm_epsilon": NONNEG, "rope_theta": NONNEG},
    "StreamConfig": {"weight": NONNEG},
    "DataConfig": {k: COUNT for k in ("max_input_length", "max_target_length", "encoder_length", "decoder_length",
                                       "sequence_length", "max_segments_per_row")}
                  | {"validation_from_train": FRACTION},
    "MeshConfig": {"fsdp": COUNT, "tensor": COUNT},
    "OptimConfig": {"learning_rate": NONNEG, "warmup_steps": NONNEG, "weight_decay": NONNEG, "b1": FRACTION,
                    "b2": FRACTION, "eps": NONNEG, "clip_norm": NONNEG, "grad_accum_steps": COUNT,
                    "z_loss": NONNEG, "label_smoothing": FRACTION, "schedule_offset": NONNEG,
                    "schedule_steps": COUNT, "loss_chunk_length": NONNEG},
    "CheckpointConfig": {"every_steps": COUNT, "keep": COUNT},
    "EvalConfig": {"every_steps": NONNEG, "max_new_tokens": COUNT, "batch_size": COUNT, "max_examples": COUNT},
    "KDTeacherConfig": {"top_k": COUNT, "weight": NONNEG, "temperature": NONNEG, "jsd_beta": PROBABILITY},
    "DistillConfig": {"weight": NONNEG, "temperature": NONNEG, "jsd_beta": PROBABILITY,
                      "logits_shard_examples": COUNT},
    "TrainConfig": {"steps": COUNT, "batch_size": COUNT, "log_every": COUNT},
    "TeacherConfig": {"num_samples": COUNT, "temperature": NONNEG, "top_k": NONNEG, "top_p": PROBABILITY,
                      "max_tokens": COUNT, "concurrency": COUNT, "timeout_s": NONNEG, "max_retries": NONNEG,
                      "backoff_s": NONNEG, "max_backoff_s": NONNEG, "max_consecutive_failures": COUNT,
                      "batch_size": COUNT, "max_input_tokens": COUNT, "error_rate": PROBABILITY},
    "RationalesConfig": {"num_examples": NONNEG, "zero_shot_pool": NONNEG},
}
# the keys that must be above their lowest value, not at it (0 would divide or do nothing)
ABOVE = {"ModelConfig": {"layer_norm_epsilon", "rope_theta"}, "OptimConfig": {"clip_norm"},
         "KDTeacherConfig": {"temperature"}, "DistillConfig": {"temperature"}, "TeacherConfig": {"timeout_s", "top_p"},
         "Sampling": {"top_p"}, "FairConfig": {"mine_top_p"}, "MentorConfig": {"top_p"}}


def _check_range(cls: type, key: str, value: Any, where: str, dotted: str) -> None:
    bounds = RANGES.get(cls.__name__, {}).get(key)
    if bounds is None or not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    low, high, high_included = bounds
    above = key in ABOVE.get(cls.__name__, ())
    ok = (value > low if above else value >= low) and (value <= high if high_included else value < high)
    if not ok:
        lo = f"above {low:g}" if above else f"at least {low:g}"
        hi = "" if high == ANY else f" and {'at most' if high_included else 'below'} {high:g}"
        kind = "a whole number" if isinstance(value, int) else "a number"
        raise ConfigError(f"{where}: key {dotted!r}: expected {kind} {lo}{hi}, found {value!r}")


# --------------------------------------------------------------------------- loading


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: where (line, column, 1-based) and what."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    hint = " (YAML indents with spaces, not tabs)" if "'\\t'" in problem else ""
    return f"{where}{' '.join(problem.split())}{hint}"


def load_config(path: str | Path | None, overrides: list[str] = (), cls: type = Config) -> Any:
    """Reads YAML `path` (or starts from defaults), applies `key=value` overrides, validates."""
    where = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder; expected a YAML config file (e.g. configs/demo.yaml)")
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}); expected a YAML config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(e)}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a mapping at top level, found {type(raw).__name__}")
    file_raw = copy.deepcopy(raw)
    for item in overrides:
        apply_override(raw, item)
    try:
        return from_dict(cls, raw, where=where)
    except ConfigError:
        _blame_override(cls, file_raw, overrides, where)
        raise


def _blame_override(cls: type, raw: dict[str, Any], overrides: list[str], where: str) -> None:
    """When the file alone is valid, the error names the first override that breaks it
    ("override 'train.steps=many': key 'train.steps': ..."), not the file."""
    from_dict(cls, raw, where=where)  # the file's own error, if it has one
    for item in overrides:
        apply_override(raw, item)
        from_dict(cls, raw, where=f"override {item!r}")


def apply_override(raw: dict[str, Any], item: str) -> None:
    """`a.b.c=value`: value parsed as YAML (so 3, 1e-4, true, [a, b] keep their types).
    A numeric part indexes a list given in the config: `data.streams.1.weight=2`."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.learning_rate=1e-4")
    parts = key.strip().split(".")
    node: Any = raw
    for depth, p in enumerate(parts):
        last = depth == len(parts) - 1
        where = ".".join(parts[:depth]) or "<root>"
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"override {item!r}: {where} is a list of {len(node)}; {p!r} is not an index into it")
            p = int(p)
        elif not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {where} is not a section")
        if last:
            node[p] = _parse_value(value)
        elif isinstance(node, dict):
            node = node.setdefault(p, {})
        else:
            node = node[p]


def _parse_value(text: str) -> Any:
    """YAML scalars and [..]/{..} literals; anything else (e.g. a prefix "why: ") stays text."""
    if not text.strip():
        return ""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, (list, dict)) and not text.lstrip().startswith(("[", "{")):
        return text
    return value


def from_dict(cls: type, data: Any, where: str = "<config>", prefix: str = "") -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: key {prefix or '<root>'!r}: expected a mapping, found {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""
            raise ConfigError(
                f"{where}: unknown key {dotted!r}{hint} (known keys here: {', '.join(fields)})"
            )
        kwargs[key] = _coerce(hints[key], value, where, dotted)
        _check_range(cls, key, kwargs[key], where, dotted)
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where}: missing required key {prefix + missing[0]!r}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, where, key)
            except ConfigError as e:
                errors.append(str(e))
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{where}: key {key!r}: expected {_name(tp)}, found {value!r}"
        )
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: key {key!r}: expected one of {list(args)}, found {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where, key + ".")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: key {key!r}: expected a list, found {value!r}")
        return [_coerce(args[0] if args else Any, v, where, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: key {key!r}: expected a mapping, found {value!r}")
        vt = args[1] if args else Any
        return {str(k): _coerce(vt, v, where, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 5e-5 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise ConfigError(f"{where}: key {key!r}: expected {_name(tp)}, found {value!r}")


def _name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")

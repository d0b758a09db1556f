"""Records -> training examples: the answer stream plus one prefixed stream per teacher.

Each stream of `data.streams` turns every record into examples (encoder ids, decoder ids):

    answer stream    prefix + student input  ->  answer (gold, or a teacher's parsed answer)
    teacher stream   prefix + student input  ->  rationale, one example per rationale sample
                                                 (in the stream's `target` form, e.g.
                                                 "{rationale} --> {answer}")

The student input is the TinyLLM reference layout, with an optional context first:

    [context\\n]question\\nAnswer Choices:\\n(a) first\\n(b) second ...

Inputs longer than `max_input_length` lose context tokens first (from the end); only when
prefix, question and choices alone do not fit is the question cut too (from its start, as
the ask usually ends it). The choices are never cut. Both are counted per
stream and reported, as are targets cut at `max_target_length` and records with no
rationale for a stream's teacher. Pieces are tokenized once each, and the examples are kept
as flat numpy arrays (optionally cached on disk), so epochs never tokenize again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from tinyllm_jax.config import ConfigError, DataConfig, StreamConfig
from tinyllm_jax.errors import UserError

log = logging.getLogger(__name__)

CHOICE_LETTERS = "abcdefghijklmnopqrstuvwxyz"


# --------------------------------------------------------------------------- presets


def tinyllm_streams(gamma: float = 1.0, alpha: float = 1.0, beta: float = 1.0,
                    teachers: Sequence[str] = ("flan-t5", "llama")) -> list[StreamConfig]:
    """TinyLLM's streams: `predict:` (answer, gamma), `explain:` (first teacher, alpha),
    `rationale:` (second teacher, beta)."""
    first, second = teachers
    return [StreamConfig("answer", "predict: ", gamma),
            StreamConfig(first, "explain: ", alpha, teacher=first),
            StreamConfig(second, "rationale: ", beta, teacher=second)]


def step_by_step_streams(alpha: float = 0.5, teacher: str = "palm") -> list[StreamConfig]:
    """Distilling step-by-step: `predict:` weighted alpha, `explain:` weighted 1 - alpha."""
    return [StreamConfig("answer", "predict: ", alpha),
            StreamConfig(teacher, "explain: ", 1.0 - alpha, teacher=teacher)]


TARGET_FIELDS = ("rationale", "answer")
_PLACEHOLDER = re.compile(r"\{(\w*)\}")
DEFAULT_TARGET = "{rationale}"


def check_target(stream: StreamConfig, index: int) -> None:
    """ConfigError unless a teacher stream's `target` names {rationale} and only known fields
    (an answer stream keeps the default: its target is the answer)."""
    key = f"data.streams[{index}].target ({stream.name!r})"
    if stream.teacher is None:
        if stream.target != DEFAULT_TARGET:
            raise ConfigError(f"{key}: a target form applies to teacher streams; an answer stream's target "
                              f"is the answer, found {stream.target!r}")
        return
    names = _PLACEHOLDER.findall(stream.target)
    unknown = [n for n in names if n not in TARGET_FIELDS]
    if unknown or "rationale" not in names:
        found = f"unknown field {{{unknown[0]}}}" if unknown else "no {rationale}"
        raise ConfigError(f"{key}: expected a form of {{rationale}} and optionally {{answer}}, e.g. "
                          f"'{{rationale}} --> {{answer}}'; found {stream.target!r} ({found})")


def render_target(form: str, rationale: str, answer: str) -> str:
    """`form` with {rationale} and {answer} filled in one pass (a rationale holding the text
    "{answer}" stays as it is); the default form gives the rationale unchanged."""
    if form == DEFAULT_TARGET:
        return rationale
    values = {"rationale": rationale, "answer": answer}
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], form)


def stream_weights(streams: Sequence[StreamConfig]) -> np.ndarray:
    """Loss weight of each stream, indexed by the batches' `decoder_stream_ids`."""
    return np.asarray([s.weight for s in streams], np.float32)


# --------------------------------------------------------------------------- input text


def format_choices(choices: Sequence[str]) -> str:
    """`Answer Choices:\\n(a) ...\\n(b) ...`, or "" when there are none."""
    if not choices:
        return ""
    if len(choices) > len(CHOICE_LETTERS):
        raise UserError(f"{len(choices)} answer choices: at most {len(CHOICE_LETTERS)} are supported")
    return "Answer Choices:\n" + "\n".join(f"({CHOICE_LETTERS[i]}) {c}" for i, c in enumerate(choices))


def format_input(record: dict[str, Any], prefix: str = "") -> str:
    """The student's input text for a record, untruncated (for decoding and display)."""
    parts = [record.get("context") or "", record["question"], format_choices(record.get("choices", ()))]
    return prefix + "\n".join(p for p in parts if p)


# --------------------------------------------------------------------------- tokenizer text


def tokenizer_corpus(records: Sequence[dict[str, Any]], streams: Sequence[StreamConfig],
                     extra: Sequence[str] = ()) -> list[str]:
    """Every text a tokenizer trained for these records and streams must read and write: the
    student's inputs (with each stream's prefix), every answer, and every teacher stream's
    targets in its own form ("{rationale} --> {answer}" included), then `extra`. A tokenizer
    trained on these leaves no target without pieces of its own (no unknown token)."""
    texts = [s.prefix for s in streams if s.prefix] + list(extra)
    texts += [render_target(s.target, "", "") for s in streams if s.teacher is not None and s.target != DEFAULT_TARGET]
    for r in records:
        texts.append(format_input(r))
        texts.append(r["answer"])
        texts.extend(a for answers in r.get("teacher_answers", {}).values() for a in answers)
        for stream in streams:
            if stream.teacher is not None:
                texts.extend(render_target(stream.target, x, r["answer"]) for x in r.get("rationales", {}).get(stream.teacher, []))
        named = {s.teacher for s in streams}
        texts.extend(x for t, xs in r.get("rationales", {}).items() if t not in named for x in xs)
    return texts


# --------------------------------------------------------------------------- examples


@dataclass
class StreamStats:
    """What building one stream's examples did to the data."""

    examples: int = 0
    records: int = 0  # records looked at
    teacher: str | None = None  # a teacher stream's teacher (None: the answer stream)
    records_without_rationale: int = 0
    context_truncated: int = 0
    question_truncated: int = 0  # only when prefix, question and choices alone overflow
    target_truncated: int = 0
    answer_from_gold: int = 0  # answer_source is a teacher with no answer for the record
    skipped: list[str] = field(default_factory=list)  # cannot be built (lenient only)

    def summary(self) -> str:
        parts = [f"{self.examples} examples"]
        if self.records_without_rationale and self.records:  # FAIR's feedback stream: only feedback records have one
            parts[0] += (f" from the {self.records - self.records_without_rationale} of {self.records} records "
                         f"that have a {self.teacher!r} rationale")
        elif self.records_without_rationale:  # read from an older cache, which did not count the records
            parts.append(f"{self.records_without_rationale} records have no {self.teacher or 'such'} rationale")
        for name in ("context_truncated", "question_truncated", "target_truncated", "answer_from_gold"):
            if getattr(self, name):
                parts.append(f"{getattr(self, name)} {name.replace('_', ' ')}")
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        return ", ".join(parts)


@dataclass
class Examples:
    """Tokenized examples of all streams, as flat arrays: example i's encoder ids are
    `enc_tokens[enc_offsets[i]:enc_offsets[i + 1]]` (ending with EOS), likewise decoder."""

    enc_tokens: np.ndarray
    enc_offsets: np.ndarray
    dec_tokens: np.ndarray
    dec_offsets: np.ndarray
    stream_ids: np.ndarray  # index into `stream_names` (config order)
    record_index: np.ndarray  # index into `record_ids`
    stream_names: list[str]
    record_ids: list[str]
    stats: dict[str, StreamStats] = field(default_factory=dict)
    # per-target-token arrays (stored soft labels): name -> array whose row t belongs to
    # decoder token t of `dec_tokens`; `rows_to_batch` places them beside the targets. Any
    # object with `shape`, `dtype` and numpy fancy indexing serves (a table read lazily).
    target_arrays: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.stream_ids)

    @property
    def enc_lengths(self) -> np.ndarray:
        return np.diff(self.enc_offsets)

    @property
    def dec_lengths(self) -> np.ndarray:
        return np.diff(self.dec_offsets)

    def enc(self, i: int) -> np.ndarray:
        return self.enc_tokens[self.enc_offsets[i]:self.enc_offsets[i + 1]]

    def dec(self, i: int) -> np.ndarray:
        return self.dec_tokens[self.dec_offsets[i]:self.dec_offsets[i + 1]]

    def subset(self, indices: Sequence[int] | np.ndarray) -> "Examples":
        """The examples at `indices`, in that order (e.g. one stream, for evaluation)."""
        idx = np.asarray(indices, np.int64)
        enc, enc_off = _gather(self.enc_tokens, self.enc_offsets, idx)
        dec, dec_off = _gather(self.dec_tokens, self.dec_offsets, idx)
        at = _positions(self.dec_offsets, idx)
        return Examples(enc, enc_off, dec, dec_off, self.stream_ids[idx], self.record_index[idx],
                        self.stream_names, self.record_ids, self.stats,
                        {k: v[at] for k, v in self.target_arrays.items()})

    def with_target_arrays(self, arrays: dict[str, Any]) -> "Examples":
        """These examples carrying `arrays` too (each with a row per decoder token)."""
        for name, a in arrays.items():
            if a.shape[0] != len(self.dec_tokens):
                raise ValueError(f"target array {name!r} has {a.shape[0]} rows for {len(self.dec_tokens)} target tokens")
        return dataclasses.replace(self, target_arrays={**self.target_arrays, **arrays})

    def stream(self, name: str) -> "Examples":
        if name not in self.stream_names:
            raise UserError(f"no stream named {name!r}; streams: {', '.join(self.stream_names)}")
        return self.subset(np.flatnonzero(self.stream_ids == self.stream_names.index(name)))

    def save(self, path: str | Path) -> None:
        meta = {"stream_names": self.stream_names, "record_ids": self.record_ids,
                "stats": {k: dataclasses.asdict(v) for k, v in self.stats.items()}}
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, enc_tokens=self.enc_tokens, enc_offsets=self.enc_offsets,
                 dec_tokens=self.dec_tokens, dec_offsets=self.dec_offsets,
                 stream_ids=self.stream_ids, record_index=self.record_index,
                 meta=np.frombuffer(json.dumps(meta).encode(), np.uint8))
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path) -> "Examples":
        with np.load(path) as z:
            meta = json.loads(z["meta"].tobytes().decode())
            arrays = {k: z[k] for k in ("enc_tokens", "enc_offsets", "dec_tokens", "dec_offsets",
                                        "stream_ids", "record_index")}
        stats = {k: StreamStats(**v) for k, v in meta["stats"].items()}
        return cls(**arrays, stream_names=meta["stream_names"], record_ids=meta["record_ids"], stats=stats)


def _gather(tokens: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lengths = offsets[idx + 1] - offsets[idx]
    new_off = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return tokens[_positions(offsets, idx)], new_off


def _positions(offsets: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """The flat token positions of examples `idx`, in that order."""
    lengths = offsets[idx + 1] - offsets[idx]
    starts = np.cumsum(lengths) - lengths
    return (np.repeat(offsets[idx] - starts, lengths) + np.arange(int(lengths.sum()))).astype(np.int64)


def check_streams(streams: Sequence[StreamConfig], records: Sequence[dict[str, Any]],
                  answer_source: str = "gold") -> None:
    """Raises ConfigError for duplicate stream names, or a teacher found in no record."""
    names = [s.name for s in streams]
    if not streams:
        raise ConfigError("data.streams: empty; at least one stream is needed")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"data.streams: stream names must be unique, found {dup[0]!r} twice")
    found = sorted({t for r in records for t in r.get("rationales", {})})
    for i, s in enumerate(streams):
        check_target(s, i)
        if s.teacher is not None and s.teacher not in found and s.optional:
            log.warning("stream %s: no record has a rationale of %r; it trains nothing", s.name, s.teacher)
        elif s.teacher is not None and s.teacher not in found:
            raise ConfigError(
                f"data.streams[{i}] ({s.name!r}): teacher {s.teacher!r} has no rationale in any "
                f"record; teachers found: {', '.join(found) or 'none'}"
            )
    if answer_source != "gold":
        answered = sorted({t for r in records for t in r.get("teacher_answers", {})})
        if answer_source not in answered:
            raise ConfigError(
                f"data.answer_source: teacher {answer_source!r} has no parsed answer "
                f"(teacher_answers) in any record; teachers with answers: {', '.join(answered) or 'none'}"
            )


@dataclass(frozen=True)
class Prompt:
    """How a decoder-only student reads its input (`causal`): the prefixed input text, then
    `suffix`, tokenized as the tokenizer does it (BOS included where it adds one); or, with
    `chat_template`, the prefixed input as one user turn in the tokenizer's chat template
    with the assistant's turn opened. The target follows, then EOS. An encoder-decoder
    student (not causal) reads the input alone, ending with EOS."""

    causal: bool = False
    suffix: str = "\n"
    chat_template: bool = False


ENCODER_INPUT = Prompt()


def prompt_of(cfg: DataConfig, causal: bool) -> Prompt:
    return Prompt(True, cfg.prompt_suffix, cfg.chat_template) if causal else ENCODER_INPUT


def build_examples(
    records: Sequence[dict[str, Any]],
    streams: Sequence[StreamConfig],
    tokenizer: Any,
    max_input_length: int = 512,
    max_target_length: int = 256,
    answer_source: str = "gold",
    lenient: bool = False,
    cache_dir: str | Path | None = None,
    prompt: Prompt = ENCODER_INPUT,
) -> Examples:
    """Tokenizes every stream's examples once; with `cache_dir`, reuses an earlier result
    for the same records, streams, lengths and tokenizer. Stream ids follow `streams` order.
    `prompt` says how the input is written (an encoder's input, or a decoder-only prompt).

    An input whose prefix, question and choices exceed `max_input_length` even with no
    context and the question cut away cannot be built: UserError, or skipped with `lenient`."""
    check_streams(streams, records, answer_source)
    cache = None
    if cache_dir is not None:
        key = _cache_key(records, streams, tokenizer, max_input_length, max_target_length, answer_source, lenient,
                         *([dataclasses.asdict(prompt)] if prompt.causal else []))
        cache = Path(cache_dir) / f"examples-{key}.npz"
        if cache.is_file():
            return Examples.load(cache)
    builder = _PromptBuilder if prompt.causal else _ExampleBuilder
    examples = builder(records, tokenizer, max_input_length, max_target_length, lenient, prompt).build(
        streams, answer_source)
    for name, st in examples.stats.items():
        (log.warning if st.question_truncated or st.skipped else log.info)("stream %s: %s", name, st.summary())
    if cache is not None:
        examples.save(cache)
    return examples


def examples_for_split(cfg: DataConfig, split: str, tokenizer: Any,
                       streams: Sequence[StreamConfig] | None = None, causal: bool = False) -> Examples:
    """Loads `split` as `cfg` says and builds its examples (all of `cfg.streams` by default),
    as prompts of a decoder-only student when `causal`."""
    from tinyllm_jax.data.sources import load_split

    records, _ = load_split(cfg, split)
    return build_examples(records, streams if streams is not None else cfg.streams, tokenizer,
                          cfg.max_input_length, cfg.max_target_length, cfg.answer_source,
                          cfg.lenient, cfg.cache_dir, prompt_of(cfg, causal))


def _cache_key(records, streams, tokenizer, *settings) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([dataclasses.asdict(s) for s in streams], sort_keys=True).encode())
    h.update(json.dumps(settings).encode())
    h.update(f"{type(tokenizer).__name__}|{getattr(tokenizer, 'name_or_path', '')}|{len(tokenizer)}".encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps(list(records), sort_keys=True, ensure_ascii=False).encode())
    return h.hexdigest()[:20]


class _ExampleBuilder:
    """Tokenizes the pieces of every record once, then assembles each stream's examples."""

    def __init__(self, records, tokenizer, max_input_length: int, max_target_length: int, lenient: bool,
                 prompt: Prompt = ENCODER_INPUT):
        self.prompt = prompt
        self.records = records
        self.tok = tokenizer
        self.max_in = max_input_length
        self.max_out = max_target_length
        self.lenient = lenient
        self.eos = tokenizer.eos_token_id
        if self.eos is None:
            raise UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no EOS token")
        self.context = self._ids([r.get("context") or "" for r in records])
        self.question = self._ids([r["question"] for r in records])
        self.choices = self._ids([format_choices(r.get("choices", ())) for r in records])

    def _ids(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tok(texts, add_special_tokens=False)["input_ids"]

    def build(self, streams: Sequence[StreamConfig], answer_source: str) -> Examples:
        enc, dec, sid, rec_idx, stats = [], [], [], [], {}
        for stream_id, stream in enumerate(streams):
            st = stats[stream.name] = StreamStats(records=len(self.records), teacher=stream.teacher)
            prefix = self._ids([stream.prefix])[0] if stream.prefix else []
            for i, targets in self._targets(stream, answer_source, st):
                try:
                    enc_ids = self._input(i, prefix, st, stream.name)
                except UserError as err:
                    if not self.lenient:
                        raise
                    st.skipped.append(str(err))
                    continue
                for target in targets:
                    if len(target) + 1 > self.max_out:
                        st.target_truncated += 1
                        target = target[: self.max_out - 1]
                    enc.append(enc_ids)
                    dec.append(target + [self.eos])
                    sid.append(stream_id)
                    rec_idx.append(i)
                    st.examples += 1
        if not enc:
            raise UserError("no training examples: every stream came out empty")
        return Examples(*_flat(enc), *_flat(dec), np.asarray(sid, np.int32), np.asarray(rec_idx, np.int32),
                        [s.name for s in streams], [r["id"] for r in self.records], stats)

    def _targets(self, stream: StreamConfig, answer_source: str, st: StreamStats):
        """(record index, target ids of each example) for the records this stream covers."""
        if stream.teacher is None:
            texts = []
            for r in self.records:
                answers = r.get("teacher_answers", {}).get(answer_source) if answer_source != "gold" else None
                if answer_source != "gold" and not answers:
                    st.answer_from_gold += 1
                texts.append(answers[0] if answers else r["answer"])
            yield from ((i, [ids]) for i, ids in enumerate(self._ids(texts)))
            return
        owners, texts = [], []
        for i, r in enumerate(self.records):
            samples = r.get("rationales", {}).get(stream.teacher, [])
            if not samples:
                st.records_without_rationale += 1
            owners += [i] * len(samples)
            texts += [render_target(stream.target, x, r["answer"]) for x in samples]
        by_record: dict[int, list[list[int]]] = {}
        for i, ids in zip(owners, self._ids(texts)):
            by_record.setdefault(i, []).append(ids)
        yield from by_record.items()

    def _input(self, i: int, prefix: list[int], st: StreamStats, stream: str) -> list[int]:
        """prefix + context + question + choices + EOS, cut to fit: context first."""
        ctx, q, ch = self.context[i], self.question[i], self.choices[i]
        room = self.max_in - len(prefix) - len(ch) - 1
        if room < 1:
            raise UserError(
                f"record {self.records[i]['id']!r}, stream {stream!r}: prefix and answer choices "
                f"alone take {len(prefix) + len(ch) + 1} tokens, over max_input_length {self.max_in}; "
                "raise data.max_input_length"
            )
        if len(ctx) + len(q) > room:
            if ctx:
                st.context_truncated += 1
            ctx = ctx[: max(0, room - len(q))]
            if len(q) > room:  # keep the question's end: that is where the ask usually is
                st.question_truncated += 1
                q = q[len(q) - room:]
        return prefix + ctx + q + ch + [self.eos]


class _PromptBuilder(_ExampleBuilder):
    """A decoder-only student's examples: the prompt is the whole input text tokenized at
    once (so the tokenizer's own joins, BOS and chat template apply), cut to fit as the
    encoder input is (context first, then the question's start), and never ends in EOS."""

    def _input(self, i: int, prefix: list[int], st: StreamStats, stream: str) -> list[int]:
        r = self.records[i]
        ctx, q, ch = r.get("context") or "", r["question"], format_choices(r.get("choices", ()))
        ids = self._prompt_ids(self._prefix_text, ctx, q, ch)
        if len(ids) <= self.max_in:
            return ids
        if ctx:
            st.context_truncated += 1
            ctx_ids = self.context[i]
            keep = len(ctx_ids)
            while keep > 0 and len(ids) > self.max_in:
                keep = max(0, keep - (len(ids) - self.max_in) - 1)
                ids = self._prompt_ids(self._prefix_text, self.tok.decode(ctx_ids[:keep]), q, ch)
            if len(ids) <= self.max_in:
                return ids
        q_ids = self.question[i]
        keep = len(q_ids)
        while keep > 0 and len(ids) > self.max_in:  # the question's end: where the ask usually is
            keep = max(0, keep - (len(ids) - self.max_in) - 1)
            ids = self._prompt_ids(self._prefix_text, "", self.tok.decode(q_ids[len(q_ids) - keep:]), ch)
        if len(ids) > self.max_in:
            raise UserError(
                f"record {r['id']!r}, stream {stream!r}: the prompt without its question and context takes "
                f"{len(ids)} tokens, over max_input_length {self.max_in}; raise data.max_input_length")
        st.question_truncated += 1
        return ids

    def _targets(self, stream: StreamConfig, answer_source: str, st: StreamStats):
        self._prefix_text = stream.prefix
        yield from super()._targets(stream, answer_source, st)

    def _prompt_ids(self, prefix: str, ctx: str, q: str, ch: str) -> list[int]:
        text = prefix + "\n".join(p for p in (ctx, q, ch) if p)
        if self.prompt.chat_template:
            ids = self.tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        return self._leading_specials + self.tok(text + self.prompt.suffix, add_special_tokens=False)["input_ids"]

    @property
    def _leading_specials(self) -> list[int]:
        """What the tokenizer puts before a text (BOS for Llama; nothing for Qwen or T5)."""
        if not hasattr(self, "_lead"):
            plain = self.tok("a", add_special_tokens=False)["input_ids"]
            full = self.tok("a", add_special_tokens=True)["input_ids"]
            self._lead = full[: full.index(plain[0])] if plain and plain[0] in full else []
        return self._lead


def _flat(seqs: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.fromiter((len(s) for s in seqs), np.int64, len(seqs))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.fromiter((t for s in seqs for t in s), np.int32, int(offsets[-1]))
    return tokens, offsets

"""Teacher prompts: Jinja templates from the config, in-context examples, prompt hashes.

A template renders one record as one block; the block ends with `{{ rationale }}`. A prompt
is the optional header, then k example blocks (records that already have a rationale), then
the query block cut just before its rationale, joined by the separator:

    Question: Which gas do plants take in?
    Options: (a) oxygen (b) carbon dioxide
    Answer: (b)
    Rationale: Let's think step by step. Plants take in carbon dioxide ...

    Question: <the record>
    ...
    Rationale: Let's think step by step.

Variables a block sees: id, question, context, choices (list), options ("(a) x (b) y"),
answer (gold text), answer_label ("(b)" when there are choices, else the answer), rationale.
Templates that never name `answer` or `answer_label` (FAIR-style rationales) keep the gold
answer out of the prompt.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import string
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.meta
import jinja2.sandbox

from tinyllm_jax.config import ConfigError

_ENV = jinja2.sandbox.ImmutableSandboxedEnvironment(
    undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False
)
_GOLD_VARS = {"answer", "answer_label"}
_VARS = {"id", "question", "context", "choices", "options", "rationale", "meta"} | _GOLD_VARS
KINDS = ("rationale", "feedback", "review")  # what a template asks of the teacher
_MARK = "\x00RATIONALE\x00"  # stands for the rationale when a block is cut into a query

_QUESTION = (
    "Question: {{ question }}\n"
    "{% if context %}Context: {{ context }}\n{% endif %}"
    "{% if choices %}Options: {{ options }}\n{% endif %}"
)

# TinyLLM's teacher forcing: the teacher sees the gold answer and explains it.
# `no_gold`: the teacher answers on its own (FAIR's rationales), so agreement measures it.
BUILTIN_TEMPLATES: dict[str, dict[str, Any]] = {
    "teacher_forcing": {
        "example": _QUESTION + "Answer: {{ answer_label }}\nRationale: Let's think step by step. {{ rationale }}",
        "separator": "\n\n",
        "stop": ["\nQuestion:"],
    },
    "no_gold": {
        "example": _QUESTION + "Answer: Let's think step by step. {{ rationale }}",
        "separator": "\n\n",
        "stop": ["\nQuestion:"],
    },
    # Distilling step-by-step's few-shot chain of thought (Wei et al.'s CoS-E layout): the
    # teacher reasons, then states its answer; the answer sentence is kept as the parsed
    # teacher answer and cut from the rationale the student learns to explain with.
    "few_shot_cot": {
        "example": "Q: {{ question }}\n"
                   "{% if context %}Context: {{ context }}\n{% endif %}"
                   "{% if choices %}Answer Choices:\n{% for c in choices %}({{ 'abcdefghijklmnopqrstuvwxyz'[loop.index0] }}) "
                   "{{ c }}\n{% endfor %}{% endif %}A: {{ rationale }}",
        "separator": "\n\n",
        "stop": ["\nQ:"],
        "strip_answer": True,
    },
}
_FAIR_GOLD = "Hint: the correct answer is {{ answer_label }}{% if choices %} {{ answer }}{% endif %}.\n"
# FAIR's committee (arXiv:2410.03663): feedback on the student's wrong answer and peer review
# of another teacher's rationale both see the gold answer as a hint; the rationale does not.
BUILTIN_TEMPLATES.update({
    "fair_rationale": {
        "example": "Answer the following question. Let's think step by step, and end with \"The answer is ...\".\n"
                   + _QUESTION + "Answer: {{ rationale }}",
        "separator": "\n\n",
        "stop": ["\nQuestion:"],
    },
    "fair_feedback": {
        "kind": "feedback",
        "example": "You are a teacher. A student answered the question below incorrectly. Point out the mistakes "
                   "in the student's answer and explain how to reach the correct answer.\n"
                   + _QUESTION + "Student's answer: {{ meta.student_answer }}\n" + _FAIR_GOLD
                   + "Feedback: {{ rationale }}",
        "separator": "\n\n",
        "stop": ["\nQuestion:"],
    },
    "fair_review": {
        "kind": "review",
        "example": "You are a reviewer. Judge whether the rationale below answers the question correctly and "
                   "soundly. Reason step by step, then give one score from 1 to 5 (5: surely correct), wrapped "
                   "in square brackets, such as [5].\n"
                   + _QUESTION + "Rationale: {{ meta.reviewed_rationale }}\n" + _FAIR_GOLD
                   + "Review: {{ rationale }}",
        "separator": "\n\n",
        "stop": ["\nQuestion:"],
    },
})
_TEMPLATE_KEYS = {"example", "separator", "header", "stop", "strip_answer", "kind"}
_ANSWER_SENTENCE = re.compile(r"(?:\b(?:so|thus|therefore|hence)\b,?\s*)?\bthe\s+(?:final\s+)?answer\s+(?:is|will\s+be)\b",
                              re.I)


@dataclass(frozen=True)
class PromptTemplate:
    """A compiled template; `uses_gold` says whether prompts show the gold answer."""

    name: str
    example: jinja2.Template
    separator: str
    header: str
    stop: tuple[str, ...]
    uses_gold: bool
    strip_answer: bool = False  # the stored rationale ends before its answer sentence
    kind: str = "rationale"  # rationale, feedback or review: what the demo teachers answer

    def block(self, record: Mapping[str, Any], rationale: str) -> str:
        """One record rendered with its rationale (an in-context example). With
        `strip_answer`, an example whose rationale lacks its answer sentence gets one, so
        the teacher sees where to state its answer."""
        if self.strip_answer and not _ANSWER_SENTENCE.search(rationale):
            rationale = f"{rationale.rstrip()} So the answer is {template_vars(record, '', True)['answer_label']}."
        return self._render(record, rationale).strip()

    def query(self, record: Mapping[str, Any]) -> str:
        """One record rendered up to where its rationale would start."""
        return self._render(record, _MARK).split(_MARK)[0].rstrip()

    def prompt(self, record: Mapping[str, Any], examples: Sequence[tuple[Mapping[str, Any], str]]) -> str:
        """Header, the (record, rationale) examples, then the query, joined by the separator."""
        parts = [self.header] if self.header else []
        parts += [self.block(ex, rat) for ex, rat in examples]
        parts.append(self.query(record))
        return self.separator.join(parts)

    def _render(self, record: Mapping[str, Any], rationale: str) -> str:
        try:
            return self.example.render(**template_vars(record, rationale, self.uses_gold))
        except jinja2.TemplateError as e:
            raise ConfigError(f"template {self.name!r}: record {record.get('id')!r}: {e}") from None


def load_template(name: str, configured: Mapping[str, Mapping[str, Any]]) -> PromptTemplate:
    """The template `name`: from `rationales.templates` first, else a built-in one."""
    key = f"rationales.templates.{name}"
    spec = configured.get(name) if name in configured else BUILTIN_TEMPLATES.get(name)
    if spec is None:
        known = sorted(set(configured) | set(BUILTIN_TEMPLATES))
        raise ConfigError(f"teacher template {name!r}: not defined (known templates: {', '.join(known)})")
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{key}: expected a mapping with 'example', found {spec!r:.60}")
    unknown = set(spec) - _TEMPLATE_KEYS
    if unknown:
        raise ConfigError(f"{key}: unknown keys {sorted(unknown)} (known: {sorted(_TEMPLATE_KEYS)})")
    example = spec.get("example")
    if not isinstance(example, str) or not example.strip():
        raise ConfigError(f"{key}.example: expected a Jinja template ending in {{{{ rationale }}}}, found {example!r:.60}")
    try:
        names = jinja2.meta.find_undeclared_variables(_ENV.parse(example))
        compiled = _ENV.from_string(example)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(f"{key}.example: line {e.lineno}: {e.message}") from None
    if names - _VARS:
        raise ConfigError(f"{key}.example: unknown variables {sorted(names - _VARS)} (known: {sorted(_VARS)})")
    stop = spec.get("stop", [])
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ConfigError(f"{key}.stop: expected a list of non-empty strings, found {stop!r:.60}")
    for k in ("separator", "header"):
        if not isinstance(spec.get(k, ""), str):
            raise ConfigError(f"{key}.{k}: expected a string, found {spec[k]!r:.60}")
    if spec.get("kind", "rationale") not in KINDS:
        raise ConfigError(f"{key}.kind: expected one of {list(KINDS)}, found {spec['kind']!r:.60}")
    if not isinstance(spec.get("strip_answer", False), bool):
        raise ConfigError(f"{key}.strip_answer: expected true or false, found {spec['strip_answer']!r:.60}")
    template = PromptTemplate(
        name=name, example=compiled, separator=spec.get("separator", "\n\n"), header=spec.get("header", ""),
        stop=tuple(stop), uses_gold=bool(names & _GOLD_VARS), strip_answer=spec.get("strip_answer", False),
        kind=spec.get("kind", "rationale"),
    )
    probe = template._render({"id": "probe", "question": "q", "answer": "a", "choices": ["a", "b"],
                              "meta": _AnyMeta()}, _MARK)
    if _MARK not in probe or probe.split(_MARK, 1)[1].strip():
        raise ConfigError(f"{key}.example: must end with {{{{ rationale }}}} (the teacher continues from there)")
    return template


class _AnyMeta(dict):
    """`meta` of the probe record: any field a template reads is there."""

    def __missing__(self, key):
        return "probe"


def option_letters(n: int) -> list[str]:
    if n > len(string.ascii_lowercase):
        raise ValueError(f"{n} choices: at most {len(string.ascii_lowercase)} can be lettered")
    return list(string.ascii_lowercase[:n])


def gold_index(record: Mapping[str, Any]) -> int | None:
    """Index of the gold answer among the choices (exact, then case/space-insensitive)."""
    choices, answer = record.get("choices") or [], record["answer"]
    if answer in choices:
        return choices.index(answer)
    norm = [" ".join(c.lower().split()) for c in choices]
    a = " ".join(answer.lower().split())
    return norm.index(a) if a in norm else None


def template_vars(record: Mapping[str, Any], rationale: str, uses_gold: bool = True) -> dict[str, Any]:
    choices = list(record.get("choices") or [])
    letters = option_letters(len(choices))
    label = record["answer"]
    if choices and uses_gold:
        i = gold_index(record)
        if i is None:
            raise ConfigError(
                f"record {record.get('id')!r}: answer {record['answer']!r} is not one of its choices "
                f"{choices!r:.120}, so the template cannot show its letter"
            )
        label = f"({letters[i]})"
    return {
        "id": record.get("id", ""),
        "question": record["question"],
        "context": record.get("context") or "",
        "choices": choices,
        "options": " ".join(f"({l}) {c}" for l, c in zip(letters, choices)),
        "answer": record["answer"],
        "answer_label": label,
        "rationale": rationale,
        "meta": record["meta"] if isinstance(record.get("meta"), dict) else {},
    }


def pick_examples(pool_ids: Sequence[str], record_id: str, k: int, seed: int, dataset: str) -> list[str]:
    """k example ids for one record, never the record itself. Seeded by (seed, dataset,
    record id) alone, so a rerun, or a run over a subset, builds the very same prompt."""
    if k <= 0:
        return []
    candidates = sorted(i for i in pool_ids if i != record_id)
    if len(candidates) < k:
        raise ValueError(f"{dataset}: record {record_id!r}: {k} in-context examples wanted, {len(candidates)} available")
    digest = hashlib.sha256(f"{seed}\x1f{dataset}\x1f{record_id}".encode()).digest()
    return random.Random(digest).sample(candidates, k)


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the first stop string (servers that ignore `stop` run on past it)."""
    end = min((i for i in (text.find(s) for s in stops if s) if i >= 0), default=len(text))
    return text[:end].strip()


def without_answer(rationale: str) -> str:
    """The rationale before its last answer sentence ("So the answer is (b).", "The answer
    is 42."); unchanged when it has none."""
    matches = list(_ANSWER_SENTENCE.finditer(rationale))
    return rationale[: matches[-1].start()].strip() if matches else rationale


def request_hash(prompt: str, settings: Mapping[str, Any]) -> str:
    """Hash of a prompt and the settings that shape its answer: a changed prompt, model or
    sampling setting is a new request, never a cache hit."""
    blob = json.dumps({"prompt": prompt, **settings}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:20]

"""The embedded demo data: small arithmetic word questions with two teachers, made here.

    Tom has 3 apples, buys 4 more and gives away 2. How many apples does Tom have?
    choices ["7", "5", "4", "6"], answer "5"
    careful: "Tom starts with 3. 3 + 4 = 7. 7 - 2 = 5. So the answer is 5."
    terse:   "3 + 4 - 2 = 5. The answer is 5."   (wrong for `terse_error_rate` of records)

Two teachers of different style and quality, so that `configs/demo.yaml` shows multi-teacher
distillation on a laptop CPU in minutes with nothing downloaded. The vocabulary is tiny (six
names, six objects, four verbs, numbers up to 20) so a SentencePiece vocabulary of a few
hundred pieces covers it. Everything is deterministic by seed, and each arithmetic signature
(the start count and the sequence of signed changes) belongs to one split only, whatever the
seed and sizes: two questions that differ only in a name, an object or a verb ("buys" or
"finds") are the same problem, so a split by question text would put the same sum in train
and test.
"""

from __future__ import annotations

import hashlib
import random
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

from tinyllm_jax.data.records import make_record, write_jsonl
from tinyllm_jax.errors import UserError

NAMES = ("Tom", "Ann", "Sam", "Mia", "Ben", "Eva")
OBJECTS = ("apples", "pens", "cards", "eggs", "books", "coins")
GAINS = ("buys {k} more", "finds {k} more")
LOSSES = ("gives away {k}", "loses {k}")
MAX_COUNT = 20
TEACHERS = ("careful", "terse")
TERSE_ERROR_RATE = 0.15
# signature hash bucket (of 20) -> split: 90% train, 5% validation, 5% test
SPLIT_BUCKETS = {"train": range(0, 18), "validation": range(18, 19), "test": range(19, 20)}
FILE_NAMES = {"train": "train.jsonl", "validation": "validation.jsonl", "test": "test.jsonl"}


def signature(start: int, changes: Sequence[int]) -> str:
    """A problem's arithmetic, whatever its wording: "9|+5,-3"."""
    return f"{start}|" + ",".join(f"{k:+d}" for k in changes)


def split_of(start: int, changes: Sequence[int]) -> str:
    """The split a problem belongs to, by a hash of its arithmetic signature."""
    bucket = int(hashlib.sha256(signature(start, changes).encode()).hexdigest(), 16) % 20
    return next(s for s, r in SPLIT_BUCKETS.items() if bucket in r)


def _problem(rng: random.Random) -> tuple[str, str, int, list[int]]:
    """A name, an object, a start count and 2 or 3 signed changes; counts stay in 0..20."""
    name, obj = rng.choice(NAMES), rng.choice(OBJECTS)
    start = rng.randint(2, 12)
    count, changes = start, []
    for _ in range(rng.choice((2, 2, 3))):
        gain = count <= 2 or (count + 1 <= MAX_COUNT and rng.random() < 0.5)
        k = rng.randint(1, min(8, MAX_COUNT - count)) if gain else -rng.randint(1, min(8, count))
        count += k
        changes.append(k)
    return name, obj, start, changes


def _question(rng: random.Random, name: str, obj: str, start: int, changes: list[int]) -> str:
    verbs = [rng.choice(GAINS if k > 0 else LOSSES).format(k=abs(k)) for k in changes]
    actions = ", ".join(verbs[:-1]) + " and " + verbs[-1]
    return f"{name} has {start} {obj}, {actions}. How many {obj} does {name} have?"


def careful_rationale(name: str, start: int, changes: list[int], answer: int) -> str:
    steps, count = [f"{name} starts with {start}."], start
    for k in changes:
        steps.append(f"{count} {'+' if k > 0 else '-'} {abs(k)} = {count + k}.")
        count += k
    return " ".join(steps) + f" So the answer is {answer}."


def feedback_text(name: str, start: int, changes: list[int], answer: int, said: str) -> str:
    """What a demo teacher says about a student's wrong answer `said`."""
    return f"{said!r} is wrong: go one step at a time. {careful_rationale(name, start, changes, answer)}"


# what the demo teachers write besides the rationales: the demo tokenizer learns it too
DEMO_PHRASES = (feedback_text("Tom", 3, [4, -2], 5, "7") + " 3 + 4 - 2 = 5. The answer is 5. Score: [5] [2]",)


def terse_rationale(start: int, changes: list[int], result: int) -> str:
    terms = " ".join(f"{'+' if k > 0 else '-'} {abs(k)}" for k in changes)
    return f"{start} {terms} = {result}. The answer is {result}."


_QUESTION_RE = re.compile(r"^(?P<name>\w+) has (?P<start>\d+) (?P<obj>\w+), (?P<actions>.+)\. "
                          r"How many (?P=obj) does (?P=name) have\?$")
_ACTION_RE = re.compile(r"(buys|finds) (\d+) more|(gives away|loses) (\d+)")


def parse_question(question: str) -> tuple[str, str, int, list[int]] | None:
    """(name, object, start, signed changes) of a demo question, or None for any other
    text: the ground truth the demo teachers answer from."""
    m = _QUESTION_RE.match(question.strip())
    if not m:
        return None
    pieces = re.split(r", | and ", m["actions"])
    changes = []
    for piece in pieces:
        a = _ACTION_RE.fullmatch(piece)
        if not a:
            return None
        changes.append(int(a[2]) if a[2] else -int(a[4]))
    return m["name"], m["obj"], int(m["start"]), changes


def _choices(rng: random.Random, start: int, changes: list[int], answer: int) -> list[str]:
    """The answer and three near misses: off by one to three, or a change's sign flipped."""
    near = {answer + d for d in (-3, -2, -1, 1, 2, 3)}
    near |= {answer - 2 * k for k in changes}
    near = sorted(x for x in near if 0 <= x <= MAX_COUNT + 8 and x != answer)
    picked = rng.sample(near, 3) + [answer]
    rng.shuffle(picked)
    return [str(x) for x in picked]


def make_demo_records(n: int, seed: int, split: str, terse_error_rate: float = TERSE_ERROR_RATE,
                      choices: bool = True) -> list[dict[str, Any]]:
    """`n` distinct demo records of `split` (train, validation or test), deterministic by
    `seed`; exactly round(n * terse_error_rate) of them have a wrong terse rationale. With
    `choices` False the answer is free-form (score with eval.task: number); the questions
    and rationales are the same."""
    if split not in SPLIT_BUCKETS:
        raise UserError(f"demo split {split!r}: expected one of {', '.join(SPLIT_BUCKETS)}")
    if n < 0:
        raise UserError(f"demo: number of {split} records must be >= 0, found {n}")
    if not 0.0 <= terse_error_rate <= 1.0:
        raise UserError(f"demo.terse_error_rate: expected a fraction in [0, 1], found {terse_error_rate}")
    rng = random.Random(f"tinyllm-demo/{seed}/{split}")
    wrong = set(rng.sample(range(n), round(n * terse_error_rate)))
    records, seen, tries = [], set(), 0
    while len(records) < n:
        tries += 1
        if tries > 50 * n + 1000:
            raise UserError(f"demo: cannot make {n} distinct {split} questions; ask for fewer")
        name, obj, start, changes = _problem(rng)
        question = _question(rng, name, obj, start, changes)
        if question in seen or split_of(start, changes) != split:
            continue
        seen.add(question)
        answer = start + sum(changes)
        options = _choices(rng, start, changes, answer)
        i = len(records)
        terse_answer = answer
        if i in wrong:  # a slip: the terse teacher lands on one of the near misses
            terse_answer = int(rng.choice([c for c in options if c != str(answer)]))
        records.append(make_record(
            f"demo-{split}-{i}", question, str(answer), options if choices else [],
            rationales={"careful": [careful_rationale(name, start, changes, answer)],
                        "terse": [terse_rationale(start, changes, terse_answer)]},
            meta={"terse_correct": terse_answer == answer, "signature": signature(start, changes)},
        ))
    return records


def write_demo_data(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_valid: int = 200,
    n_test: int = 200,
    terse_error_rate: float = TERSE_ERROR_RATE,
    choices: bool = True,
) -> dict[str, str]:
    """Writes OUT_DIR/{train,validation,test}.jsonl; returns {split: path}."""
    out_dir = Path(out_dir)
    paths = {}
    for split, n in (("train", n_train), ("validation", n_valid), ("test", n_test)):
        path = out_dir / FILE_NAMES[split]
        write_jsonl(path, make_demo_records(n, seed, split, terse_error_rate, choices))
        paths[split] = str(path)
    return paths


def write_demo_from_options(out_dir: str | Path, options: dict[str, Any]) -> dict[str, str]:
    """`write_demo_data` with the config's `demo:` mapping, checked by `check_demo_options`."""
    check_demo_options(options)
    return write_demo_data(out_dir, **options)


def check_demo_options(options: dict[str, Any], where: str = "demo") -> None:
    """Each key of a `demo:` mapping checked: an unknown key or a value of the wrong type
    raises UserError naming `<where>.<key>`."""
    known = {"seed": int, "n_train": int, "n_valid": int, "n_test": int, "terse_error_rate": (int, float),
             "choices": bool}
    kinds = {int: "an integer", bool: "true or false"}
    for key, value in options.items():
        if key not in known:
            raise UserError(f"{where}.{key}: unknown key (known keys: {', '.join(known)})")
        if (isinstance(value, bool) != (known[key] is bool)) or not isinstance(value, known[key]):
            raise UserError(f"{where}.{key}: expected {kinds.get(known[key], 'a number')}, found {value!r}")


def demo_texts(records: Iterable[dict[str, Any]], extra: Sequence[str] = ()) -> list[str]:
    """Texts to train the demo SentencePiece tokenizer on: every question, the choices in
    the student's input layout, every rationale and answer, then `extra` (stream prefixes)."""
    texts = []
    for rec in records:
        texts.append(rec["question"])
        if rec.get("choices"):
            texts.append("Answer Choices: " + " ".join(f"({chr(97 + i)}) {c}" for i, c in enumerate(rec["choices"])))
        texts.extend(r for rs in rec.get("rationales", {}).values() for r in rs)
        texts.append(rec["answer"])
    return texts + list(extra)

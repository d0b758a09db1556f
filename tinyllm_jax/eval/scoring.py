"""Answer extraction and scoring: one answer type a dataset family.

    choice    multiple choice, by letter ("(c)", "C.", "b") or by the choice's normalised text
    number    a number, compared with a tolerance ("32.0" == "32", "1,000" == "1000", "$90")
    yesno     yes / no / maybe as whole words; "true"/"false" and negations ("not true") count
    equation  an arithmetic expression (SVAMP labels such as "( 67.0 - 35.0 )"), evaluated by
              a small whitelist evaluator over the `ast` tree: never Python's own evaluator
    text      exact text after normalisation (case, spacing, surrounding punctuation)

The answer stream's output is usually the bare answer; a rationale stream's output is
scored by its final answer ("So the answer is (d) ...", "the answer is 42", "#### 42",
Mentor-KD's "... --> 42"),
found by `final_answer`, with a fallback per type (the last "(x)" letter, the last "= N").
Gold answers go through the same extraction, so "A. ignore", "B" and "ignore" all name
the same choice. Written by hand: no library parses answers out of free-form model text.
"""

from __future__ import annotations

import ast
import math
import operator
import re
import unicodedata
from typing import Sequence

from tinyllm_jax.errors import UserError

NUMBER_TOLERANCE = 1e-4  # relative and absolute: 1/3 == 0.3333, but 0.33 != 1/3
MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 64

# --------------------------------------------------------------------------- shared helpers

# A model (or a few-shot teacher) that keeps writing starts a new "Q:" block: ignore it.
_CONTINUATION = re.compile(r"\n\s*Q:")
# "answer must be" / "answer would be" open reasoning in real teacher text, so only these count;
# "-->" ends Mentor-KD's "{chain} --> {answer}" targets.
_ANSWER_PHRASE = re.compile(r"\banswer\s+is\b|\banswer\s*:|####|-->", re.I)
_EDGE_PUNCT = " \t\n.,;:!?\"'`"


def normalize_text(text: str) -> str:
    """Lowercase, NFKC, single spaces, no surrounding punctuation or quotes."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(text.split()).strip(_EDGE_PUNCT)


def _own_answer(text: str) -> str:
    """The text before any invented follow-up question."""
    m = _CONTINUATION.search(text)
    return text[: m.start()] if m else text


def final_answer(text: str) -> str | None:
    """The rest of the line after the last "the answer is" / "Answer:" / "####", or None."""
    own = _own_answer(text)
    matches = list(_ANSWER_PHRASE.finditer(own))
    if not matches:
        return None
    rest = own[matches[-1].end():].lstrip(" \t\n:")
    return rest.split("\n", 1)[0].strip() or None


def _answer_span(text: str) -> str:
    return final_answer(text) or _own_answer(text)


# Code is never an answer, whatever it holds: a call (`f(x)`, `os.system(...)`; "book(s)"
# is English), a dunder, a subscript or a set/dict, a backtick, a backslash, a quoted literal
# holding a digit (`'67 - 35'`), a name glued to arithmetic (`x+32`), the words that open code.
_CODE_LIKE = re.compile(
    r"(?<![\w.])[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*\((?!s\))"
    r"|__|[\[\]{}`\\]"
    r"|(?<!\w)(['\"])[^'\"\n]*\d[^'\"\n]*\1"
    r"|[A-Za-z_]\w*[+*/%]\d|\d[+*/%][A-Za-z_]"
    r"|\b(?:lambda|import|exec|eval)\b"
)
# A number in exponent form ("1e400", "1e308*10") or with two decimal points ("1.2.3"): no
# digit run inside it is a number of its own.
_MALFORMED_NUMBER = re.compile(r"\d\.?[eE][-+]?\d|\d\.\d+\.\d")


def looks_like_code(text: str) -> bool:
    """True when `text` holds code (calls, attribute calls, quoted literals with digits...)."""
    return _CODE_LIKE.search(text) is not None


# --------------------------------------------------------------------------- the safe evaluator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate_arithmetic(expression: str) -> float:
    """The value of an expression of numbers, + - * / // % **, unary signs and parentheses.
    Anything else (names, calls, attributes, strings), a long expression, an exponent above
    MAX_EXPONENT, division by zero or overflow raises ValueError. Nothing is ever executed."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError) as e:
        raise ValueError(f"not an arithmetic expression: {expression!r:.60}") from e
    try:
        value = _arith_value(tree.body)
    except (ArithmeticError, RecursionError) as e:  # zero division, overflow
        raise ValueError(f"cannot compute {expression!r:.60}: {e}") from e
    if not isinstance(value, float) or not math.isfinite(value):
        raise ValueError(f"{expression!r:.60} has no finite real value")
    return value


def _arith_value(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)  # floats throughout: no unbounded integer arithmetic
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_arith_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _arith_value(node.left), _arith_value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError(f"exponent {right:g} above the limit {MAX_EXPONENT}")
        return _BINARY[type(node.op)](left, right)
    raise ValueError(f"{type(node).__name__} is not allowed in an arithmetic expression")


# --------------------------------------------------------------------------- answer types


class AnswerType:
    """Extracts a canonical answer string from text; two canonical answers compare by `same`."""

    name = ""

    def extract(self, text: str, choices: Sequence[str] = ()) -> str | None:
        """The canonical answer, or None; text whose answer part looks like code gives none."""
        if looks_like_code(_answer_span(text)):
            return None
        return self._extract(text, choices)

    def _extract(self, text: str, choices: Sequence[str]) -> str | None:
        raise NotImplementedError

    def same(self, a: str, b: str, choices: Sequence[str] = ()) -> bool:
        return a == b


class TextAnswer(AnswerType):
    name = "text"

    def _extract(self, text, choices):
        return normalize_text(_answer_span(text)) or None


# "(c) text", "(c)", "c) text", "C. ignore", "C: x", "B" alone; not "A rock is ...".
_LABEL = re.compile(r"^\s*(?:\(([a-h])\)|([a-h])(?:[.):]|\s*$))\s*(.*)$", re.I | re.S)
_LETTER_IN_TEXT = re.compile(r"\(([a-h])\)", re.I)


def _split_label(text: str) -> tuple[int | None, str]:
    m = _LABEL.match(text)
    if not m:
        return None, text
    return ord((m.group(1) or m.group(2)).lower()) - ord("a"), m.group(3)


def _contains(haystack: str, needle: str) -> bool:
    return bool(needle) and re.search(rf"(?<!\w){re.escape(needle)}(?!\w)", haystack) is not None


class ChoiceAnswer(AnswerType):
    """With choices: the normalised text of the chosen choice. Without: "(x) text",
    "(x)" or "text", and two answers agree when their letters, else their texts, agree."""

    name = "choice"

    def _extract(self, text, choices):
        span = _answer_span(text)
        if not choices:
            letter, rest = _split_label(span)
            rest = normalize_text(rest)
            if letter is None:
                return rest or None
            return f"({chr(ord('a') + letter)}) {rest}".strip()
        options = [self._option_text(c, i) for i, c in enumerate(choices)]
        index = self._resolve(span, options)
        if index is None:  # a rationale may name its pick only as a letter somewhere
            index = self._last_letter(_own_answer(text), len(options))
        return None if index is None else options[index]

    @staticmethod
    def _option_text(choice: str, index: int) -> str:
        letter, rest = _split_label(choice)  # choices stored as "A. ignore"
        return normalize_text(rest if letter == index and rest.strip() else choice)

    @staticmethod
    def _resolve(span: str, options: list[str]) -> int | None:
        text = normalize_text(span)
        if text in options:
            return options.index(text)
        letter, rest = _split_label(span)
        if letter is not None:
            rest = normalize_text(rest)
            if rest in options:  # the text is more specific than the letter
                return options.index(rest)
            if letter < len(options):
                return letter
        found = [i for i, o in enumerate(options) if _contains(text, o)]
        # "blue whale" mentioned also mentions "whale": keep the longest phrases only
        found = [i for i in found if not any(j != i and options[i] in options[j] for j in found)]
        return found[0] if len(found) == 1 else None

    @staticmethod
    def _last_letter(text: str, n: int) -> int | None:
        letters = [ord(x.lower()) - ord("a") for x in _LETTER_IN_TEXT.findall(text)]
        letters = [i for i in letters if i < n]
        return letters[-1] if letters else None

    def same(self, a, b, choices=()):
        if choices:
            return a == b
        (la, ta), (lb, tb) = _split_label(a), _split_label(b)
        if la is not None and lb is not None:
            return la == lb
        return normalize_text(ta) == normalize_text(tb)


# A number, maybe signed, maybe "$", thousands commas only in groups of three.
_NUMBER = re.compile(r"(?<![\w.])([-\u2212]?)\$?(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?(?!\d)")
_RESULT = re.compile(r"=\s*(?=[-\u2212$\d])")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


def _numbers(text: str) -> list[float]:
    return [float(("-" if s else "") + whole.replace(",", "") + (frac or ""))
            for s, whole, frac in _NUMBER.findall(text)]


def _format_number(x: float) -> str:
    if x == int(x) and abs(x) < 1e15:
        return str(int(x))  # "32.0" and "32" read the same
    return repr(x)


class NumberAnswer(AnswerType):
    """After "the answer is": the first number (after the last "=", if any). Without the
    phrase, the same rule on the last sentence that holds a number: on Mentor-KD's SVAMP
    chains this agrees with their correctness labels more often than "the last number"."""

    name = "number"

    def __init__(self, tolerance: float = NUMBER_TOLERANCE):
        self.tolerance = tolerance

    def _extract(self, text, choices):
        span = final_answer(text)
        if span is None or not _numbers(span):
            sentences = [s for s in _SENTENCE_END.split(_own_answer(text)) if _numbers(s)]
            span = sentences[-1] if sentences else None
        if span is None or _MALFORMED_NUMBER.search(span):
            return None
        return self._first_result(span)

    @staticmethod
    def _first_result(sentence: str) -> str:
        """"100 - 68 = 32 more wrappers" -> 32; "Paul had 223 left after giving 111" -> 223."""
        results = [m.end() for m in _RESULT.finditer(sentence)]
        found = (_numbers(sentence[results[-1]:]) if results else []) or _numbers(sentence)
        return _format_number(found[0])

    def same(self, a, b, choices=()):
        return math.isclose(float(a), float(b), rel_tol=self.tolerance, abs_tol=self.tolerance)


_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_TIMES = re.compile(r"(?<=[\d)])\s*[x\u00d7]\s*(?=[\d(])")
_ARITH_RUN = re.compile(r"[\d.\s+\-*/%()]+")
_GLUE = re.compile(r"[\w'\"]")
# In an expression these are code too (an underscore name, a string, a statement separator).
_CODE_CHARS = re.compile(r"[_\";]")


def _standalone_runs(span: str) -> list[str]:
    """Maximal runs of arithmetic holding a digit, last first, except those glued to a name
    or a quote ("x+32" gives no "+32")."""
    runs = []
    for m in _ARITH_RUN.finditer(span):
        run, start, end = m.group(), m.start(), m.end()
        glued_before = start > 0 and not run[0].isspace() and _GLUE.match(span[start - 1])
        glued_after = end < len(span) and not run[-1].isspace() and _GLUE.match(span[end])
        if re.search(r"\d", run) and not glued_before and not glued_after:
            runs.append(run)
    return runs[::-1]


def _as_arithmetic(text: str) -> str:
    text = _THOUSANDS.sub("", text.strip().rstrip("."))
    text = _TIMES.sub(" * ", text).replace("\u00f7", "/").replace("\u2212", "-").replace("^", "**")
    return text.replace("$", "")


class EquationAnswer(NumberAnswer):
    """The value of an arithmetic expression (SVAMP's "( 67.0 - 35.0 )"), or a plain number.
    In "x = 67 - 35" the right-most side that computes wins."""

    name = "equation"

    def _extract(self, text, choices):
        span = _as_arithmetic(_answer_span(text))
        if _CODE_CHARS.search(span) or _MALFORMED_NUMBER.search(span):
            return None
        for candidate in span.split("=")[::-1] + _standalone_runs(span):
            try:
                return _format_number(evaluate_arithmetic(candidate))
            except ValueError:
                continue
        return None


_VERDICT = re.compile(r"\b(yes|no|maybe|true|false|correct|incorrect)\b", re.I)
_VERDICT_VALUE = {"yes": "yes", "true": "yes", "correct": "yes",
                  "no": "no", "false": "no", "incorrect": "no", "maybe": "maybe"}
# "not true", "isn't true", "is not entirely correct": a negation up to two words before
_NEGATED = re.compile(r"(?:\bnot|n't|\bnever)\s+(?:\w+\s+){0,2}$", re.I)


class YesNoAnswer(AnswerType):
    """"yes", "no" or "maybe". After "the answer is": the first verdict word there (or a
    choice letter, when choices are given). Otherwise an opening verdict ("No, the ...")
    or else the last one ("... the statement is false")."""

    name = "yesno"

    def _extract(self, text, choices):
        span, own = final_answer(text), _own_answer(text)
        if span is not None:
            found = self._by_letter(span, choices) or next(iter(self._verdicts(span)), None)
            if found:
                return found
        found = self._by_letter(own, choices)
        verdicts = self._verdicts(own)
        if found or not verdicts:
            return found
        opening = _VERDICT.match(own.lstrip(_EDGE_PUNCT))
        return verdicts[0] if opening else verdicts[-1]

    @staticmethod
    def _by_letter(text: str, choices: Sequence[str]) -> str | None:
        """PubMedQA teachers answer "(b) no" with choices [yes, no, maybe]."""
        letter, _ = _split_label(text)
        if letter is None or letter >= len(choices):
            return None
        value = normalize_text(choices[letter])
        return value if value in ("yes", "no", "maybe") else None

    @staticmethod
    def _verdicts(text: str) -> list[str]:
        out = []
        for m in _VERDICT.finditer(text):
            value = _VERDICT_VALUE[m.group(1).lower()]
            if value != "maybe" and _NEGATED.search(text[max(0, m.start() - 40): m.start()]):
                value = "no" if value == "yes" else "yes"
            out.append(value)
        return out


TASKS: dict[str, AnswerType] = {
    t.name: t for t in (ChoiceAnswer(), NumberAnswer(), YesNoAnswer(), EquationAnswer(), TextAnswer())
}


# --------------------------------------------------------------------------- public API


def get_task(task: str) -> AnswerType:
    try:
        return TASKS[task]
    except KeyError:
        raise UserError(f"eval.task: unknown scoring type {task!r}; expected one of {', '.join(TASKS)}") from None


def extract(task: str, text: str, choices: Sequence[str] = ()) -> str | None:
    """The normalised answer `text` gives under scoring type `task`, or None if it gives none."""
    return get_task(task).extract(text, choices)


def is_correct(task: str, prediction: str, gold: str, choices: Sequence[str] = ()) -> bool:
    """Whether `prediction` gives the same answer as `gold` (both extracted the same way)."""
    kind = get_task(task)
    p, g = kind.extract(prediction, choices), kind.extract(gold, choices)
    return p is not None and g is not None and kind.same(p, g, choices)


def score(
    task: str,
    predictions: Sequence[str],
    golds: Sequence[str],
    choices_list: Sequence[Sequence[str]] | None = None,
) -> dict[str, float | int]:
    """accuracy (correct / n), n, n_correct, n_extracted (predictions with an answer) and
    n_gold_unreadable (gold answers with none: a data problem worth a look)."""
    if choices_list is None:
        choices_list = [()] * len(predictions)
    if not len(predictions) == len(golds) == len(choices_list):
        raise ValueError(f"score: {len(predictions)} predictions, {len(golds)} golds, {len(choices_list)} choice lists")
    kind = get_task(task)
    n_correct = n_extracted = n_unreadable = 0
    for pred, gold, choices in zip(predictions, golds, choices_list):
        p, g = kind.extract(pred, choices), kind.extract(gold, choices)
        n_extracted += p is not None
        n_unreadable += g is None
        n_correct += p is not None and g is not None and kind.same(p, g, choices)
    n = len(predictions)
    return {"accuracy": n_correct / n if n else 0.0, "n": n, "n_correct": n_correct,
            "n_extracted": n_extracted, "n_gold_unreadable": n_unreadable}

"""Answer extraction and scoring, on cases taken from real teacher and student outputs."""

import os
from pathlib import Path

import pytest

from tinyllm_jax.errors import UserError
from tinyllm_jax.eval import scoring
from tinyllm_jax.eval.scoring import TASKS, evaluate_arithmetic, extract, final_answer, is_correct, score

OBQA = ["make more phone calls", "quit eating lunch out", "buy less with monopoly money", "have lunch with friends"]
CSQA = ["ignore", "enforce", "authoritarian", "yell at", "avoid"]
PUBMED = ["yes", "no", "maybe"]


def test_registry_names_every_type():
    assert set(TASKS) == {"choice", "number", "yesno", "equation", "text"}


def test_unknown_type_is_a_user_error_listing_the_known_ones():
    with pytest.raises(UserError, match="unknown scoring type 'numbr'.*number"):
        extract("numbr", "3")


# --------------------------------------------------------------------------- choice


@pytest.mark.parametrize("text, expected", [
    ("The answer is (c)", "buy less with monopoly money"),
    ("b", "quit eating lunch out"),
    ("B", "quit eating lunch out"),
    ("(b)", "quit eating lunch out"),
    ("B. quit eating lunch out", "quit eating lunch out"),
    ("  Quit eating lunch out. ", "quit eating lunch out"),
    ("So the answer is (d) have lunch with friends.", "have lunch with friends"),
    # TinyLLM's Flan-T5 string: the few-shot echo after the answer must not count
    ("Let's think step by step. Eating lunch out costs money. Thus, the answer is (b) quit eating "
     "lunch out\n\nQ: A person wants to save\nAnswer Choices:\n(a) make more phone calls\n(d) x",
     "quit eating lunch out"),
    ("I would rather not make more phone calls", "make more phone calls"),
    ("Maybe (a), but on reflection (c).", "buy less with monopoly money"),
])
def test_choice_by_letter_or_text(text, expected):
    assert extract("choice", text, OBQA) == expected


def test_choice_text_wins_over_a_contradicting_letter():
    assert extract("choice", "(a) quit eating lunch out", OBQA) == "quit eating lunch out"


def test_choice_letter_out_of_range_or_no_answer_is_none():
    assert extract("choice", "(h)", OBQA) is None
    assert extract("choice", "A rock is heavier than a feather", OBQA) is None
    assert extract("choice", "", OBQA) is None


def test_choice_prefers_the_longest_mentioned_option():
    choices = ["whale", "blue whale", "shark"]
    assert extract("choice", "it is the blue whale", choices) == "blue whale"
    assert extract("choice", "a whale or a shark", choices) is None  # two picks: no answer


def test_mentor_kd_csqa_gold_forms_all_name_the_same_choice():
    for gold in ("A. ignore", "A", "ignore", "(a) ignore"):
        assert is_correct("choice", "ignore", gold, CSQA), gold
        assert not is_correct("choice", "avoid", gold, CSQA), gold
    # choices stored with their own labels
    labelled = [f"{l}. {c}" for l, c in zip("ABCDE", CSQA)]
    assert extract("choice", "ignore", labelled) == "ignore"
    assert is_correct("choice", "E", "E. avoid", labelled)


def test_choice_without_choices_compares_letters_else_texts():
    assert extract("choice", "A. ignore") == "(a) ignore"
    assert is_correct("choice", "A", "A. ignore")
    assert is_correct("choice", "ignore", "A. ignore")
    assert not is_correct("choice", "B", "A. ignore")
    assert not is_correct("choice", "enforce", "A. ignore")


# --------------------------------------------------------------------------- number


@pytest.mark.parametrize("text, expected", [
    ("32.0", "32"),
    ("32", "32"),
    ("1,000", "1000"),
    ("1,450,000", "1450000"),
    ("-10", "-10"),
    ("0.5", "0.5"),
    ("$90", "90"),
    ("5 km", "5"),
    ("the answer is 42.", "42"),
    ("#### 72", "72"),
    ("So the answer is 6 x 7 = 42 apples", "42"),
    # Mentor-KD GSM8K chain: the last number is not the answer, the last result is
    ("$128 - $38 = $90\n\nTherefore, Olivia has $90 left after spending $38 at the supermarket.", "90"),
    ("Thus, there are 100 - 68 = 32 more wrappers than bottle caps.", "32"),
    ("He had 12 and ate 5. So 7 remain.", "7"),
    ("Paco had 22 - 15 = 7 sweet cookies left.\nHe had 75 - 54 = 21 salty ones.\nTherefore, he had 7 sweet cookies left.", "7"),
    ("Therefore, Paul had 223 crayons left after he gave away 111 crayons.", "223"),
])
def test_number_extraction(text, expected):
    assert extract("number", text) == expected


def test_number_none_when_no_number():
    assert extract("number", "I do not know") is None


def test_number_comparison_tolerates_formatting_not_error():
    assert is_correct("number", "32.0", "32")
    assert is_correct("number", "The answer is 1,000.", "1000")
    assert is_correct("number", "0.3333", "0.33333333")
    assert not is_correct("number", "0.33", "0.33333333")
    assert not is_correct("number", "31", "32")
    assert not is_correct("number", "1,0", "10")  # not a thousands separator


# --------------------------------------------------------------------------- yes / no / maybe


@pytest.mark.parametrize("text, expected", [
    ("Yes", "yes"),
    ("no.", "no"),
    ("maybe", "maybe"),
    ("not true", "no"),
    ("It isn't true.", "no"),
    ("That is not entirely false", "yes"),
    ("true", "yes"),
    ("No, the results of the study do not support the hypothesis.", "no"),
    ('Therefore, the statement "Hydrogen\'s atomic number squared exceeds the number of Spice '
     'Girls" is false.', "no"),
    ("So the answer is yes, although some say no", "yes"),
    ("The answer is not yes", "no"),
])
def test_yesno_whole_words_and_negations(text, expected):
    assert extract("yesno", text) == expected


def test_yesno_ignores_words_that_merely_contain_no():
    assert extract("yesno", "I know nothing of the note") is None


def test_yesno_letter_with_pubmedqa_choices():
    text = "Let's think step by step. No, LR and SE acuity do not differ. Thus, the answer is (b) no\n\nQ: ..."
    assert extract("yesno", text, PUBMED) == "no"
    assert extract("yesno", "(c)", PUBMED) == "maybe"
    assert is_correct("yesno", "Yes", "yes", PUBMED)


# --------------------------------------------------------------------------- equation


@pytest.mark.parametrize("text, expected", [
    ("( 67.0 - 35.0 )", "32"),
    ("( ( 10.0 + 2.0 ) / 4.0 ) * 3.0", "9"),
    ("(8 - 2) / (1 + 2)", "2"),
    ("7 // 2 + 7 % 2 + 2 ** 3", "12"),
    ("-(3 - 5)", "2"),
    ("x = 100 x 12", "1200"),
    ("The answer is 1,200 / 4.", "300"),
    ("( 67.0 - 35.0 ) wrappers", "32"),
    ("10 / 4", "2.5"),
])
def test_equation_values(text, expected):
    assert extract("equation", text) == expected


def test_equation_compares_with_numeric_or_equation_gold():
    assert is_correct("equation", "( 67.0 - 35.0 )", "32")
    assert is_correct("equation", "67 - 35", "( 67.0 - 35.0 )")
    assert not is_correct("equation", "67 + 35", "( 67.0 - 35.0 )")


def test_injection_is_scored_wrong_and_nothing_runs(monkeypatch):
    calls = []
    monkeypatch.setattr(os, "system", lambda cmd: calls.append(cmd) or 0)
    monkeypatch.setattr(os, "popen", lambda *a, **k: calls.append(a))
    for attack in ("__import__('os').system('x')", "().__class__.__bases__[0].__subclasses__()",
                   "(lambda: __import__('os').system('x'))()", "open('/etc/passwd').read()"):
        assert extract("equation", attack) is None
        for task in ("equation", "number", "choice", "yesno", "text"):
            assert not is_correct(task, attack, "42"), (task, attack)
        with pytest.raises(ValueError):
            evaluate_arithmetic(attack)
    assert calls == []


@pytest.mark.parametrize("expression", [
    "9**9**9", "2 ** 1000", "(10 ** 60) ** 60", "1 / 0", "5 % 0", "1" + " + 1" * 100,
    "'a' * 3", "x + 1", "[1, 2]", "1, 2", "True + 1", "1j * 2", "(-8) ** 0.5", "",
])
def test_evaluator_rejects_everything_but_bounded_arithmetic(expression):
    with pytest.raises(ValueError):
        evaluate_arithmetic(expression)


def test_evaluator_values():
    assert evaluate_arithmetic("( 67.0 - 35.0 )") == 32.0
    assert evaluate_arithmetic("2 ** -2") == 0.25
    assert evaluate_arithmetic("-7 // 2") == -4.0


def test_module_has_no_dynamic_code_execution():
    source = Path(scoring.__file__).read_text()
    for banned in ("ev" + "al(", "ex" + "ec("):
        assert banned not in source


# --------------------------------------------------------------------------- text, rationale, score


def test_text_exact_after_normalisation():
    assert is_correct("text", " The Sun. ", "the sun")
    assert is_correct("text", "Thus, the answer is Paris.", "paris")
    assert not is_correct("text", "the sun is hot", "the sun")


def test_final_answer_takes_the_last_statement_before_any_new_question():
    assert final_answer("The answer must be wet. So the answer is (c) wooded area.") == "(c) wooded area."
    assert final_answer("the answer is 5. No wait, the answer is 7") == "7"
    assert final_answer("Answer Choices:\n(a) x\n(b) y") is None
    assert final_answer("So the answer is (a) aspirin.\n\nQ: Next?\nA: So the answer is (b) pain.") == "(a) aspirin."
    assert final_answer("no phrase here") is None


def test_score_counts_accuracy_and_extractions():
    preds = ["b", "(c)", "no idea", "So the answer is (b) quit eating lunch out."]
    golds = ["quit eating lunch out"] * 4
    result = score("choice", preds, golds, [OBQA] * 4)
    assert result == {"accuracy": 0.5, "n": 4, "n_correct": 2, "n_extracted": 3, "n_gold_unreadable": 0}
    assert score("number", [], [])["accuracy"] == 0.0
    assert score("number", ["1"], ["none"])["n_gold_unreadable"] == 1


def test_score_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 predictions, 1 golds"):
        score("number", ["1", "2"], ["1"])


# --------------------------------------------------------------------------- code-like text (issue 14)

CODE_LIKE = [
    "eval('67 - 35')", "exec('print(32)')", "os.system('echo 32')", "The answer is os.system('echo 32')",
    "'67 - 35'", "abs(-32)", "math.floor(32.5)", "x+32", "32*x", "So the answer is exec('yes')",
]


@pytest.mark.parametrize("text", CODE_LIKE)
@pytest.mark.parametrize("task", ["equation", "number", "choice", "yesno", "text"])
def test_code_like_text_scores_wrong_in_every_type(task, text):
    assert extract(task, text) is None
    for gold in ("32", "( 67.0 - 35.0 )", "yes"):
        assert not is_correct(task, text, gold, ["32", "yes", "no"] if task == "choice" else ())


@pytest.mark.parametrize("text", ["1e400", "1e308*10", "The answer is 1e400", "1.2.3", "2e5 - 3"])
@pytest.mark.parametrize("task", ["equation", "number"])
def test_overflowing_or_malformed_numbers_are_not_read_as_their_digits(task, text):
    assert extract(task, text) is None
    for gold in ("1", "400", "308", "10", "3080", "1.2", "3", "5"):
        assert not is_correct(task, text, gold)


def test_plain_text_around_code_guard_still_reads():
    # apostrophes, plurals in parentheses and units are English, not code
    assert extract("number", "It's 32 apples") == "32"
    assert extract("number", "He has 3 book(s). The answer is 3") == "3"
    assert extract("equation", "x = 67 - 35") == "32"
    assert extract("yesno", "Jessica's answer: yes") == "yes"

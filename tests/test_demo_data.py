"""The embedded demo data: deterministic, valid records, two teachers of known quality."""

import copy
import re

import pytest

from tinyllm_jax.data.demo import demo_texts, make_demo_records, write_demo_data, write_demo_from_options
from tinyllm_jax.data.records import read_jsonl, validate_record
from tinyllm_jax.errors import UserError
from tinyllm_jax.eval.scoring import extract

CHANGE = re.compile(r"(buys|finds|gives away|loses) (\d+)")


def _true_answer(question: str) -> int:
    """Recomputes the answer from the question's own words."""
    count = int(re.match(r"\w+ has (\d+) ", question).group(1))
    for verb, k in CHANGE.findall(question):
        count += int(k) if verb in ("buys", "finds") else -int(k)
    return count


def test_deterministic_by_seed():
    assert make_demo_records(40, 3, "train") == make_demo_records(40, 3, "train")
    assert make_demo_records(40, 3, "train") != make_demo_records(40, 4, "train")


def test_write_demo_data_is_reproducible_and_readable(tmp_path):
    a = write_demo_data(tmp_path / "a", seed=1, n_train=30, n_valid=5, n_test=6)
    b = write_demo_data(tmp_path / "b", seed=1, n_train=30, n_valid=5, n_test=6)
    assert set(a) == {"train", "validation", "test"}
    for split, n in (("train", 30), ("validation", 5), ("test", 6)):
        assert open(a[split], "rb").read() == open(b[split], "rb").read()
        records, skipped = read_jsonl(a[split])
        assert len(records) == n and skipped == []


def test_records_are_valid_and_answers_right():
    records = make_demo_records(300, 0, "train")
    assert len({r["id"] for r in records}) == len({r["question"] for r in records}) == 300
    for rec in records:
        assert validate_record(copy.deepcopy(rec), rec["id"]) == rec
        assert len(rec["choices"]) == len(set(rec["choices"])) == 4
        assert rec["answer"] in rec["choices"]
        assert rec["answer"] == str(_true_answer(rec["question"]))
        assert 0 <= int(rec["answer"]) <= 20 and all(int(c) >= 0 for c in rec["choices"])
        assert set(rec["rationales"]) == {"careful", "terse"}
        careful = rec["rationales"]["careful"][0]
        assert extract("choice", careful, rec["choices"]) == rec["answer"]
        assert len(careful) > len(rec["rationales"]["terse"][0])  # the styles differ
    positions = [r["choices"].index(r["answer"]) for r in records]
    assert all(positions.count(p) > 50 for p in range(4))  # the answer is not always (a)


@pytest.mark.parametrize("rate", [0.15, 0.3, 0.0])
def test_terse_teacher_is_wrong_at_the_chosen_rate(rate):
    records = make_demo_records(200, 2, "train", terse_error_rate=rate)
    wrong = [r for r in records if extract("choice", r["rationales"]["terse"][0], r["choices"]) != r["answer"]]
    assert len(wrong) == round(200 * rate)
    assert all(not r["meta"]["terse_correct"] for r in wrong)
    assert sum(not r["meta"]["terse_correct"] for r in records) == len(wrong)
    for r in wrong:  # a slip to a near miss, still among the choices
        assert extract("choice", r["rationales"]["terse"][0], r["choices"]) in r["choices"]


def test_splits_are_disjoint_by_question_across_seeds():
    questions = {}
    for split, n in (("train", 400), ("validation", 60), ("test", 60)):
        questions[split] = {r["question"] for seed in (0, 1) for r in make_demo_records(n, seed, split)}
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"]
    assert not questions["validation"] & questions["test"]


def test_no_arithmetic_signature_is_in_two_splits():
    """Questions that differ only in a name, an object or a verb are the same problem: a
    split by question text leaked a third of test into train (the same start and changes)."""
    from tinyllm_jax.data.demo import parse_question, signature

    signatures = {}
    for split, n in (("train", 2000), ("validation", 200), ("test", 500)):
        records = make_demo_records(n, 0, split)
        signatures[split] = {signature(*parse_question(r["question"])[2:]) for r in records}
        assert all(r["meta"]["signature"] == signature(*parse_question(r["question"])[2:]) for r in records)
    assert not signatures["train"] & signatures["validation"]
    assert not signatures["train"] & signatures["test"]
    assert not signatures["validation"] & signatures["test"]


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="demo split 'dev'.*train, validation, test"):
        make_demo_records(3, 0, "dev")
    with pytest.raises(UserError, match="terse_error_rate.*1.5"):
        make_demo_records(3, 0, "train", terse_error_rate=1.5)


def test_config_options_are_checked(tmp_path):
    paths = write_demo_from_options(tmp_path, {"seed": 2, "n_train": 7, "n_valid": 2, "n_test": 3})
    assert len(read_jsonl(paths["train"])[0]) == 7
    assert read_jsonl(paths["train"])[0] == make_demo_records(7, 2, "train")
    with pytest.raises(UserError, match=r"demo.n_trian: unknown key \(known keys: seed, n_train"):
        write_demo_from_options(tmp_path, {"n_trian": 5})
    with pytest.raises(UserError, match="demo.n_test: expected an integer, found 'ten'"):
        write_demo_from_options(tmp_path, {"n_test": "ten"})


def test_small_vocabulary_and_short_texts(tmp_path):
    from tinyllm_jax.model.tokenizer import train_sentencepiece

    records = make_demo_records(300, 0, "train")
    texts = demo_texts(records, extra=["predict: explain: rationale:"])
    assert texts[-1] == "predict: explain: rationale:"
    assert max(len(t) for t in texts) <= 100  # characters: short inputs and targets
    assert len({w for t in texts for w in t.split()}) < 150
    tok = train_sentencepiece(texts, tmp_path / "spm", vocab_size=200)
    held_out = make_demo_records(20, 0, "test")
    for rec in held_out:  # the tokenizer covers unseen demo questions: no unknown pieces
        for text in demo_texts([rec]):
            assert tok.unk_token_id not in tok(text).input_ids, text

"""`tinyllm convert` on the layouts the reference repositories publish beyond the samples in
../shared/data (issue 14): distilling step-by-step's e-SNLI, ANLI and SVAMP (per-split files
or the one SVAMP.json its loader splits), PaLM strings that loop or stop before an answer,
Mentor-KD completions, FAIR's four datasets, and data of one format given to another."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyllm_jax.data.formats import convert
from tinyllm_jax.data.formats.source import FormatError
from tinyllm_jax.data.records import read_jsonl

from test_convert import records, split_of, write_json


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tinyllm_jax.cli", *args], capture_output=True, text=True)


# ------------------------------------------------------------------ distilling step-by-step: e-SNLI


def esnli_row(i: int, label: int) -> dict:
    return {"premise": f"A man plays guitar {i}.", "hypothesis": f"A man plays {i}.", "label": label,
            "explanation_1": "Guitar is music.", "explanation_2": "", "explanation_3": "x"}


@pytest.fixture
def esnli_src(tmp_path) -> Path:
    d = tmp_path / "datasets" / "esnli"
    for split in ("train", "valid", "test"):
        write_json(d / f"esnli_{split}.json", [esnli_row(i, i % 3) for i in range(3)], lines=True)
        write_json(d / "llm" / f"{split}_CoT_0.json", [
            "Playing guitar is playing.\nAnswer: entailment\n\nPremise: Made up.\nHypothesis: More.\nReasonings: R.\nAnswer: neutral",
            "He may play something else.\nAnswer: neutral\n\nPremise: x",
            "The man is not singing.\nAnswer: contradict",  # cut off inside the label
        ])
    return tmp_path / "datasets"


def test_dss_esnli_layout_three_splits_labels_and_answers(esnli_src, tmp_path):
    out = tmp_path / "out"
    report = convert("dss", esnli_src, out)
    assert [(s.dataset, s.split) for s in report.splits] == [("esnli", "train"), ("esnli", "valid"), ("esnli", "test")]
    rep = split_of(report, "esnli", "valid")
    assert rep.layout.startswith("e-SNLI")
    first, second, third = records(out, "esnli", "valid")
    assert first["question"] == "Premise: A man plays guitar 0.\nHypothesis: A man plays 0."
    assert (first["choices"], first["answer"]) == (["entailment", "neutral", "contradiction"], "entailment")
    assert first["rationales"] == {"palm": ["Playing guitar is playing."]}  # no "Answer:", no next premise
    assert first["teacher_answers"] == {"palm": ["entailment"]}
    assert second["answer"] == "neutral" and second["teacher_answers"] == {"palm": ["neutral"]}
    assert third["answer"] == "contradiction" and "teacher_answers" not in third
    assert third["rationales"] == {"palm": ["The man is not singing."]}
    assert first["meta"]["explanation_1"] == "Guitar is music."
    assert rep.teachers["palm"].agree_gold == 2
    assert rep.alignment["llm/valid_CoT_*.json"]["answer_unreadable"] == 1
    assert "layout: e-SNLI" in report.table()


# ------------------------------------------------------------------ ANLI


@pytest.fixture
def anli_src(tmp_path) -> Path:
    d = tmp_path / "anli1"
    rows = [{"uid": f"u{i}", "premise": f"Ernest store {i} opened in London.", "hypothesis": "It opened in Europe.",
             "label": i % 3, "reason": "London is in Europe."} for i in range(4)]
    loop = "The premise mentions London. " * 4
    for split in ("train", "valid", "test"):
        write_json(d / f"anli1_{split}.json", rows, lines=True)
    strings = [
        "The premise mentions London, which is in Europe. So the answer is entailment.\n\nPremise: Made up.\nHypothesis: x\nAnswer: So the answer is neutral.",
        "The premise says nothing of it. So the answer is neutral.\n\nPremise: The 2016",
        loop + "So the answer is contradiction.",  # a repetition loop
        "The premise mentions that the first store was opened in Oxford Street, London. Oxford",  # cut off
    ]
    write_json(d / "llm" / "train_CoT_0.json", strings[:2])
    write_json(d / "llm" / "train_CoT_1.json", strings[2:])
    write_json(d / "llm" / "valid_CoT_0.json", strings)
    write_json(d / "llm" / "test_CoT_0.json", strings)
    return d  # one dataset's folder given as --src


def test_dss_anli_layout_drops_loops_and_cut_off_strings_with_reasons(anli_src, tmp_path):
    out = tmp_path / "out"
    report = convert("dss", anli_src, out)
    assert {s.split for s in report.splits} == {"train", "valid", "test"}
    train = records(out, "anli1", "train")
    assert train[0]["rationales"] == {"palm": ["The premise mentions London, which is in Europe."]}
    assert train[0]["teacher_answers"] == {"palm": ["entailment"]}
    assert train[0]["meta"]["source_id"] == "u0" and train[0]["meta"]["reason"] == "London is in Europe."
    assert train[1]["answer"] == "neutral" and train[1]["rationales"] == {"palm": ["The premise says nothing of it."]}
    assert train[2]["rationales"] == {} and train[3]["rationales"] == {}
    palm = split_of(report, "anli1", "train").teachers["palm"]
    assert palm.dropped == {"repetition loop": 1, "no answer (cut off)": 1}
    assert (palm.read, palm.found, palm.missing) == (4, 2, 2)
    assert split_of(report, "anli1", "train").gold_file == "anli1/anli1_train.json"


# ------------------------------------------------------------------ SVAMP


SVAMP_STRINGS = [
    "45 flowerbeds with 10 seeds each, so 45 * 10 = 450 seeds. The answer is ( 10.0 * 45.0 ). Q: Paige put 10 seeds "
    "in each bed.\nHow many beds? A: 60 / 10 = 6. The answer is ( 60.0 / 10.0 )",
    "he gave 571 - 161 = 410 more.\nanswer: 410. The answer is 410. Q: Paul got 267 crayons.",
    "the difference is 19 - 14 = 5. So the answer is . Q: next",
]


def svamp_source(n: int) -> list[dict]:
    return [{"ID": f"chal-{i}", "Body": f"Body {i}.", "Question": f"How many {i}?", "Equation": f"( {i}.0 + 1.0 )",
             "Answer": float(i + 1), "Type": "Addition"} for i in range(n)]


def test_dss_svamp_per_split_files(tmp_path):
    d = tmp_path / "svamp"
    rows = [{"input": "Paige planted seeds. 10 in each of 45 beds\nHow many seeds?", "label": "( 10.0 * 45.0 )"},
            {"input": "Paul gave 571 and lost 161\nHow many more?", "label": "( 571.0 - 161.0 )"},
            {"input": "x\ny?", "label": "( 19.0 - 14.0 )"}]
    write_json(d / "svamp_train.json", rows, lines=True)
    write_json(d / "svamp_test.json", rows[:1], lines=True)
    write_json(d / "llm" / "train_CoT_0.json", SVAMP_STRINGS)
    write_json(d / "llm" / "test_CoT_0.json", SVAMP_STRINGS[:1])
    out = tmp_path / "out"
    report = convert("dss", tmp_path, out)
    first, second, third = records(out, "svamp", "train")
    assert first["answer"] == "( 10.0 * 45.0 )" and first["choices"] == []
    assert first["rationales"] == {"palm": ["45 flowerbeds with 10 seeds each, so 45 * 10 = 450 seeds."]}
    assert first["teacher_answers"] == {"palm": ["( 10.0 * 45.0 )"]}  # the equation, as PaLM wrote it
    assert second["rationales"] == {"palm": ["he gave 571 - 161 = 410 more."]}  # "answer: 410." is not reasoning
    assert second["teacher_answers"] == {"palm": ["410"]}  # a number is an SVAMP answer too
    assert third["rationales"] == {"palm": ["the difference is 19 - 14 = 5."]} and "teacher_answers" not in third
    rep = split_of(report, "svamp", "train")
    assert rep.alignment["llm/train_CoT_*.json"]["answer_unreadable"] == 1  # "So the answer is ."
    assert rep.teachers["palm"].agree_gold == 1 and rep.layout.startswith("SVAMP")


def test_dss_svamp_source_file_is_split_as_the_reference_loader_splits_it(tmp_path):
    d = tmp_path / "dss" / "svamp"
    source = svamp_source(1000)
    write_json(d / "SVAMP.json", source)
    # the teacher shards follow the loader's row order: 500 + 300 train, 200 test
    order = np.random.RandomState(seed=0).permutation(1000)
    train_ids, test_ids = order[:800], order[800:]
    strings = lambda ids: [f"Add one to {i}. The answer is ( {i}.0 + 1.0 )." for i in ids]  # noqa: E731
    write_json(d / "llm" / "train_CoT_0.json", strings(train_ids[:500]))
    write_json(d / "llm" / "train_CoT_1.json", strings(train_ids[500:]))
    write_json(d / "llm" / "test_CoT_0.json", strings(test_ids))
    out = tmp_path / "out"
    report = convert("dss", tmp_path / "dss", out)
    train, test = records(out, "svamp", "train"), records(out, "svamp", "test")
    assert [r["meta"]["source_id"] for r in train] == [f"chal-{i}" for i in train_ids]
    assert [r["meta"]["source_id"] for r in test] == [f"chal-{i}" for i in test_ids]
    assert train[0]["question"] == f"Body {train_ids[0]}.\nHow many {train_ids[0]}?"
    assert train[0]["answer"] == f"( {train_ids[0]}.0 + 1.0 )" and train[0]["meta"]["answer_number"] == str(train_ids[0] + 1)
    # every string joined its own row: PaLM's equation is the row's gold
    assert all(r["teacher_answers"]["palm"] == [r["answer"]] for r in train + test)
    assert split_of(report, "svamp", "train").teachers["palm"].agree_gold == 800
    assert any("seed 0" in n for n in split_of(report, "svamp", "test").notes)
    assert split_of(report, "svamp", "test").layout == "SVAMP (SVAMP.json, split by the reference loader)"


def test_dss_parallel_steps_are_reasoning_not_a_repetition_loop(tmp_path):
    """Reasoning that repeats a sentence between other steps ("She already put in 5 cups.")
    is kept as the text before "The answer is", as the reference loader reads it (SVAMP
    train has one such string of 789); a sentence said again and again in a row is a loop."""
    d = tmp_path / "svamp"
    parallel = ("Ann needs 6 cups of flour. She already put in 5 cups. So she needs 6 - 5 = 1 more cup of flour.\n"
                "Ann needs 8 cups of sugar. She already put in 5 cups. So she needs 8 - 5 = 3 more cups of sugar.\n"
                "Ann needs 7 cups of salt. She already put in 5 cups. So she needs 7 - 5 = 2 more cups of salt.\n"
                "She needs 3 more cups of sugar than 2 more cups of salt.")
    looping = "Ann needs 6 cups of flour. " + "She already put in 5 cups. " * 3 + "So she needs 1 more."
    rows = [{"input": f"Ann bakes {i}.\nHow many more?", "label": "( 3.0 - 2.0 )"} for i in range(2)]
    write_json(d / "svamp_train.json", rows, lines=True)
    write_json(d / "llm" / "train_CoT_0.json", [parallel + " The answer is (3 - 2).\n\nQ:",
                                                 looping + " The answer is ( 3.0 - 2.0 )."])
    out = tmp_path / "out"
    report = convert("dss", tmp_path, out)
    first, second = records(out, "svamp", "train")
    reference = (parallel + " The answer is (3 - 2).\n\nQ:").split("Q:")[0].rstrip().split("The answer is")[0].rstrip()
    assert first["rationales"] == {"palm": [reference]}
    assert first["teacher_answers"] == {"palm": ["(3 - 2)"]}
    assert second["rationales"] == {}
    assert split_of(report, "svamp", "train").teachers["palm"].dropped == {"repetition loop": 1}


# ------------------------------------------------------------------ unknown layouts, other formats, --src


def test_dss_unknown_layout_is_an_error_exit_2(tmp_path):
    d = tmp_path / "dss" / "mystery"
    write_json(d / "mystery_train.json", [{"text": "a", "target": "b"}], lines=True)
    with pytest.raises(FormatError, match=r"mystery_train.json:1: not a distilling step-by-step gold row: found fields target, text"):
        convert("dss", tmp_path / "dss", tmp_path / "out")
    # teacher shards with no gold file of any known name: not "not written", an error
    e = tmp_path / "e" / "svamp"
    write_json(e / "llm" / "train_CoT_0.json", ["x. The answer is 1."])
    write_json(e / "questions.json", [{"q": 1}])
    r = run_cli("convert", "dss", "--src", str(tmp_path / "e"), "--out", str(tmp_path / "out2"))
    assert r.returncode == 2, r.stderr
    assert "no gold file svamp_train.json (found: questions.json)" in r.stderr
    assert not (tmp_path / "out2").exists()


def test_convert_refuses_data_of_another_format_naming_it(tmp_path):
    t = tmp_path / "tinyllm" / "obqa"
    write_json(t / "obqa_train.json", [{"id": "1", "question": "q?", "choices": ["a", "b"], "answer": "a"}], lines=True)
    write_json(t / "llm" / "train_CoT_0.json", ["R. Thus, the answer is (a) a\n\nQ: q?\nAnswer Choices:\n(a) a\n(b) b"])
    r = run_cli("convert", "dss", "--src", str(tmp_path / "tinyllm"), "--out", str(tmp_path / "out"))
    assert r.returncode == 2
    assert "this is tinyllm data" in r.stderr and "Thus, the answer is" in r.stderr and "tinyllm convert tinyllm" in r.stderr
    m = tmp_path / "mentor"
    write_json(m / "skeleton" / "svamp_train.json", [{"input": "q", "answer": "1"}])
    for fmt in ("dss", "tinyllm", "fair"):
        with pytest.raises(FormatError, match="this is mentor-kd data"):
            convert(fmt, m, tmp_path / "o")
    a = tmp_path / "augonly" / "data"
    write_json(a / "prompt" / "svamp_6.json", [{"instruction": "q", "output": ["1"], "label": "1"}])
    with pytest.raises(FormatError, match="this is mentor-kd data"):
        convert("fair", tmp_path / "augonly", tmp_path / "o")
    f = tmp_path / "fairsrc"
    write_json(f / "Stu_svamp_false_round0.json", [{"id": 0, "question": "q", "gold_answer": "1"}])
    with pytest.raises(FormatError, match="this is fair data"):
        convert("mentor-kd", f, tmp_path / "o")
    p = tmp_path / "dsssrc" / "cqa"
    write_json(p / "cqa_train.json", [{"id": "1", "question": "q?", "choices": ["a", "b"], "answer": "a",
                                       "abstractive_explanation": "e", "extractive_explanation": "e"}], lines=True)
    with pytest.raises(FormatError, match="this is dss data"):
        convert("tinyllm", tmp_path / "dsssrc", tmp_path / "o")


def test_src_may_be_one_dataset_folder_or_a_folder_of_datasets(esnli_src, anli_src, tmp_path):
    one = convert("dss", esnli_src / "esnli", tmp_path / "one")
    many = convert("dss", esnli_src, tmp_path / "many")
    assert [(s.dataset, s.split, s.rows_written, s.gold_file) for s in one.splits] == \
        [(s.dataset, s.split, s.rows_written, s.gold_file) for s in many.splits]
    assert read_jsonl(tmp_path / "one" / "esnli" / "test.jsonl")[0] == read_jsonl(tmp_path / "many" / "esnli" / "test.jsonl")[0]


# ------------------------------------------------------------------ Mentor-KD completions


def test_mentor_kd_completions_are_read_as_answers_in_every_chain_file(tmp_path):
    root = tmp_path / "mentor-kd"
    date_q = "Yesterday was April 30. What is today?\nWhich choice is true? Answer choices: (A) 05/01, (B) 04/29."
    letters_q = 'Take the last letters of "Whitney Erika Tj Benito".'
    strat_q = "Is frost common at commencements?"
    csqa_q = "Where do sanctions hit? Answer Choices:\nA. ignore\nB. enforce\nC. school\n"

    def chain(q, answer, completion):
        return {"input": q, "chain": f"Some steps for {completion!r}.", "completion": completion, "answer": answer,
                "initial_correct": True}

    for d, q, gold in (("date_understanding", date_q, "A"), ("last_letter_concatenation", letters_q, "yajo"),
                       ("strategy_qa", strat_q, "No"), ("commonsense_qa", csqa_q, "B"), ("svamp", "2 - 1?", "1")):
        write_json(root / "skeleton" / f"{d}_test.json", [{"input": q, "answer": gold}])
        write_json(root / "skeleton" / f"{d}_train.json", [{"input": q, "answer": gold}])
    write_json(root / "main" / "date_understanding_test.json", [chain(date_q, "A", " (A)."), chain(date_q, "A", " A.")])
    write_json(root / "main" / "last_letter_concatenation_test.json", [chain(letters_q, "yajo", ' "yajo".')])
    write_json(root / "main" / "strategy_qa_test.json", [
        chain(strat_q, "No", " probably no."), chain(strat_q, "No", " that it depends on the weather.")])
    write_json(root / "main" / "commonsense_qa_test.json", [chain(csqa_q, "B", " (B)."), chain(csqa_q, "B", " B.")])
    write_json(root / "aug" / "flan-t5_large" / "date_understanding_rand3_aug3.json", [chain(date_q, "A", "A")])
    write_json(root / "aug" / "flan-t5_large" / "svamp_rand3_aug3.json", [chain("2 - 1?", "1", "1.0")])
    write_json(root / "aug" / "flan-t5_large" / "strategy_qa_rand3_aug3.json", [chain(strat_q, "No", "no")])
    out = tmp_path / "out"
    report = convert("mentor-kd", root, out)

    def answers(d, split, teacher):
        (rec,) = records(out, d, split)
        return rec.get("teacher_answers", {}).get(teacher)

    assert answers("date_understanding", "test", "teacher") == ["A", "A"]
    assert answers("date_understanding", "train", "mentor") == ["A"]
    assert answers("last_letter_concatenation", "test", "teacher") == ["yajo"]
    assert answers("strategy_qa", "test", "teacher") == ["No"]  # "that it depends..." states none
    assert answers("strategy_qa", "train", "mentor") == ["No"]
    assert answers("commonsense_qa", "test", "teacher") == ["enforce", "enforce"]
    assert answers("svamp", "train", "mentor") == ["1"]
    assert split_of(report, "strategy_qa", "test").alignment["main/strategy_qa_test.json"]["completion_unreadable"] == 1


def test_mentor_kd_last_letters_spelled_out_or_in_capitals_read_as_the_gold_word(tmp_path):
    """Mentor-KD's evaluator strips quotes, dots and whitespace from a last-letter answer and
    compares it case-insensitively: ' "y a a n".' and 'YAAN' state the gold "yaan"."""
    root = tmp_path / "mentor-kd"
    q = 'Take the last letters of each words in "Lucky Mireya Jj Kc" and concatenate them.'
    write_json(root / "skeleton" / "last_letter_concatenation_test.json", [{"input": q, "answer": "yaan"}])
    write_json(root / "main" / "last_letter_concatenation_test.json", [
        {"input": q, "chain": f"Some steps {i}.", "completion": c, "answer": "yaan", "initial_correct": True}
        for i, c in enumerate([' "y a a n".', " YAAN.", ' "y, a, a, n".', ' "yaan".'])])
    out = tmp_path / "out"
    report = convert("mentor-kd", root, out)
    (rec,) = records(out, "last_letter_concatenation", "test")
    assert rec["teacher_answers"]["teacher"] == ["yaan", "yaan", "y,a,a,n", "yaan"]
    assert split_of(report, "last_letter_concatenation", "test").alignment[
        "main/last_letter_concatenation_test.json"]["completion_unreadable"] == 0


LETTERS_Q = 'Take the last letters of each words in "Lucky Mireya" and concatenate them.'
LETTERS_OUTPUTS = [
    'Step 1: Lucky - y\nStep 2: Mireya - a\n\nConcatenating them, we get "ya".',
    "1. Lucky - y\n2. Mireya - a\n\nPutting them all together, we get: ya",
    'The last letters are "y" and "e", so the answer is "ye".',  # wrong
    "",  # an empty output
    "Let me think about the words first.",  # states no answer
]


def test_mentor_kd_aug_and_prompt_layouts_convert_without_skeleton(tmp_path):
    """Mentor samples (aug/{model}/{d}_rand3_aug3.json) and six raw teacher outputs a question
    (prompt/{d}_6.json, {instruction, output, label}) each carry the gold answer: a folder
    holding only those converts, the gold read from them; the raw outputs are teacher chains,
    kept when the answer they end with is the gold one."""
    root = tmp_path / "repo" / "data"  # the repository's data/ folder, given as its parent
    q = "Danny has 67 wrappers and 35 caps. How many more wrappers?\n"
    sample = {"input": q, "answer": "32", "initial_correct": True}
    write_json(root / "aug" / "flan-t5_large" / "svamp_rand3_aug3.json", [
        sample | {"chain": "67 - 35 = 32.", "completion": "32.0"},
        sample | {"chain": "67 + 35 = 102.", "completion": "102", "initial_correct": False},
        {"input": "Sum 1,000 and 80?\n", "answer": "1,080", "initial_correct": True, "chain": "So 1080.",
         "completion": "1080"}])
    write_json(root / "prompt" / "last_letter_concatenation_6.json", [
        {"instruction": LETTERS_Q, "output": LETTERS_OUTPUTS, "label": "ya"},
        {"instruction": 'Take the last letters of each words in "Bo Al".', "output": [], "label": "ol"}])
    out = tmp_path / "out"
    report = convert("mentor-kd", tmp_path / "repo", out)
    assert sorted((s.dataset, s.split) for s in report.splits) == [("last_letter_concatenation", "train"),
                                                                  ("svamp", "train")]
    first, second = records(out, "svamp", "train")
    assert (first["question"], first["answer"]) == ("Danny has 67 wrappers and 35 caps. How many more wrappers?", "32")
    assert first["rationales"] == {"mentor": ["67 - 35 = 32."]} and first["teacher_answers"] == {"mentor": ["32"]}
    assert (second["answer"], second["meta"]["answer_raw"]) == ("1080", "1,080")
    svamp = split_of(report, "svamp", "train")
    assert svamp.gold_file == "aug/flan-t5_large/svamp_rand3_aug3.json" and "no skeleton" in svamp.layout
    letters, empty = records(out, "last_letter_concatenation", "train")
    assert (letters["question"], letters["answer"]) == (LETTERS_Q, "ya")
    assert letters["rationales"] == {"teacher": [o.strip() for o in LETTERS_OUTPUTS[:2]]}
    assert letters["teacher_answers"] == {"teacher": ["ya", "ya"]}
    assert letters["provenance"]["teacher"]["samples"][1] == {
        "where": "prompt/last_letter_concatenation_6.json:2", "output": 1, "correct": True, "answer": "ya"}
    assert (empty["answer"], empty["rationales"]) == ("ol", {})
    teacher = split_of(report, "last_letter_concatenation", "train").teachers["teacher"]
    assert (teacher.read, teacher.kept) == (5, 2)
    assert teacher.dropped == {"incorrect": 1, "empty": 1, "no answer": 1}


def test_mentor_kd_layouts_join_when_several_are_present(tmp_path):
    """With skeleton/ the gold comes from it; main/'s chains are the reference's pick of the
    prompt/ outputs, so those are checked against the gold and not added twice; a bare copy
    of the gold rows in main/ gives a split that skeleton/ lacks."""
    root = tmp_path / "mentor-kd"
    write_json(root / "skeleton" / "last_letter_concatenation_train.json", [{"input": LETTERS_Q, "answer": "ya"}])
    write_json(root / "main" / "last_letter_concatenation_3_train.json", [
        {"input": LETTERS_Q, "chain": LETTERS_OUTPUTS[1], "answer": "ya", "initial_correct": True}])
    write_json(root / "prompt" / "last_letter_concatenation_6.json", [
        {"instruction": LETTERS_Q, "output": LETTERS_OUTPUTS, "label": "yo"}])  # disagrees with skeleton/
    write_json(root / "main" / "gsm8k_test.json", [{"input": "2+2?\n", "answer": "4"}])  # no skeleton/gsm8k_test
    out = tmp_path / "out"
    report = convert("mentor-kd", root, out)
    (letters,) = records(out, "last_letter_concatenation", "train")
    assert letters["rationales"] == {"teacher": [LETTERS_OUTPUTS[1]]}
    rep = split_of(report, "last_letter_concatenation", "train")
    assert rep.gold_file == "skeleton/last_letter_concatenation_train.json"
    assert rep.alignment["prompt/last_letter_concatenation_6.json"]["answer_differs_from_gold"] == 1
    assert any("prompt/last_letter_concatenation_6.json" in n and "main/" in n for n in rep.notes)
    (gsm,) = records(out, "gsm8k", "test")
    assert (gsm["question"], gsm["answer"]) == ("2+2?", "4")
    assert split_of(report, "gsm8k", "test").gold_file == "main/gsm8k_test.json"


def test_mentor_kd_refuses_only_what_is_unusable_naming_it(tmp_path):
    root = tmp_path / "mentor-kd"
    write_json(root / "prompt" / "date_understanding_6.json", [{"instruction": "When?", "output": ["(A)"]}])
    with pytest.raises(FormatError, match=r"prompt/date_understanding_6.json:2: missing required field 'label'"):
        convert("mentor-kd", root, tmp_path / "out")
    empty = tmp_path / "nothing"
    (empty / "skeleton").mkdir(parents=True)
    with pytest.raises(FormatError, match=r"no Mentor-KD data found: expected skeleton/.*aug/.*prompt/"):
        convert("mentor-kd", empty, tmp_path / "out2")


# ------------------------------------------------------------------ FAIR: the four published datasets


def test_fair_round0_files_of_all_four_datasets_convert_with_their_answers(tmp_path):
    root = tmp_path / "data"
    stu = "Llama-2-7b-chat-hf"
    solution = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    write_json(root / f"{stu}_gsm8k_false_round0.json", [
        {"id": 0, "question": "Natalia sold clips to 48 friends...", "gold_answer": solution,
         "student_wrong_pred": "She sold 96.", "student_wrong_final_answer": "96"}])
    write_json(root / f"{stu}_strategyQA_false_round0.json", [
        {"id": 1, "question": "Is the cuisine of Hawaii suitable for a vegan?",
         "gold_answer": "false.\tHawaiians eat much Spam. Kalua pig is famous.",
         "student_wrong_pred": "\nTrue.", "student_wrong_final_answer": "true"}])
    options = ["Some southerners like peppers.", "All northerners dislike peppers.", "No one likes peppers.", "x"]
    write_json(root / f"{stu}_logiQA_false_round0.json", [
        {"id": 7, "context": "Southerners like peppers. Some people who like peppers are northerners.",
         "question": "Which follows?", "options": options, "gold_answer": "0",
         "student_wrong_pred": "Answer: No one. Rationale: ...", "student_wrong_final_answer": "2"}])
    write_json(root / f"{stu}_svamp_false_round0.json", [
        {"id": 0, "question": "290 bananas in 2 groups?", "gold_answer": "145",
         "student_wrong_pred": "580", "student_wrong_final_answer": "580"}])
    out = tmp_path / "out"
    report = convert("fair", root, out)
    assert sorted((s.dataset, s.rows_written) for s in report.splits) == [
        ("gsm8k", 1), ("logiQA", 1), ("strategyQA", 1), ("svamp", 1)]

    (gsm,) = records(out, "gsm8k", "train")
    assert gsm["answer"] == "72"
    assert gsm["meta"]["gold_rationale"] == solution.rsplit("####", 1)[0].strip()
    (sqa,) = records(out, "strategyQA", "train")
    assert sqa["answer"] == "no" and sqa["meta"]["facts"] == "Hawaiians eat much Spam. Kalua pig is famous."
    assert sqa["meta"]["answer_raw"] == "false" and sqa.get("context") in (None, "")
    (lqa,) = records(out, "logiQA", "train")
    assert (lqa["answer"], lqa["choices"]) == (options[0], options)
    assert lqa["context"].startswith("Southerners like peppers.")
    (sv,) = records(out, "svamp", "train")
    assert sv["answer"] == "145"


def test_fair_malformed_gold_names_file_and_line(tmp_path):
    root = tmp_path / "data"
    write_json(root / "S_gsm8k_false_round0.json", [{"id": 0, "question": "q", "gold_answer": "no marker here"}])
    with pytest.raises(FormatError, match=r"S_gsm8k_false_round0.json:2: field 'gold_answer': expected a GSM8K solution"):
        convert("fair", root, tmp_path / "out")

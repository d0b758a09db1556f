"""`tinyllm convert` on small fixtures written here in each reference layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tinyllm_jax.data.formats import REPORT_NAME, convert, convert_command
from tinyllm_jax.data.formats.answers import letter_answer, normalize_number, split_embedded_choices
from tinyllm_jax.data.formats.dss import Palm, parse_palm
from tinyllm_jax.data.formats.source import FormatError
from tinyllm_jax.data.formats.tinyllm import parse_teacher_string
from tinyllm_jax.data.records import read_jsonl
from tinyllm_jax.errors import UserError


def write_json(path: Path, rows, lines: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if lines:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        path.write_text(json.dumps(rows, indent=4), encoding="utf-8")
    return path


def split_of(report, dataset: str, split: str):
    (found,) = [s for s in report.splits if (s.dataset, s.split) == (dataset, split)]
    return found


def records(out: Path, dataset: str, split: str) -> list[dict]:
    return read_jsonl(out / dataset / f"{split}.jsonl")[0]


# ------------------------------------------------------------------ TinyLLM


CHOICES = ["the moon", "the sun", "a rock", "the sea"]


def tinyllm_string(question: str, flan: str, letter: str = "b", llama: str | None = None) -> str:
    listed = "\n".join(f"({'abcd'[i]}) {c}" for i, c in enumerate(CHOICES))
    text = f"{flan} Thus, the answer is ({letter}) {CHOICES['abcd'.index(letter)]}\n\nQ: {question}\nAnswer Choices:\n{listed}"
    return text if llama is None else f"{text} llama rationale: {llama}"


def gold(i: int) -> dict:
    return {"id": f"q{i}", "question": f"What gives light number {i}?", "choices": CHOICES, "answer": "the sun"}


@pytest.fixture
def tinyllm_src(tmp_path) -> Path:
    root = tmp_path / "tinyllm"
    d = root / "obqa"
    # train: JSON Lines gold, two shards (the second one numbered 1, sorted after 0)
    write_json(d / "obqa_train.json", [gold(i) for i in range(4)], lines=True)
    write_json(d / "llm" / "train_CoT_0.json", [
        tinyllm_string(gold(0)["question"], "The sun shines.", llama="Let's think step by step. The sun is a star.\nQ: next one?"),
        tinyllm_string(gold(1)["question"], "Let's think step by step. Stars give light."),  # no llama part
        tinyllm_string(gold(2)["question"], "", llama="Let's think step by"),  # both empty
    ])
    write_json(d / "llm" / "train_CoT_1.json", [
        tinyllm_string(gold(3)["question"], "It is bright.", letter="a", llama="nan"),
    ])
    # valid: JSON list gold, one gold row more than teacher strings
    write_json(d / "obqa_valid.json", [gold(i) for i in range(3)])
    write_json(d / "llm" / "valid_CoT_0.json", [tinyllm_string(gold(i)["question"], "Sun.") for i in range(2)])
    # test: a string about another question, and a gold answer not among the choices
    write_json(d / "obqa_test.json", [gold(0), gold(1) | {"answer": "a lamp"}])
    write_json(d / "llm" / "test_CoT_0.json", [
        tinyllm_string("Something else entirely?", "Wrong row.", llama="Let's think step by step. Nope."),
        tinyllm_string(gold(1)["question"], "Fine.", llama="Let's think step by step. Fine too."),
        tinyllm_string("An extra string", "Extra."),
    ])
    # piqa: the published train gold file is empty; only teacher strings survive
    p = root / "piqa"
    write_json(p / "llm" / "train_CoT_0.json", [tinyllm_string("x", "y")] * 5)
    (p / "piqa_train.json").write_text("")
    # pubmedqa: the abstract precedes the question
    m = root / "pubmedqa"
    abstract = "Background words. \n Methods words. \n Does it work?"
    write_json(m / "pubmedqa_test.json", [{"id": 7, "question": abstract, "choices": ["yes", "no", "maybe"], "answer": "no"}])
    listed = "(a) yes\n(b) no\n(c) maybe"
    write_json(m / "llm" / "test_CoT_0.json", [f"It fails. Thus, the answer is (b) no\n\nQ: {abstract}\nAnswer Choices:\n{listed}"])
    return tmp_path


def test_parse_teacher_string_splits_flan_and_llama():
    ts = parse_teacher_string(tinyllm_string("Q1?", "Because light.", llama="Let's think step by step. Stars shine."))
    assert (ts.flan, ts.llama, ts.question, ts.letter) == ("Because light.", "Stars shine.", "Q1?", "b")
    bare = parse_teacher_string(tinyllm_string("Q1?", "Because light."))
    assert bare.flan == "Because light." and bare.llama is None
    # the rationale stops at the first "Q:" even without "Thus, the answer is"
    assert parse_teacher_string("Plants need sun.\n\nQ: Why?\nAnswer Choices:\n(a) x").flan == "Plants need sun."
    cut = parse_teacher_string(tinyllm_string("Q1?", "R.", llama="Let's think step by"))
    assert cut.llama == ""


def test_tinyllm_layout(tinyllm_src, tmp_path):
    out = tmp_path / "out"
    report = convert("tinyllm", tinyllm_src, out)

    train = records(out, "obqa", "train")
    assert [r["id"] for r in train] == [f"obqa-train-{i}" for i in range(4)]
    assert train[0]["rationales"] == {"flan-t5": ["The sun shines."], "llama": ["The sun is a star."]}
    assert train[1]["rationales"] == {"flan-t5": ["Stars give light."]}
    assert train[2]["rationales"] == {}  # empty rationales never become training targets
    assert train[3]["rationales"] == {"flan-t5": ["It is bright."]}  # "nan" is no rationale
    assert train[3]["teacher_answers"] == {"flan-t5": ["the moon"]}  # what Flan-T5 said, not the gold
    assert train[3]["provenance"]["flan-t5"] == {
        "format": "tinyllm", "samples": [{"where": "obqa/llm/train_CoT_1.json:2", "answer": "the moon"}],
    }
    assert train[0]["provenance"]["llama"]["samples"] == [{"where": "obqa/llm/train_CoT_0.json:2"}]
    assert train[0]["meta"] == {"format": "tinyllm", "dataset": "obqa", "split": "train", "source_id": "q0"}

    rep = split_of(report, "obqa", "train")
    assert (rep.rows_read, rep.rows_written) == (4, 4)
    flan, llama = rep.teachers["flan-t5"], rep.teachers["llama"]
    # agreement is counted over the rationales kept: the empty one's stated answer is not (issue 23)
    assert (flan.read, flan.found, flan.missing, flan.dropped, flan.agree_gold) == (4, 3, 1, {"empty": 1}, 2)
    assert (llama.found, llama.missing, llama.dropped) == (1, 3, {"empty": 2})
    assert rep.alignment["llm/train_CoT_*.json"]["question_agrees"] == 4

    saved = json.loads((out / REPORT_NAME).read_text())
    assert saved == json.loads(json.dumps(report.to_dict()))
    assert saved["totals"] == {"splits_written": 4, "splits_not_written": 1, "rows_read": 10, "rows_written": 10}


def test_tinyllm_count_mismatch_is_reported_never_cut(tinyllm_src, tmp_path):
    report = convert("tinyllm", tinyllm_src, tmp_path / "out")
    valid = split_of(report, "obqa", "valid")
    assert valid.rows_written == 3  # the gold row with no teacher string is kept
    assert valid.alignment["llm/valid_CoT_*.json"]["gold_rows_without_string"] == 1
    assert valid.teachers["flan-t5"].missing == 1
    test = split_of(report, "obqa", "test")
    assert test.alignment["llm/test_CoT_*.json"]["strings_without_gold_row"] == 1
    assert any("counts differ" in n for n in test.notes)


def test_tinyllm_string_about_another_question_is_not_attached(tinyllm_src, tmp_path):
    out = tmp_path / "out"
    report = convert("tinyllm", tinyllm_src, out)
    test = records(out, "obqa", "test")
    assert test[0]["rationales"] == {}
    assert test[1]["rationales"] == {"flan-t5": ["Fine."], "llama": ["Fine too."]}
    rep = split_of(report, "obqa", "test")
    assert rep.alignment["llm/test_CoT_*.json"]["question_differs"] == 1
    assert rep.teachers["llama"].dropped == {"question differs": 1}
    assert rep.answers_not_in_choices == 1


def test_tinyllm_empty_gold_split_is_reported_not_invented(tinyllm_src, tmp_path):
    out = tmp_path / "out"
    report = convert("tinyllm", tinyllm_src, out)
    piqa = split_of(report, "piqa", "train")
    assert piqa.status == "not written: gold file piqa_train.json is empty"
    assert piqa.output is None and not (out / "piqa" / "train.jsonl").exists()
    assert piqa.alignment["llm/train_CoT_*.json"]["strings_without_gold_row"] == 5


def test_tinyllm_pubmedqa_abstract_becomes_context(tinyllm_src, tmp_path):
    out = tmp_path / "out"
    convert("tinyllm", tinyllm_src, out)
    (rec,) = records(out, "pubmedqa", "test")
    assert rec["question"] == "Does it work?"
    assert rec["context"] == "Background words.\nMethods words."
    assert rec["rationales"] == {"flan-t5": ["It fails."]}
    assert rec["meta"]["source_id"] == "7"


# ------------------------------------------------------------------ distilling step-by-step


@pytest.fixture
def dss_src(tmp_path) -> Path:
    d = tmp_path / "dss" / "cqa"
    choices = ["park", "coloring book", "garden center", "math problem", "gravity"]
    rows = [{"id": f"h{i}", "question": f"What is example {i}?", "choices": choices, "answer": "math problem",
             "abstractive_explanation": "webmath", "extractive_explanation": "example"} for i in range(4)]
    write_json(d / "cqa_train.json", rows, lines=True)
    write_json(d / "llm" / "train_CoT_0.json", [
        "It is about numbers. So the answer is (d) Math problem.\n\nQ: Made up?\nAnswer Choices:\n(a) x\nA: So the answer is (a) x.",
        "Either could do. So the answer is either (a) park or (e) gravity.\n\nQ: Another?",
        "So the answer is (c) garden center.",  # no rationale before the answer
        "It erupts. So the answer is (a) volcano.",  # the text is not choice (a): no answer read
    ])
    return tmp_path


def test_parse_palm():
    assert parse_palm("R. So the answer is (d) math problem.\n\nQ: z") == Palm("R.", "(d) math problem.")
    assert parse_palm("R. So the answer is either (a) x or (b) y.") == Palm("R.", "either (a) x or (b) y.")
    assert parse_palm("R. So the answer is (a)") == Palm("R.", "(a)")


def test_dss_layout(dss_src, tmp_path):
    out = tmp_path / "out"
    report = convert("dss", dss_src / "dss", out)
    recs = records(out, "cqa", "train")
    assert recs[0]["rationales"] == {"palm": ["It is about numbers."]}
    assert recs[0]["teacher_answers"] == {"palm": ["math problem"]}
    assert recs[0]["meta"]["abstractive_explanation"] == "webmath"
    assert recs[1]["rationales"] == {"palm": ["Either could do."]}
    assert recs[2]["rationales"] == {}
    assert recs[3]["rationales"] == {"palm": ["It erupts."]} and "teacher_answers" not in recs[3]
    rep = split_of(report, "cqa", "train")
    palm = rep.teachers["palm"]
    assert (palm.found, palm.missing, palm.dropped, palm.agree_gold) == (3, 1, {"empty": 1}, 1)
    counts = rep.alignment["llm/train_CoT_*.json"]
    assert (counts["stated_choice_matches_row"], counts["stated_choice_unverifiable"], counts["stated_text_not_a_choice"]) == (2, 1, 1)


# ------------------------------------------------------------------ Mentor-KD


@pytest.fixture
def mentor_src(tmp_path) -> Path:
    root = tmp_path / "mentor-kd"
    q = "Danny has 67 wrappers and 35 caps. How many more wrappers?\n"
    write_json(root / "skeleton" / "svamp_train.json", [{"input": q, "answer": "32"}, {"input": "Sum 1,000 and 80?\n", "answer": "1,080"}])
    write_json(root / "skeleton" / "svamp_test.json", [{"input": "2+2?\n", "answer": "4.0"}])
    write_json(root / "main" / "svamp_test.json", [{"input": "2+2?\n", "answer": "4.0"}])  # a bare copy
    chain = {"input": q, "answer": "32", "initial_correct": True}
    write_json(root / "main" / "svamp_3_train.json", [
        chain | {"chain": "67 - 35 = 32."},
        chain | {"chain": "67 - 35 = 32."},  # word for word again
        chain | {"chain": "67 + 35 = 102.", "initial_correct": False},
        {"input": "A question not in the gold rows", "chain": "x", "answer": "1", "initial_correct": True},
    ])
    write_json(root / "aug" / "flan-t5_large" / "svamp_rand3_aug3.json", [
        chain | {"chain": "So 32.", "completion": "32.0"},
        chain | {"chain": "So 25.", "completion": "25.0", "initial_correct": False},
    ])
    csqa = "Where do sanctions hit? Answer Choices:\nA. ignore\nB. enforce\nC. school\n"
    write_json(root / "skeleton" / "commonsense_qa_train.json", [{"input": csqa, "answer": "A. ignore"}])
    write_json(root / "skeleton" / "commonsense_qa_test.json", [{"input": csqa, "answer": "C"}])
    (root / "main" / "commonsense_qa_3_train.json").write_text("")  # published empty
    return tmp_path


def test_mentor_kd_layout(mentor_src, tmp_path):
    out = tmp_path / "out"
    report = convert("mentor-kd", mentor_src, out)

    (first, second) = records(out, "svamp", "train")
    assert first["question"] == "Danny has 67 wrappers and 35 caps. How many more wrappers?"
    assert first["rationales"] == {"teacher": ["67 - 35 = 32."], "mentor": ["So 32."]}
    assert first["provenance"]["mentor"]["samples"] == [
        {"where": "aug/flan-t5_large/svamp_rand3_aug3.json:2", "correct": True, "model": "flan-t5_large", "answer": "32"},
    ]
    assert all(s["correct"] for s in first["provenance"]["teacher"]["samples"])  # only initial_correct chains kept
    assert first["teacher_answers"] == {"mentor": ["32"]}  # "32.0" as a number
    assert (second["answer"], second["meta"]["answer_raw"]) == ("1080", "1,080")
    (test,) = records(out, "svamp", "test")
    assert (test["answer"], test["meta"]["answer_raw"]) == ("4", "4.0")

    rep = split_of(report, "svamp", "train")
    teacher, mentor = rep.teachers["teacher"], rep.teachers["mentor"]
    assert (teacher.read, teacher.kept, teacher.found, teacher.missing) == (4, 1, 1, 1)
    assert teacher.dropped == {"duplicate": 1, "incorrect": 1}
    assert mentor.dropped == {"incorrect": 1}
    assert rep.alignment["main/svamp_3_train.json"]["rows_without_gold_row"] == 1
    assert any("holds no chains" in n for n in split_of(report, "svamp", "test").notes)

    (csqa,) = records(out, "commonsense_qa", "train")
    assert csqa["question"] == "Where do sanctions hit?"
    assert (csqa["choices"], csqa["answer"]) == (["ignore", "enforce", "school"], "ignore")
    assert records(out, "commonsense_qa", "test")[0]["answer"] == "school"
    rep = split_of(report, "commonsense_qa", "train")
    assert rep.teachers["teacher"].missing == 1
    assert any("is empty: no teacher chains" in n for n in rep.notes)


# ------------------------------------------------------------------ FAIR


@pytest.fixture
def fair_src(tmp_path) -> Path:
    root = tmp_path / "fair"
    base = [
        {"id": 0, "question": "290 bananas in 2 groups: how big is a group?", "gold_answer": "145",
         "student_wrong_pred": "290 * 2 = 580", "student_wrong_final_answer": "580"},
        {"id": 3, "question": "What is 3 - 1?", "gold_answer": "2.0",
         "student_wrong_pred": "4", "student_wrong_final_answer": "4"},
    ]
    write_json(root / "Stu_svamp_false_round0.json", base)
    feedback = [b | {"gpt_feedback": "Divide, do not multiply.", "gemini_feedback": "", "mistral_feedback": "Check."} for b in base]
    write_json(root / "Stu_svamp_feedback_round0.json", feedback)
    good, bad = "290 / 2 = 145.", "290 * 2 = 580."
    write_json(root / "Stu_svamp_rationale_round0.json", [
        base[0] | {"gpt_rationale": [good, 5, 5], "gemini_rationale": [bad, 1, 2], "mistral_rationale": [good + " Yes.", 4, 5],
                   "correct_rationale": [good, good + " Yes."]},
        base[1] | {"gpt_rationale": ["3 + 1 = 4.", 1, 1], "gemini_rationale": ["4", 1, 1], "mistral_rationale": ["", 1, 1],
                   "correct_rationale": []},
    ])
    return tmp_path


def test_fair_layout(fair_src, tmp_path):
    out = tmp_path / "out"
    report = convert("fair", fair_src, out)
    first, second = records(out, "svamp", "train")
    assert first["rationales"] == {"gpt": ["290 / 2 = 145."], "mistral": ["290 / 2 = 145. Yes."]}
    assert first["provenance"]["gpt"] == {
        "format": "fair", "samples": [{"where": "Stu_svamp_rationale_round0.json:2", "peer_scores": [5, 5]}],
    }
    assert first["provenance"]["mistral"]["samples"][0]["peer_scores"] == [4, 5]
    assert first["feedback"] == {"gpt": "Divide, do not multiply.", "mistral": "Check."}
    assert first["meta"]["student"] == "Stu" and first["meta"]["student_wrong_final_answer"] == "580"
    assert (second["answer"], second["rationales"]) == ("2", {})
    rep = split_of(report, "svamp", "train")
    assert {t: (c.found, c.missing, c.dropped) for t, c in rep.teachers.items()} == {
        "gpt": (1, 1, {"incorrect": 1}),
        "gemini": (0, 2, {"incorrect": 2}),
        "mistral": (1, 1, {"empty": 1}),
    }
    assert rep.alignment["Stu_svamp_feedback_round0.json"]["gemini_feedback"] == 0
    assert any("1 records have no correct teacher rationale" in n for n in rep.notes)


def test_fair_missing_gold_file_is_reported(fair_src, tmp_path):
    (fair_src / "fair" / "Stu_svamp_false_round0.json").unlink()
    report = convert("fair", fair_src, tmp_path / "out")
    assert report.splits[0].status == "not written: gold file Stu_svamp_false_round0.json is missing"


# ------------------------------------------------------------------ answers


@pytest.mark.parametrize("raw, want", [("32", "32"), ("32.0", "32"), ("1,080", "1080"), ("2.50", "2.5"),
                                       ("-3", "-3"), (" 7 ", "7"), ("x", None), ("1,08", None), ("", None)])
def test_normalize_number(raw, want):
    assert normalize_number(raw) == want


def test_letters_and_embedded_choices():
    assert split_embedded_choices("Q? Answer Choices:\nA. x\nB. y\n") == ("Q?", ["x", "y"])
    assert split_embedded_choices("Q? Answer Choices:\nA. x\nC. y\n") is None  # not in order: ambiguous
    assert letter_answer("B. y", ["x", "y"]) == "y"
    assert letter_answer("(b)", ["x", "y"]) == "y"
    assert letter_answer("A. y", ["x", "y"]) is None  # the text contradicts the letter
    assert letter_answer("E", ["x", "y"]) is None


def test_files_resaved_on_windows_convert_as_the_originals(tinyllm_src, tmp_path):
    """A gold file re-saved with a UTF-8 byte-order mark, a teacher shard as UTF-16 (PowerShell's
    `>`): the records equal those of the untouched files."""
    convert("tinyllm", tinyllm_src, tmp_path / "plain")
    want = records(tmp_path / "plain", "obqa", "train")
    gold = tinyllm_src / "tinyllm" / "obqa" / "obqa_train.json"
    gold.write_bytes(b"\xef\xbb\xbf" + gold.read_bytes())
    shard = tinyllm_src / "tinyllm" / "obqa" / "llm" / "train_CoT_0.json"
    shard.write_bytes(shard.read_text(encoding="utf-8").encode("utf-16"))
    convert("tinyllm", tinyllm_src, tmp_path / "windows")
    assert records(tmp_path / "windows", "obqa", "train") == want and want[0]["rationales"]["llama"]


# ------------------------------------------------------------------ bad input


def _break_json_list(src: Path) -> tuple[Path, str]:
    path = src / "tinyllm" / "obqa" / "obqa_valid.json"
    lines = path.read_text().split("\n")
    lines[7] = lines[7].replace('"', "", 1)
    path.write_text("\n".join(lines))
    return path, f"{path}:8: malformed JSON"


def _break_json_lines(src: Path) -> tuple[Path, str]:
    path = src / "tinyllm" / "obqa" / "obqa_train.json"
    lines = path.read_text().split("\n")
    lines[2] = lines[2][:-1]
    path.write_text("\n".join(lines))
    return path, f"{path}:3: malformed JSON"


def _drop_field(src: Path) -> tuple[Path, str]:
    path = src / "tinyllm" / "obqa" / "obqa_train.json"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    del rows[1]["answer"]
    write_json(path, rows, lines=True)
    return path, f"{path}:2: missing required field 'answer'"


def _latin1(src: Path) -> tuple[Path, str]:
    path = src / "tinyllm" / "obqa" / "llm" / "test_CoT_0.json"
    path.write_bytes(b'[\n"caf\xe9"\n]')
    return path, f"{path}:2: not valid UTF-8"


def _empty_shard(src: Path) -> tuple[Path, str]:
    path = src / "tinyllm" / "obqa" / "llm" / "train_CoT_1.json"
    path.write_text("")
    return path, f"{path}: empty file"


def _not_a_string(src: Path) -> tuple[Path, str]:
    path = src / "tinyllm" / "obqa" / "llm" / "train_CoT_1.json"
    write_json(path, [{"text": "x"}])
    return path, f"{path}:2: expected a string"


@pytest.mark.parametrize("breaker", [_break_json_list, _break_json_lines, _drop_field, _latin1, _empty_shard, _not_a_string])
def test_bad_input_is_a_clear_error_and_writes_nothing(tinyllm_src, tmp_path, breaker):
    _, message = breaker(tinyllm_src)
    out = tmp_path / "out"
    with pytest.raises(FormatError) as e:
        convert("tinyllm", tinyllm_src, out)
    assert str(e.value).startswith(message)
    assert not out.exists()


def test_fair_rationale_must_be_text_and_scores(fair_src, tmp_path):
    path = fair_src / "fair" / "Stu_svamp_rationale_round0.json"
    rows = json.loads(path.read_text())
    rows[1]["gpt_rationale"] = "just text"
    write_json(path, rows)
    with pytest.raises(FormatError, match=r"rationale_round0.json:\d+: field 'gpt_rationale': expected list"):
        convert("fair", fair_src, tmp_path / "out")


def test_no_data_and_unknown_format(tmp_path):
    with pytest.raises(UserError, match="no TinyLLM data found"):
        convert("tinyllm", tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="unknown format 'alpaca'"):
        convert("alpaca", tmp_path, tmp_path / "out")
    with pytest.raises(UserError, match="not a folder"):
        convert("dss", tmp_path / "absent", tmp_path / "out")


def test_convert_command_prints_the_report(fair_src, tmp_path, capsys):
    report = convert_command("fair", str(fair_src), str(tmp_path / "out"))
    printed = capsys.readouterr().out
    assert "svamp/train" in printed and "1 incorrect" in printed and "gemini_feedback 0" in printed
    assert report["splits"][0]["rows_written"] == 2


def test_cli_reports_bad_input_with_status_2(tinyllm_src, tmp_path, capsys):
    from tinyllm_jax.cli import main

    path, message = _drop_field(tinyllm_src)
    assert main(["convert", "tinyllm", "--src", str(tinyllm_src), "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err

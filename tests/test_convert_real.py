"""`tinyllm convert` on the real published archives in ../shared/data, unpacked into a
temporary folder; skipped when they are absent. The counts are the measured ones."""

from __future__ import annotations

import tarfile

from conftest import shared_data_or_skip
from tinyllm_jax.data.formats import REPORT_NAME, convert


def unpack(name: str, dest):
    archive = shared_data_or_skip(f"{name}.tar.xz")
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    return dest


def converted(name: str, tmp_path):
    src = unpack(name, tmp_path / "src")
    out = tmp_path / "out"
    report = convert(name, src, out)
    return report, out


def summary(report) -> dict:
    """split -> (gold rows read, records written, {teacher: (read, found, missing, kept, dropped)})"""
    return {
        f"{s.dataset}/{s.split}": (
            s.rows_read, s.rows_written,
            {t: (c.read, c.found, c.missing, c.kept, c.dropped) for t, c in s.teachers.items()},
        )
        for s in report.splits
    }


def check_outputs(report, out) -> None:
    """Every written split is on disk with as many lines as the report says; no answer
    falls outside its choices; the report is saved."""
    assert (out / REPORT_NAME).is_file()
    for s in report.splits:
        assert s.answers_not_in_choices == 0
        if s.output:
            with open(out / s.output, encoding="utf-8") as f:
                assert sum(1 for _ in f) == s.rows_written == s.rows_read


def teachers(flan, llama):
    return {"flan-t5": flan, "llama": llama}


def test_tinyllm_archive(tmp_path):
    report, out = converted("tinyllm", tmp_path)
    e = {}  # nothing dropped
    assert summary(report) == {
        "arc/train": (1117, 1117, teachers((1117, 1105, 12, 1105, {"empty": 12}), (1117, 1097, 20, 1097, {"empty": 20}))),
        "arc/valid": (295, 295, teachers((295, 293, 2, 293, {"empty": 2}), (295, 291, 4, 291, {"empty": 4}))),
        "arc/test": (1165, 1165, teachers((1165, 1141, 24, 1141, {"empty": 24}), (1165, 1146, 19, 1146, {"empty": 19}))),
        "obqa/train": (4957, 4957, teachers((4957, 4955, 2, 4955, {"empty": 2}), (4957, 4816, 141, 4816, {"empty": 141}))),
        "obqa/valid": (500, 500, teachers((500, 500, 0, 500, e), (500, 489, 11, 489, {"empty": 11}))),
        "obqa/test": (500, 500, teachers((500, 500, 0, 500, e), (500, 489, 11, 489, {"empty": 11}))),
        "piqa/train": (0, 0, teachers((16113, 0, 0, 0, e), (16113, 0, 0, 0, e))),
        "piqa/valid": (919, 919, teachers((919, 919, 0, 919, e), (919, 0, 919, 0, e))),
        "piqa/test": (919, 919, teachers((919, 919, 0, 919, e), (919, 0, 919, 0, e))),
        "pubmedqa/train": (500, 500, teachers((500, 498, 2, 498, {"empty": 2}), (500, 496, 4, 496, {"empty": 4}))),
        "pubmedqa/valid": (100, 100, teachers((100, 100, 0, 100, e), (100, 99, 1, 99, {"empty": 1}))),
        "pubmedqa/test": (400, 400, teachers((400, 399, 1, 399, {"empty": 1}), (400, 397, 3, 397, {"empty": 3}))),
    }
    check_outputs(report, out)
    for s in report.splits:
        counts = next(iter(s.alignment.values()))
        if s.output:  # every written split: counts agree and every string repeats its row's question
            assert counts["gold_rows"] == counts["teacher_strings"] == counts["question_agrees"] == s.rows_read
            assert s.teachers["flan-t5"].agree_gold == s.teachers["flan-t5"].kept  # of the rationales kept
    piqa = next(s for s in report.splits if (s.dataset, s.split) == ("piqa", "train"))
    assert piqa.status == "not written: gold file piqa_train.json is empty"
    assert piqa.alignment["llm/train_CoT_*.json"]["strings_without_gold_row"] == 16113
    assert not (out / "piqa" / "train.jsonl").exists()
    assert report.to_dict()["totals"] == {"splits_written": 11, "splits_not_written": 1, "rows_read": 11372, "rows_written": 11372}


def test_dss_archive(tmp_path):
    report, out = converted("dss", tmp_path)
    assert summary(report) == {
        "cqa/train": (9741, 9741, {"palm": (9741, 9741, 0, 9741, {})}),
        "cqa/test": (1221, 1221, {"palm": (1221, 1221, 0, 1221, {})}),
    }
    check_outputs(report, out)
    train, test = report.splits
    assert train.alignment["llm/train_CoT_*.json"] == {
        "join": "position", "gold_rows": 9741, "teacher_strings": 9741, "stated_choice_matches_row": 9416,
        "stated_choice_is_another": 1, "stated_text_not_a_choice": 37, "stated_choice_unverifiable": 287,
    }
    assert test.alignment["llm/test_CoT_*.json"]["stated_choice_matches_row"] == 1189
    assert (train.teachers["palm"].agree_gold, test.teachers["palm"].agree_gold) == (7334, 954)


def test_mentor_kd_archive(tmp_path):
    report, out = converted("mentor-kd", tmp_path)
    none = {}
    assert summary(report) == {
        "commonsense_qa/train": (8520, 8520, {"teacher": (0, 0, 8520, 0, none), "mentor": (0, 0, 8520, 0, none)}),
        "commonsense_qa/test": (1221, 1221, {}),
        "gsm8k/train": (7473, 7473, {"teacher": (0, 0, 7473, 0, none)}),
        "gsm8k/test": (659, 659, {}),
        "strategy_qa/train": (1603, 1603, {"teacher": (4488, 1496, 107, 4484, {"duplicate": 4}), "mentor": (0, 0, 1603, 0, none)}),
        "strategy_qa/test": (687, 687, {"teacher": (687, 366, 321, 366, {"incorrect": 321})}),
        "svamp/train": (700, 700, {
            "teacher": (1953, 651, 49, 1940, {"duplicate": 13}),
            "mentor": (2100, 609, 91, 1369, {"incorrect": 542, "duplicate": 189}),
        }),
        "svamp/test": (150, 150, {}),
    }
    check_outputs(report, out)
    for s in report.splits:
        for counts in s.alignment.values():
            assert counts.get("rows_without_gold_row", 0) == 0 and counts.get("answer_differs_from_gold", 0) == 0


def test_fair_archive(tmp_path):
    report, out = converted("fair", tmp_path)
    assert summary(report) == {
        "svamp/train": (387, 387, {
            "gpt": (387, 286, 101, 286, {"incorrect": 101}),
            "gemini": (387, 221, 166, 221, {"incorrect": 166}),
            "mistral": (387, 319, 68, 319, {"incorrect": 68}),
        }),
    }
    check_outputs(report, out)
    (split,) = report.splits
    feedback = split.alignment["Llama-2-7b-chat-hf_svamp_feedback_round0.json"]
    assert (feedback["rows"], feedback["gpt_feedback"], feedback["gemini_feedback"], feedback["mistral_feedback"]) == (387,) * 4
    assert split.alignment["Llama-2-7b-chat-hf_svamp_rationale_round0.json"]["gold_rows_without_row"] == 0
    assert "22 records have no correct teacher rationale: written with the answer only" in split.notes
